"""A tiny byte-level model on the Python standard library: learns visibly in about a minute on 2 CPU cores."""
from configs import base


def get_config():
  c = base.get_config()
  c.model.n_layers = 2
  c.model.d_model = 128
  c.model.n_heads = 4
  c.model.max_len = 128
  c.data.max_bytes = 8_000_000
  c.train.steps = 800
  c.train.batch_size = 16
  c.train.seq_len = 128
  c.train.lr = 3e-3
  c.train.warmup_steps = 20
  c.train.eval_every = 200
  c.train.checkpoint_every = 200
  return c
