"""An IsoFLOP sweep that pins the compute-optimal exponent on a CPU: four budgets a factor 30
apart (5e11 to 1.5e13 FLOPs), five sizes each, the smallest budget with two seeds.

Same corpus, tokenizer, sequence length and schedule as the default sweep (configs/sweep_smoke.py);
shapes of at least two layers with d_model / n_layers within a factor 2 of 16; each run's batch
the largest of 2-16 sequences that leaves it 2000 steps. Measured fit (Approach 3 a = 0.485,
0.35-0.61; held-out budget within 0.8%) and cost: docs/results/exponent_cpu.
"""
from configs import sweep_smoke


def get_config():
  c = sweep_smoke.get_config()
  s = c.sweep
  s.budgets = (5e11, 1.5e12, 5e12, 1.5e13)
  s.sizes_per_budget, s.span, s.tokens_per_param = 5, 3.0, 80.0
  s.head_dim, s.aspect, s.aspect_band, s.min_layers = 8, 16.0, 2.0, 2
  s.seeds_smallest = 2
  # The batch rule (lm/scaling/plan.batch_for): the largest of these batches that leaves a run
  # 2000 steps or more. At a fixed 16 x 128 the large models of the small budgets had 363-645
  # steps; more steps for the same tokens lowered their losses by up to 18%
  # (docs/results/exponent_cpu/batch_pilot.md).
  s.batch_sizes = (2, 4, 8, 16)
  s.min_steps = 2000
  # Every run scored on the same 1024 validation windows (131K tokens), whatever its batch. With
  # the base config's 8 batches a batch-2 run saw 16 windows and a batch-16 run 128: re-scored on
  # all 3226 windows, runs of one curve moved by -0.025 to +0.05 nats depending on their batch.
  # 1024 evenly spaced windows track the full set to 0.07% (std across runs).
  s.eval_rows = 1024
  s.parallel = 1
  s.bootstrap = 200
  return c
