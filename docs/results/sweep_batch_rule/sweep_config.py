from configs import sweep_smoke
def get_config():
  c = sweep_smoke.get_config()
  s = c.sweep
  s.budgets = (5e11, 1.5e12, 4.5e12)
  s.span = 3.0
  s.head_dim = 8
  s.aspect = 16.0
  s.aspect_band = 2.0
  s.min_layers = 2
  s.batch_sizes = (8, 16, 32, 64, 128)
  s.min_steps = 400
  s.parallel = 0
  return c
