"""The exponent sweep (configs/sweep_exponent.py) with every run a warmup-stable-decay branch,
so that Approach 1 reads honest points: each is the final loss of a run of that length.

Seven budgets from 5e11 to 1.5e13 FLOPs (a factor 30, about 1.76 apart), sizes on one ladder
(a factor 3^0.4 per rung, five sizes within 3x of each budget's predicted optimum), the smallest
budget with two seeds; the predicted optimum at 45 tokens per parameter, where the cosine exponent
sweep found it (docs/results/exponent_cpu). The runs of one size that the batch rule gives the same batch are branches
of one trunk (sweep.mode=isoflop_wsd, lm/scaling/plan._isoflop_families): a trunk holds its peak
learning rate and each branch leaves it where its own last 20% (its cooldown) begins. A size
recurring across budgets then costs its longest run plus the shorter runs' cooldowns. Results:
docs/results/exponent_wsd.
"""
from configs import sweep_exponent


def get_config():
  c = sweep_exponent.get_config()
  s = c.sweep
  s.mode = 'isoflop_wsd'
  s.budgets = (5e11, 9e11, 1.5e12, 2.7e12, 5e12, 9e12, 1.5e13)
  s.sizes_per_budget, s.tokens_per_param = 6, 45.0   # 6 rungs over 9x: 5 shapes per budget
  s.cooldown = 0.2
  s.parallel = 0   # one run per core; a trunk's branches train one after another
  return c
