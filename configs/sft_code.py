"""Supervised fine-tuning on the code-body task (lm/data/code_task.py): the SFT model that the
preference stages (configs/reward.py, dpo.py, ppo.py) start from.

  python run.py finetune --config=configs/sft_code.py --workdir=runs/sft_code \
      --config.finetune.init_from=runs/base_small

Every function header of the task's sources with a short first statement is one example; the
evaluation reports the gold reward of greedy answers on held-out headers ('gold').
"""
from configs import sft


def get_config():
  c = sft.get_config()
  c.train.steps = 600
  c.train.lr = 1e-3
  c.train.eval_every = 200
  c.train.checkpoint_every = 200
  f = c.finetune
  f.data = 'code'
  f.families = 'code'
  f.train_per_family = 100_000   # every training header
  f.eval_per_family = 200
  f.max_new_tokens = 48
  f.replay_fraction = 0.0        # the preference results (docs/preference.md) start from this SFT
  return c
