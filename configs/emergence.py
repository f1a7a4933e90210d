"""The emergence ladder (experiments/emergence.py): six model sizes spanning about 45x in
parameters, trained on the Python standard library mixed with 10% generated "a+b=c" lines
(training-side problems only; lm/eval/tasks.py), with held-out 1-4 digit addition scored few-shot at
eight points of every run.

  python -m experiments.emergence              # trains the ladder (sweep grid mode), then plots
  python run.py sweep --config=configs/emergence.py --workdir=runs/emergence   # the ladder alone

Every size sees the same tokens (sweep.grid_tokens), so the x axes of parameters and of training
compute tell different stories: along parameters the data is fixed; along FLOPs each size
contributes its own training curve.
"""
from configs import sweep_smoke


def get_config():
  c = sweep_smoke.get_config()          # the default sweep's corpus, model family and rules
  b, s = c.base, c.sweep
  b.data.arith_fraction, b.data.arith_digits = 0.1, 4
  t = b.train
  t.batch_size, t.log_every = 32, 50
  t.eval_tasks, t.eval_task_examples, t.eval_shots = 'arith', 200, 3

  s.mode = 'grid'
  s.grid_params = (33_000.0, 70_000.0, 150_000.0, 330_000.0, 800_000.0, 1_500_000.0)
  s.grid_tokens = (8_000_000.0,)
  s.budgets, s.sizes_per_budget, s.span = (1e12,), 1, 1.0     # unused in grid mode
  s.tokens_per_param = 20.0
  s.min_layers, s.aspect_band = 2, 4.0
  s.evals_per_run, s.max_attempts = 8, 2
  s.parallel = 0                  # one run per CPU core (or GPU)
  s.bootstrap = 0
  return c
