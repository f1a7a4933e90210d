"""`python run.py pipeline`: pretraining to alignment on 2 CPU cores, into a report card (lm/pipeline.py).

  python run.py pipeline --config=configs/pipeline.py --workdir=runs/pipeline

Each section is the config of one stage's subcommand (configs/pretrain_small.py, sft.py, reward.py,
ppo.py, grpo.py, dpo.py, eval.py), shortened so that the whole story fits in under an hour; override any
key as usual, e.g. --config.sft.train.steps=3000. The folders each stage starts from are filled in
by the pipeline. With --config.pretrain.data.tokenizer=sentencepiece a tokenizer stage comes first.
"""
import ml_collections

from configs import dpo, eval as eval_config, grpo, ppo, pretrain_small, reward, sft


def get_config():
  c = ml_collections.ConfigDict()
  p = c.pipeline = ml_collections.ConfigDict()
  p.stages = 'pretrain,sft,reward,ppo,grpo,dpo'
  p.policy_eval_prompts = 300   # held-out code headers every policy is sampled on ...
  p.policy_eval_samples = 2     # ... this many times each

  c.pretrain = pretrain_small.get_config()        # 4 layers x 128, bytes, 2000 steps

  c.sft = sft.get_config()
  c.sft.finetune.data = 'builtin+code'            # instructions and code bodies, one model
  c.sft.finetune.max_new_tokens = 48              # long enough for a code statement
  c.sft.train.steps = 3000                        # replay (a quarter of each batch) slows the
  c.sft.train.eval_every = c.sft.train.checkpoint_every = 1000   # tasks: twice the steps

  c.reward = reward.get_config()
  r, t = c.reward.reward, c.reward.train
  r.prompts, r.eval_prompts = 1000, 200
  t.steps, t.eval_every, t.checkpoint_every = 400, 100, 100

  c.ppo = ppo.get_config()
  t = c.ppo.train
  t.steps, t.eval_every, t.checkpoint_every = 80, 20, 20
  c.ppo.ppo.eval_prompts = 100

  c.grpo = grpo.get_config()                      # the code task, rewarded by its gold program
  t = c.grpo.train
  t.steps, t.eval_every, t.checkpoint_every = 80, 20, 20
  c.grpo.grpo.eval_prompts = 100

  c.dpo = dpo.get_config()
  t = c.dpo.train
  t.steps, t.eval_every, t.checkpoint_every = 250, 125, 125
  c.dpo.dpo.eval_prompts = 100
  c.dpo.dpo.replay_fraction = 0.2                 # pretraining windows beside the pairs

  c.eval = eval_config.get_config().eval
  e = c.eval
  e.tasks, e.format, e.shots, e.examples = 'instruct', 'chat', 0, 400
  return c
