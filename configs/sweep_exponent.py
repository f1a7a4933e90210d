"""An IsoFLOP sweep that pins the compute-optimal exponent on a CPU: four budgets a factor 30
apart (5e11 to 1.5e13 FLOPs), five sizes each, the smallest budget with two seeds.

Same corpus, tokenizer, batch and schedule as the default sweep (configs/sweep_smoke.py); shapes
of at least two layers with d_model / n_layers within a factor 2 of 16. Measured cost and fit:
docs/results/exponent_cpu.
"""
from configs import sweep_smoke


def get_config():
  c = sweep_smoke.get_config()
  s = c.sweep
  s.budgets = (5e11, 1.5e12, 5e12, 1.5e13)
  s.sizes_per_budget, s.span, s.tokens_per_param = 5, 3.0, 80.0
  s.head_dim, s.aspect, s.aspect_band, s.min_layers = 8, 16.0, 2.0, 2
  s.seeds_smallest = 2
  s.parallel = 1
  s.bootstrap = 200
  return c
