"""The default sweep (configs/sweep_smoke.py) with the exponent sweep's batch rule: each run takes
the largest of 2, 4, 8 and 16 sequences that leaves it 2000 steps. Measured in README.md beside."""
from configs import sweep_smoke


def get_config():
  c = sweep_smoke.get_config()
  c.sweep.batch_sizes = (2, 4, 8, 16)
  c.sweep.min_steps = 2000
  return c
