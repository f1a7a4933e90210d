"""A 4-layer byte model pretrained on the Python standard library: the base that the fine-tuning
lessons start from (configs/sft.py). About 5 minutes on 2 CPU cores."""
from configs import tiny


def get_config():
  c = tiny.get_config()
  c.model.n_layers = 4
  c.train.steps = 2000
  c.train.eval_every = 500
  c.train.checkpoint_every = 500
  return c
