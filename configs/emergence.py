"""The emergence ladder (experiments/emergence.py): six model sizes spanning about 45x in
parameters, trained on the Python standard library mixed with 10% generated "a+b=c" lines
(training-side problems only; lm/tasks.py), with held-out 1-4 digit addition scored few-shot at
eight points of every run.

  python -m experiments.emergence              # trains the ladder (sweep grid mode), then plots
  python run.py sweep --config=configs/emergence.py --workdir=runs/emergence   # the ladder alone

Every size sees the same tokens (sweep.grid_tokens), so the x axes of parameters and of training
compute tell different stories: along parameters the data is fixed; along FLOPs each size
contributes its own training curve.
"""
import ml_collections

from configs import base


def get_config():
  c = ml_collections.ConfigDict()
  b = c.base = base.get_config()
  b.data.corpus, b.data.tokenizer, b.data.max_bytes = 'pystdlib', 'bytes', 8_000_000
  b.data.arith_fraction, b.data.arith_digits = 0.1, 4
  b.model.pos, b.model.norm, b.model.mlp, b.model.max_len = 'rope', 'rmsnorm', 'gelu', 128
  t = b.train
  t.batch_size, t.seq_len = 32, 128
  t.schedule, t.final_lr_fraction = 'cosine', 0.1
  t.eval_batches, t.keep_checkpoints, t.log_every = 8, 1, 50
  t.eval_tasks, t.eval_task_examples, t.eval_shots = 'arith', 200, 3

  s = c.sweep = ml_collections.ConfigDict()
  s.mode = 'grid'
  s.grid_params = (33_000.0, 70_000.0, 150_000.0, 330_000.0, 800_000.0, 1_500_000.0)
  s.grid_tokens = (8_000_000.0,)
  s.budgets = (1e12,)             # unused in grid mode
  s.sizes_per_budget = 1
  s.span = 1.0
  s.tokens_per_param = 20.0
  s.cooldown = 0.2
  s.head_dim = 16
  s.aspect = 32.0
  s.min_layers = 2
  s.aspect_band = 4.0
  s.lr = 3e-3
  s.lr_ref_width = 128
  s.lr_width_power = 0.5
  s.warmup_fraction = 0.05
  s.warmup_max = 100
  s.seeds = 1
  s.evals_per_run = 8
  s.checkpoints_per_run = 4
  s.max_attempts = 2
  s.parallel = 0                  # one run per CPU core (or GPU)
  s.bootstrap = 0
  return c
