"""A reward model on preference pairs of the code-body task (lm/align/reward.py).

  python run.py reward --config=configs/reward.py --workdir=runs/rm \
      --config.reward.init_from=runs/sft_code

The model comes from the SFT run (its trunk, plus a scalar head); train and seed mean what they
mean in configs/base.py, with train.batch_size counted in pairs.
"""
import ml_collections

from configs import base


def get_config() -> ml_collections.ConfigDict:
  c = ml_collections.ConfigDict()
  c.seed = 0
  c.train = base.get_config().train
  t = c.train
  t.steps = 1200
  t.batch_size = 32          # pairs per step (64 sequences)
  t.seq_len = 128            # prompt + response, at most the SFT model's max_len
  t.lr = 1e-4
  t.warmup_steps = 30
  t.weight_decay = 0.0
  t.eval_every = 100
  t.checkpoint_every = 100

  r = c.reward = ml_collections.ConfigDict()
  r.init_from = ''           # the SFT run (required)
  r.pairs = ''               # a JSONL of {"prompt", "chosen", "rejected"}; '' samples them
  r.eval_pairs = ''          # held-out pairs; '' samples them on held-out prompts, gold-labelled
  r.prompts = 0              # training prompts to sample pairs on (0: every training header)
  r.eval_prompts = 400       # held-out prompts to sample evaluation pairs on
  r.samples_per_prompt = 16  # responses sampled per prompt; two of different gold make a pair
  r.pairs_per_prompt = 8     # at most this many pairs per training prompt, no response reused
  r.noise = 0.1              # share of training labels flipped (rater disagreement)
  r.label_smoothing = 0.1    # share of training labels the Bradley-Terry loss assumes flipped
  r.max_new_tokens = 48      # response length limit when sampling
  r.temperature = 1.0        # sampling temperature of the SFT policy
  r.sample_batch = 128       # prompts sampled at once
  return c
