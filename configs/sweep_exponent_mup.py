"""The one-aspect exponent sweep (configs/sweep_exponent_one_aspect.py) under μP, first seed.

Same shapes (d_model = 10 · n_layers, heads of 10), budgets, batches, schedule and validation
windows; every run is μP (lm/model/parametrization.py) with base width 40 (the L4 d40 rung, in the
middle of the ladder), and every run takes the one rate found by a scan of that rung alone
(docs/results/exponent_mup/README.md) instead of the SP sweep's rule
3e-3 · (128 / d_model)^0.5. One seed per run and two at the smallest budget: the 35 runs of the
SP sweep's first seed (docs/results/exponent_one_aspect/one_seed), so the two compare at the same
cost; `--config.sweep.seeds=2` adds the second seed (64 runs, as the SP sweep). Results:
docs/results/exponent_mup.
"""
from configs import sweep_exponent_one_aspect


def get_config():
  c = sweep_exponent_one_aspect.get_config()
  s = c.sweep
  s.parametrization = 'mup'
  s.lr_ref_width, s.lr_width_power = 40, 0.0
  s.lr = 7.8125e-3   # 2^-7: the best of 2^-9 .. 2^-5 on C1.5e12_L4_d40 (docs/results/exponent_mup)
  s.seeds = 1
  return c
