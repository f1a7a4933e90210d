"""Direct preference optimisation (Rafailov et al. 2023): the policy learns from the pairs alone.

For a pair (prompt x, chosen y_w, rejected y_l), with the SFT model as the frozen reference,

    loss = -log sigmoid(beta * [(log pi(y_w|x) - log ref(y_w|x)) - (log pi(y_l|x) - log ref(y_l|x))])

where log pi(y|x) sums the response tokens' log-probabilities (the end-of-turn marker included).
beta * (log pi - log ref) is the policy's implicit reward; the logged 'accuracy' is the share of
pairs whose chosen response has the larger implicit reward and 'margin' the mean difference.
At step 0 the policy is the reference, so the loss is exactly log 2.

dpo.sft_weight > 0 adds a ("RPO") term: that weight times the chosen response's negative
log-likelihood per token (Pang et al. 2024, "Iterative Reasoning Preference Optimization"). Plain
DPO only widens the margin, and often by lowering the chosen response's likelihood along with the
rejected one, which moves probability onto responses neither side of any pair contains; the NLL
term keeps the chosen responses likely.

Pairs come from dpo.pairs (a JSONL, e.g. the reward model's pairs.jsonl: offline DPO on the SFT
policy's samples) or, with dpo.pairs empty, are sampled here from the starting policy on the code
task's training headers and labelled by the gold program with dpo.noise label noise, as run.py
reward does (written to pairs.jsonl in the workdir, read back on a rerun). Started from a finished
DPO run, that is a round of iterative ("online") DPO (Xu et al. 2023, "Some things are more CRINGE
than others"; Guo et al. 2024): the new pairs are the current policy's own samples, so they hold
the mistakes it still makes, and the starting policy is the new round's reference. The
evaluation's KL is always to the SFT model the chain of runs began from.

The reference log-probabilities never change, so they are computed once for every pair before
training and travel with the batches: the reference is never held in the train state and costs
no forward pass per step. `train_dpo(cfg, workdir)` runs through the one training loop
(lm/training/loop.py); the evaluation samples the policy on held-out prompts for its gold reward, its KL to
the reference and (with dpo.reward_from) the reward model's score.
"""
from __future__ import annotations

import dataclasses
import json
import os

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
from lm.align import reward as reward_lib

PAIRS = 'pairs.jsonl'      # on-policy pairs sampled by the run itself (dpo.pairs empty)


@dataclasses.dataclass(frozen=True)
class DpoConfig:
  """The `dpo` section (keys and meanings: configs/dpo.py)."""
  init_from: str
  pairs: str
  eval_pairs: str
  beta: float
  label_smoothing: float
  sft_weight: float
  samples_per_prompt: int
  pairs_per_prompt: int
  noise: float
  reward_from: str
  eval_prompts: int
  eval_samples: int
  max_new_tokens: int
  temperature: float
  sample_batch: int

  @classmethod
  def from_config(cls, s) -> 'DpoConfig':
    c = cls(**read_section(cls, s, 'dpo', defaults={
        'sft_weight': 0.0, 'samples_per_prompt': 8, 'pairs_per_prompt': 4, 'noise': 0.1}))
    if not c.init_from:
      raise UserError('dpo.init_from is empty; name the SFT run to start from, e.g. '
                      '--config.dpo.init_from=runs/sft_code.')
    if not 0 <= c.noise < 0.5:
      raise UserError(f'dpo.noise={c.noise} must be in [0, 0.5) (the share of flipped labels).')
    if c.samples_per_prompt < 2 or c.pairs_per_prompt < 1:
      raise UserError(f'dpo.samples_per_prompt={c.samples_per_prompt} must be at least 2 and '
                      f'dpo.pairs_per_prompt={c.pairs_per_prompt} at least 1.')
    if not c.beta > 0:
      raise UserError(f'dpo.beta={c.beta} must be positive (it scales the implicit reward).')
    if not 0 <= c.label_smoothing < 0.5:
      raise UserError(f'dpo.label_smoothing={c.label_smoothing} must be in [0, 0.5) (the share '
                      'of labels assumed flipped).')
    if c.sft_weight < 0:
      raise UserError(f'dpo.sft_weight={c.sft_weight} must be >= 0 (0: plain DPO).')
    for key in ('eval_prompts', 'eval_samples', 'max_new_tokens', 'sample_batch'):
      if getattr(c, key) < 1:
        raise UserError(f'dpo.{key}={getattr(c, key)} must be a positive integer.')
    if not c.temperature > 0:
      raise UserError(f'dpo.temperature={c.temperature} must be positive.')
    return c


def dpo_loss_terms(policy_chosen, policy_rejected, ref_chosen, ref_rejected, beta: float,
                   label_smoothing: float = 0.0):
  """(per-pair loss, implicit reward of chosen, of rejected) from summed log-probabilities.

  label_smoothing e > 0 is conservative DPO (Mitchell 2023): each label is taken to be wrong with
  probability e, loss = (1 - e) (-log sigmoid(m)) + e (-log sigmoid(-m)) for the margin m.
  """
  r_w = beta * (policy_chosen - ref_chosen)
  r_l = beta * (policy_rejected - ref_rejected)
  return common.preference_loss(r_w - r_l, label_smoothing), r_w, r_l


def pair_loss(mc, params, batch, beta: float, label_smoothing: float = 0.0,
              sft_weight: float = 0.0):
  """(loss sum, (pairs, metric sums)) of a batch of chosen then rejected rows."""
  logp = common.sequence_logprob(mc, params, batch)
  B = logp.shape[0] // 2
  loss, r_w, r_l = dpo_loss_terms(logp[:B], logp[B:], batch['ref'][:B], batch['ref'][B:], beta,
                                  label_smoothing)
  w = batch['weight'][:B]
  nll = -logp[:B] / jnp.maximum(jnp.sum(batch['mask'][:B], axis=-1), 1.0)
  if sft_weight:
    loss = loss + sft_weight * nll
  return jnp.sum(loss * w), (jnp.sum(w), {
      'accuracy': jnp.sum((r_w > r_l) * w), 'margin': jnp.sum((r_w - r_l) * w),
      'reward_chosen': jnp.sum(r_w * w), 'reward_rejected': jnp.sum(r_l * w),
      'chosen_nll': jnp.sum(nll * w)})


def _reference_logprobs(mc, params, rows: dict, batch: int) -> np.ndarray:
  return common.batched(lambda r: common.jit_sequence_logprob(params, r, mc=mc), rows, batch)


def _pairs(dc: DpoConfig, tc: TrainConfig, policy, workdir: str, seed: int):
  """The training pairs (a file, or sampled on-policy into the workdir once) and the held-out
  ones, as rows with the reference policy's log-probabilities: (pairs path, sampling info,
  training pairs, pairs dropped as too long, rows, held-out rows or None)."""
  mc, tok, B = policy.mc, policy.tokenizer, tc.batch_size
  pairs_path, sampled = dc.pairs, None
  if not pairs_path:            # on-policy pairs from the starting policy (module docstring)
    pairs_path = os.path.join(workdir, PAIRS)
    if not os.path.exists(pairs_path):
      _, sampled = pairs_lib.sample_to_file(
          pairs_path, policy, common.task_prompts('train'), 'train', 'dpo',
          dc.samples_per_prompt, dc.noise, dc.max_new_tokens, dc.temperature, seed,
          dc.sample_batch, dc.pairs_per_prompt)
  train_pairs, dropped = pairs_lib.fitting(tok, pairs_lib.read_pairs(pairs_path), tc.seq_len)
  if not train_pairs:
    raise UserError(f'every pair of {pairs_path} is longer than train.seq_len={tc.seq_len} '
                    'tokens.')
  rows = pairs_lib.pair_rows(tok, train_pairs, tc.seq_len)
  for side in ('chosen', 'rejected'):
    rows[side]['ref'] = _reference_logprobs(mc, policy.params, rows[side], 2 * B)
  eval_rows = None
  if dc.eval_pairs:
    ev, _ = pairs_lib.fitting(tok, pairs_lib.read_pairs(dc.eval_pairs), tc.seq_len)
    eval_rows = pairs_lib.pair_rows(tok, ev, tc.seq_len)
    for side in ('chosen', 'rejected'):
      eval_rows[side]['ref'] = _reference_logprobs(mc, policy.params, eval_rows[side], 2 * B)
  return pairs_path, sampled, train_pairs, dropped, rows, eval_rows


def _held_out_pairs(eval_loss, params, eval_rows: dict, stack, B: int) -> dict:
  """The DPO loss, accuracy and margin over the held-out pairs, in batches of B."""
  n = len(eval_rows['chosen']['tokens'])
  sums = np.zeros(3)
  for i in range(0, n, B):
    idx = np.arange(i, min(i + B, n))
    b = stack(eval_rows, idx)
    if len(idx) < B:   # pad to the compiled batch with weight-0 pairs
      pad = np.zeros(B - len(idx), int)
      b = stack(eval_rows, np.concatenate([idx, pad]))
      b['weight'][len(idx):B] = 0.0
      b['weight'][B + len(idx):] = 0.0
    total, (w, m) = eval_loss(params, b)
    sums += [float(total), float(m['accuracy']), float(m['margin'])]
  return {'eval_pair_loss': sums[0] / n, 'eval_pair_accuracy': sums[1] / n,
          'eval_pair_margin': sums[2] / n}


def build(cfg, workdir: str) -> loop.Stage:
  seed = int(cfg.seed)
  tc = TrainConfig.from_config(cfg.train, 'dpo')
  dc = DpoConfig.from_config(cfg.dpo)
  common.check_single_process()
  runs.check_finetuned(dc.init_from, 'DPO')
  policy = common.load_policy(dc.init_from)
  mc, tok = policy.mc, policy.tokenizer
  tc.check_fits(mc.max_len, "the SFT model's max_len")
  rm = None
  if dc.reward_from:
    rm = reward_lib.load(dc.reward_from)
    common.check_compatible(policy, rm.mc, rm.tokenizer, 'reward model')
  config = json.loads(cfg.to_json())
  config['base'] = common.base_identity(policy)
  loop.check_config(workdir, config)

  pairs_path, sampled, train_pairs, dropped, rows, eval_rows = _pairs(dc, tc, policy, workdir,
                                                                     seed)
  B = tc.batch_size
  n_pairs = len(train_pairs)

  keys = ('tokens', 'mask', 'last', 'ref')
  stack = lambda r, idx: pairs_lib.stack(r, idx, keys)

  def batch(step: int) -> dict:
    idx = common.epoch_indices(step, B, n_pairs, seed, 0xD70)
    return jax.device_put(stack(rows, np.asarray(idx)))

  optimizer = make_optimizer(tc, jax.eval_shape(lambda: policy.params))
  init_state, abstract_state = common.initial_state(lambda: policy.params, optimizer)
  beta, eps, alpha = dc.beta, dc.label_smoothing, dc.sft_weight
  train_step = jax.jit(loop.make_step(lambda p, _, b, r: pair_loss(mc, p, b, beta, eps, alpha),
                                      tc, optimizer, seed), donate_argnums=0)
  eval_loss = jax.jit(lambda p, b: pair_loss(mc, p, b, beta, eps))   # the DPO loss alone
  root = runs.sft_root(dc.init_from)
  kl_ref = policy if root == policy.identity['workdir'] else common.load_policy(root)
  evaluator = common.Evaluator(common.task_prompts('eval', dc.eval_prompts), kl_ref, rm,
                               tc.seq_len, dc.max_new_tokens, dc.temperature, dc.sample_batch,
                               samples=dc.eval_samples, seed=seed + 77)

  def evaluate(params, _frozen) -> dict:
    out = evaluator.evaluate(params)
    if eval_rows is not None:
      out.update(_held_out_pairs(eval_loss, params, eval_rows, stack, B))
    return out

  n = flops_lib.param_counts(policy.params)
  fpt = flops_lib.flops_per_token(mc, tc.seq_len, n['total'], n['nonembed'])
  info = {'pairs': pairs_path, 'train_pairs': n_pairs, 'dropped_too_long': dropped,
          'beta': beta, 'label_smoothing': eps, 'sft_weight': alpha, 'kl_reference': root}
  if sampled is not None:
    info['sampling'] = sampled

  def summary(last: dict) -> dict:
    return {'dpo': {**info, 'after': last}}

  return loop.Stage(
      config=config, train=tc, dtype=mc.dtype,
      manifest=lambda: common.manifest(policy, n, {'dpo': info}), tokenizer=tok,
      abstract_state=abstract_state, init_state=init_state, frozen=None, train_step=train_step,
      batch=batch, evaluate=evaluate, tokens_per_step=2 * B * tc.seq_len, flops_per_token=fpt,
      n_params=n, summary=summary)


def train_dpo(cfg, workdir: str, stop_at: int | None = None) -> dict:
  """Trains (or resumes) DPO in workdir; returns the summary."""
  with lock_lib.hold(workdir):   # build may write the sampled pairs before the loop starts
    return loop.run(build(cfg, workdir), workdir, stop_at)
