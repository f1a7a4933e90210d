"""The wide exponent sweep (configs/sweep_exponent_wide.py) with every shape of one aspect ratio,
and two seeds at every budget.

One change against sweep_exponent_wide: d_model / n_layers within a factor 1.3 of 10 (8 to 13)
where that sweep allowed a factor 2 of 16 (8 to 32). There the shape search, which takes the
shape nearest each rung's size first, gave two mid-ladder rungs wide shallow shapes (L2 d48,
aspect 24, and L3 d48, aspect 16) among shapes of aspect 8 to 12; the fit's residuals fell with
aspect (correlation -0.33 with log aspect: wider shapes did better than their size predicts), and
a fit without those two shapes gave a = 0.46 against 0.43 with them. Here those rungs become
L4 d32 and L5 d40; the other eight shapes, their runs and the cost are unchanged. Results:
docs/results/exponent_aspect.
"""
from configs import sweep_exponent_wide


def get_config():
  c = sweep_exponent_wide.get_config()
  s = c.sweep
  s.aspect, s.aspect_band = 10.0, 1.3
  s.seeds = 2
  return c
