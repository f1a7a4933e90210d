"""RLHF with PPO on the code-body task (lm/align/ppo.py).

  python run.py ppo --config=configs/ppo.py --workdir=runs/ppo \
      --config.ppo.init_from=runs/sft_code --config.ppo.reward_from=runs/rm

One train step is one PPO iteration: train.batch_size rollouts, then ppo.epochs passes of
minibatches over them. train.lr is the policy's learning rate. A `lora` section with rank > 0
trains adapters on the frozen SFT weights, which (adapters off) are also the reference; the value
network stays a full copy of the reward model's trunk.
"""
import ml_collections

from configs import base


def get_config() -> ml_collections.ConfigDict:
  c = ml_collections.ConfigDict()
  c.seed = 0
  c.train = base.get_config().train
  t = c.train
  t.steps = 150              # PPO iterations
  t.batch_size = 64          # rollouts per iteration
  t.seq_len = 128            # prompt + response
  t.lr = 2e-5
  t.warmup_steps = 5
  t.schedule = 'constant'
  t.weight_decay = 0.0
  t.eval_every = 25
  t.checkpoint_every = 25
  t.log_every = 1

  p = c.ppo = ml_collections.ConfigDict()
  p.init_from = ''           # the SFT run: initial policy and frozen reference (required)
  p.reward_from = ''         # a finished reward-model run (required)
  p.kl_coef = 0.05           # per-token KL penalty coefficient (its start value when adaptive)
  p.kl_target = 0.0          # > 0: adapt kl_coef towards this KL per response (Ziegler et al.)
  p.kl_horizon = 10000
  p.epochs = 4               # passes over each rollout batch
  p.minibatch = 16           # rollouts per optimizer step; divides train.batch_size
  p.clip = 0.2               # ratio clip
  p.value_clip = 0.2
  p.vf_coef = 0.5
  p.value_lr_ratio = 5.0     # the value network's learning rate is this multiple of train.lr
  p.gamma = 1.0
  p.lam = 0.95
  p.temperature = 1.0        # rollouts and log-probabilities at this temperature
  p.max_new_tokens = 48
  p.eval_prompts = 200       # held-out prompts sampled at each evaluation
  p.eval_samples = 2
  p.sample_batch = 128

  lo = c.lora = ml_collections.ConfigDict()
  lo.rank = 0                # 0 trains every weight of the policy; r > 0 trains rank-r adapters
  lo.alpha = 16.0            # the adapter update is scaled by alpha / rank
  lo.targets = 'q,k,v,o,up,down'   # any of q, k, v, o (attention), up, gate, down (MLP)
  return c
