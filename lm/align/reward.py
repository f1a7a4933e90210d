"""The reward model: a transformer with a scalar head, trained on preference pairs.

`train_reward(cfg, workdir)` (python run.py reward --config=configs/reward.py ...):
  1. loads the SFT run named by reward.init_from (the policy whose samples are judged);
  2. gets its pairs: reward.pairs names a JSONL file of {"prompt", "chosen", "rejected"}, or, left
     empty, pairs are sampled from the SFT policy on the code task's training headers and labelled
     by the gold program with reward.noise label noise (lm/align/pairs.py); held-out pairs come
     from reward.eval_pairs or are sampled on held-out headers with gold labels. Both are written
     into the workdir (pairs.jsonl, pairs_eval.jsonl), and a rerun reads them back;
  3. trains the trunk (initialised from the SFT weights) and a zero-initialised scalar head read at
     the last response token with the Bradley-Terry loss, -log sigmoid(r(chosen) - r(rejected)),
     through the one training loop (lm/training/loop.py): checkpoints, exact resume, metrics, SIGTERM;
  4. evaluates the held-out pair accuracy (against gold labels, for sampled pairs) and, at the end,
     the mean and standard deviation of its scores on the SFT policy's own samples (the training
     pairs' responses): later stages use (score - mean) / std, rewards of mean 0 and std 1.

`load(workdir)` gives a finished reward model as a common.RewardModel.
"""
from __future__ import annotations

import dataclasses
import json
import os
import sys

import jax
import jax.numpy as jnp
import numpy as np

from lm.model import flops as flops_lib
from lm import lock as lock_lib
from lm.training import loop
from lm import runs
from lm.align import common
from lm.align import pairs as pairs_lib
from lm.config import read_section
from lm.errors import UserError
from lm.training.optim import TrainConfig, make_optimizer

PAIRS, EVAL_PAIRS = 'pairs.jsonl', 'pairs_eval.jsonl'
NORM_SAMPLES = 1024        # SFT responses the score normalisation is measured on


@dataclasses.dataclass(frozen=True)
class RewardConfig:
  """The `reward` section (keys and meanings: configs/reward.py)."""
  init_from: str
  pairs: str
  eval_pairs: str
  prompts: int
  eval_prompts: int
  samples_per_prompt: int
  pairs_per_prompt: int
  noise: float
  label_smoothing: float
  max_new_tokens: int
  temperature: float
  sample_batch: int

  @classmethod
  def from_config(cls, section) -> 'RewardConfig':
    c = cls(**read_section(cls, section, 'reward', defaults={'label_smoothing': 0.0}))
    if not c.init_from:
      raise UserError('reward.init_from is empty; name the SFT run whose samples are judged, '
                      'e.g. --config.reward.init_from=runs/sft_code.')
    if not 0 <= c.noise < 0.5:
      raise UserError(f'reward.noise={c.noise} must be in [0, 0.5) (the share of flipped labels).')
    if not 0 <= c.label_smoothing < 0.5:
      raise UserError(f'reward.label_smoothing={c.label_smoothing} must be in [0, 0.5) (the share '
                      'of training labels assumed flipped).')
    for key in ('samples_per_prompt', 'pairs_per_prompt', 'max_new_tokens', 'sample_batch',
                'eval_prompts'):
      if int(getattr(c, key)) < 1:
        raise UserError(f'reward.{key}={getattr(c, key)} must be a positive integer.')
    if c.samples_per_prompt < 2:
      raise UserError('reward.samples_per_prompt must be at least 2 to form a pair.')
    if c.prompts < 0:
      raise UserError(f'reward.prompts={c.prompts} must be >= 0 (0: every training header).')
    if not c.temperature > 0:
      raise UserError(f'reward.temperature={c.temperature} must be positive.')
    return c


def bradley_terry(chosen, rejected, label_smoothing: float = 0.0):
  """Per-pair Bradley-Terry loss -log sigmoid(chosen - rejected).

  label_smoothing e > 0 takes each label to be wrong with probability e:
  (1 - e) (-log sigmoid(m)) - e log sigmoid(-m) for the margin m, so that a flipped label cannot
  pull a margin towards infinity (the loss is least at m = log((1 - e) / e)).
  """
  return common.preference_loss(chosen - rejected, label_smoothing)


def pair_loss(mc, params, batch, label_smoothing: float = 0.0):
  """(loss sum, (pairs, {'accuracy', 'margin'} sums)) of a batch of chosen then rejected rows."""
  scores = common.last_scores(mc, params, batch)
  B = scores.shape[0] // 2
  margin = scores[:B] - scores[B:]
  w = batch['weight'][:B]
  return (jnp.sum(bradley_terry(scores[:B], scores[B:], label_smoothing) * w),
          (jnp.sum(w), {'accuracy': jnp.sum((margin > 0) * w), 'margin': jnp.sum(margin * w)}))


def get_pairs(rc: RewardConfig, policy: common.Policy, workdir: str, seed: int, seq_len: int):
  """(train pairs, eval pairs, statistics): read from the configured files or the workdir, or
  sampled and written into the workdir."""
  stats = {}
  tok = policy.tokenizer
  paths = {PAIRS: rc.pairs, EVAL_PAIRS: rc.eval_pairs}
  got = {}
  for name, given in paths.items():
    here = os.path.join(workdir, name)
    if given:
      got[name] = pairs_lib.read_pairs(given)
    elif os.path.exists(here):
      got[name] = pairs_lib.read_pairs(here)
    else:
      split = 'train' if name == PAIRS else 'eval'
      headers = common.task_prompts(split, rc.prompts if split == 'train' else rc.eval_prompts)
      made, st = pairs_lib.sample_to_file(
          here, policy, headers, split, 'reward', rc.samples_per_prompt,
          rc.noise if split == 'train' else 0.0, rc.max_new_tokens, rc.temperature,
          seed + (split == 'eval'), rc.sample_batch,
          rc.pairs_per_prompt if split == 'train' else 1)
      got[name] = made
      stats[split] = st
  out = []
  for name in (PAIRS, EVAL_PAIRS):
    keep, dropped = pairs_lib.fitting(tok, got[name], seq_len)
    if not keep:
      raise UserError(f'every pair of {name} is longer than train.seq_len={seq_len} tokens; raise '
                      'seq_len or shorten the responses.')
    if dropped:
      print(f'note: {dropped} pairs of {name} are longer than train.seq_len={seq_len} tokens and '
            'were left out.', file=sys.stderr, flush=True)
    out.append(keep)
  return out[0], out[1], stats


def build(cfg, workdir: str) -> loop.Stage:
  seed = int(cfg.seed)
  tc = TrainConfig.from_config(cfg.train, 'reward')
  rc = RewardConfig.from_config(cfg.reward)
  common.check_single_process()
  runs.check_finetuned(rc.init_from, 'the reward model', kl=False)
  policy = common.load_policy(rc.init_from)
  mc = policy.mc
  tc.check_fits(mc.max_len, "the SFT model's max_len")
  config = json.loads(cfg.to_json())
  config['base'] = common.base_identity(policy)
  loop.check_config(workdir, config)
  train_pairs, eval_pairs, pair_stats = get_pairs(rc, policy, workdir, seed, tc.seq_len)
  tok = policy.tokenizer
  rows = pairs_lib.pair_rows(tok, train_pairs, tc.seq_len)
  eval_rows = pairs_lib.pair_rows(tok, eval_pairs, tc.seq_len)
  n_pairs = len(train_pairs)
  B = tc.batch_size

  def batch(step: int) -> dict:
    idx = common.epoch_indices(step, B, n_pairs, seed, 0xB7)
    return jax.device_put(pairs_lib.stack(rows, np.asarray(idx)))

  shapes = jax.eval_shape(lambda p: common.init_head(mc, p), policy.params)
  optimizer = make_optimizer(tc, shapes, model=mc)
  init_state, abstract_state = common.initial_state(lambda: common.init_head(mc, policy.params),
                                                    optimizer)

  eps = rc.label_smoothing
  train_step = jax.jit(loop.make_step(lambda p, _, b, r: pair_loss(mc, p, b, eps), tc, optimizer,
                                      seed), donate_argnums=0)

  def scores(params, r: dict) -> np.ndarray:
    return common.batched(lambda c: common.jit_last_scores(params, c, mc=mc), r, 2 * B)

  # Normalisation: the SFT policy's own responses (both sides of the first training pairs).
  norm_idx = np.arange(min(n_pairs, NORM_SAMPLES // 2))
  norm_rows = {k: np.concatenate([rows['chosen'][k][norm_idx], rows['rejected'][k][norm_idx]])
               for k in ('tokens', 'mask', 'last')}

  def evaluate(params, _frozen) -> dict:
    c, r = scores(params, eval_rows['chosen']), scores(params, eval_rows['rejected'])
    margin = c - r
    s = scores(params, norm_rows)
    return {'eval_loss': float(np.mean(np.logaddexp(0.0, -margin))),
            'eval_accuracy': float(np.mean(margin > 0)), 'eval_margin': float(np.mean(margin)),
            'score_mean': float(s.mean()), 'score_std': float(max(s.std(), 1e-6))}

  n = flops_lib.param_counts(policy.params)
  fpt = flops_lib.flops_per_token(mc, tc.seq_len, n['total'], n['nonembed'])
  data_info = {'train_pairs': n_pairs, 'eval_pairs': len(eval_pairs), 'sampling': pair_stats,
               'train_flipped': int(sum(p.get('flipped', False) for p in train_pairs))}

  def summary(last: dict) -> dict:
    return {'reward': {'eval_accuracy': last.get('eval_accuracy'),
                       'eval_margin': last.get('eval_margin'),
                       'norm': {'mean': last.get('score_mean'), 'std': last.get('score_std')},
                       **data_info}}

  return loop.Stage(
      config=config, train=tc, dtype=mc.dtype,
      manifest=lambda: common.manifest(policy, n, {'pairs': data_info}), tokenizer=tok,
      abstract_state=abstract_state, init_state=init_state,
      frozen=None, train_step=train_step, batch=batch, evaluate=evaluate,
      tokens_per_step=2 * B * tc.seq_len, flops_per_token=fpt, n_params=n, summary=summary)


def train_reward(cfg, workdir: str, stop_at: int | None = None) -> dict:
  """Trains (or resumes) the reward model in workdir; returns the summary."""
  with lock_lib.hold(workdir):   # build may write the sampled pairs before the loop starts
    return loop.run(build(cfg, workdir), workdir, stop_at)


def load(workdir: str) -> common.RewardModel:
  """A finished reward-model run, with its score normalisation."""
  summary = runs.finished_summary(workdir, 'reward-model', 'reward')
  cfg = runs.read_config(workdir)
  if runs.kind(cfg) != 'reward' or 'reward' not in summary:
    raise UserError(f'{workdir} is not a reward-model run; train one with python run.py reward.')
  mc = runs.plain(runs.model_config(cfg))
  tokenizer = runs.load_tokenizer(workdir)
  params, step = runs.restore_params(workdir, runs.PARAMS_KEYS['reward'])
  norm = summary['reward']['norm']
  ident = {'workdir': os.path.abspath(workdir), 'step': int(step),
           'params_sha256': runs.params_hash(params)}
  return common.RewardModel(mc, params, tokenizer, float(norm['mean']), float(norm['std']), ident)
