from configs import sweep_smoke


def get_config():
  c = sweep_smoke.get_config()
  s = c.sweep
  s.budgets = (3e11, 1e12, 3e12)
  s.span, s.tokens_per_param = 3.0, 60.0
  s.head_dim, s.aspect, s.aspect_band, s.min_layers = 8, 16.0, 2.5, 2
  s.seeds_smallest = 2
  s.parallel = 0
  return c
