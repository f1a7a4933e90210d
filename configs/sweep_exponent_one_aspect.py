"""The wide exponent sweep (configs/sweep_exponent_wide.py) on a ladder of one aspect ratio:
every shape has d_model = 10 · n_layers, with heads of 10 (n_heads = n_layers).

docs/results/exponent_aspect found that at 1e4-6e5 parameters a shape's aspect moves its loss by
a few percent at one size (wider better), and that replacing two of the wide sweep's ten shapes
moved a from 0.43 to 0.55: the exponent depended on where the ladder put its wide and narrow
shapes. Here there is one aspect, so the shape term is the same at every size. With
sweep.aspect_band = 1 the rungs are the shapes L2 d20, L3 d30, ..., L8 d80 (14K to 636K
parameters, a factor 1.5-2.9 apart); each budget takes those from N*/4 to 4·N*
(3-5 per budget). Eight budgets from 2.7e11 to 1.5e13 (a factor 55): at 1.5e11 only two shapes
fall in the span. Every run has two seeds (64 runs, 2.6e14 FLOPs), so the seed noise is measured
at every budget and folded into the intervals. Results: docs/results/exponent_one_aspect.
"""
from configs import sweep_exponent_wide


def get_config():
  c = sweep_exponent_wide.get_config()
  s = c.sweep
  s.aspect, s.aspect_band, s.head_dim = 10.0, 1.0, 10
  s.span = 4.0
  s.seeds = 2
  s.budgets = (2.7e11, 5e11, 9e11, 1.5e12, 2.7e12, 5e12, 9e12, 1.5e13)
  return c
