"""The WSD exponent sweep (configs/sweep_exponent_wsd.py) over a factor 100 of compute, on the
whole standard library.

Two changes against sweep_exponent_wsd:
  * the whole corpus (`data.max_bytes = 0`, about 31 MB of Python, against 8 MB): at 8 MB the
    small models of the two largest budgets saw their training tokens 1.7-2.9 times, so the top of
    the IsoFLOP fit mixed repetition into the law. Here no run repeats a token;
  * two budgets below 5e11 (1.5e11 and 2.7e11 FLOPs): nine budgets from 1.5e11 to 1.5e13. Runs of
    these budgets are short and cheap (the whole plan costs 5% more FLOPs than the 7-budget one),
    and they double the range of log compute the fit leans on. The smallest budget has two seeds.

Results: docs/results/exponent_wide.
"""
from configs import sweep_exponent_wsd


def get_config():
  c = sweep_exponent_wsd.get_config()
  c.base.data.max_bytes = 0
  c.sweep.budgets = (1.5e11, 2.7e11, 5e11, 9e11, 1.5e12, 2.7e12, 5e12, 9e12, 1.5e13)
  return c
