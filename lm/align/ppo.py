"""RLHF with PPO (Schulman et al. 2017; Ziegler et al. 2019; Ouyang et al. 2022).

One training step of the loop (lm/training/loop.py) is one PPO iteration:

  1. Rollouts. train.batch_size training prompts (a pure function of the step) are answered by
     the policy through the KV-cache sampler at ppo.temperature, seeded by (seed, step).
  2. Scoring, with no gradient: the policy's log-probabilities of its own tokens at that
     temperature (the "old" log-probabilities), the frozen reference's (the SFT model), the value
     network's estimate at every position, and the reward model's normalised score of the whole
     response (read at its last token). The gold reward of every response is computed too, on the
     host; it is logged, never trained on.
  3. Rewards per response token t: -kl_coef * (log pi(t) - log ref(t)), plus the reward model's
     score on the last token. Advantages by GAE (gamma, lambda) over the response tokens, returns
     = advantages + values, advantages whitened over the batch's response tokens.
  4. ppo.epochs passes over the rollouts in shuffled minibatches of ppo.minibatch responses, each
     a step of AdamW on the clipped surrogate -min(ratio A, clip(ratio, 1 +- clip) A) for the
     policy and the clipped value loss 0.5 max((V - R)^2, (V_old + clip(V - V_old) - R)^2) for
     the value network. The first minibatch of every rollout sees the parameters that sampled it,
     so its ratio is 1 up to float rounding (logged as ratio_dev_first).

The value network is separate from the policy: a copy of the reward model's trunk with a
zero-initialised scalar head (as in InstructGPT), trained with its own optimizer at
train.lr * ppo.value_lr_ratio. kl_coef is fixed, or adaptive (ppo.kl_target > 0): after each
iteration it is multiplied by 1 + clip(KL / target - 1, -0.2, 0.2) * batch / horizon, and it is
part of the checkpointed state, so a resumed run continues bitwise.

LoRA (lora.rank > 0, common.PolicyLora): the policy's part of the train state is its adapters
alone; the SFT weights are held once, as frozen['ref']: with the adapters they are the policy,
without them the reference, so no second copy of the policy's weights exists. Rollouts and
evaluation sample the merged weights, and config.json's base.model is the adapted model, so
runs.load_model reads the run as its adapters merged into the SFT run. The value network stays a
full copy of the reward model's trunk (with its own full optimizer state): only the policy is
adapted.
"""
from __future__ import annotations

import dataclasses
import functools
import json

import jax
import jax.numpy as jnp
import numpy as np
import optax

from lm.model import flops as flops_lib
from lm.training import loop
from lm.align import common
from lm.model import lora as lora_lib
from lm.model import transformer as model_lib
from lm.config import read_section
from lm.errors import UserError
from lm.training.optim import TrainConfig, make_optimizer
from lm.align import reward as reward_lib



@dataclasses.dataclass(frozen=True)
class PpoConfig:
  """The `ppo` section (keys and meanings: configs/ppo.py)."""
  init_from: str
  reward_from: str
  kl_coef: float
  kl_target: float
  kl_horizon: int
  epochs: int
  minibatch: int
  clip: float
  value_clip: float
  vf_coef: float
  value_lr_ratio: float
  gamma: float
  lam: float
  temperature: float
  max_new_tokens: int
  eval_prompts: int
  eval_samples: int
  sample_batch: int

  @classmethod
  def from_config(cls, s, batch_size: int) -> 'PpoConfig':
    c = cls(**read_section(cls, s, 'ppo'))
    if not c.init_from:
      raise UserError('ppo.init_from is empty; name the SFT run to start from, e.g. '
                      '--config.ppo.init_from=runs/sft_code.')
    if not c.reward_from:
      raise UserError('ppo.reward_from is empty; name a finished reward-model run, e.g. '
                      '--config.ppo.reward_from=runs/rm.')
    if not c.kl_coef >= 0:
      raise UserError(f'ppo.kl_coef={c.kl_coef} must be >= 0 (0 switches the KL penalty off).')
    if c.kl_target < 0 or c.kl_horizon < 1:
      raise UserError(f'ppo.kl_target={c.kl_target} must be >= 0 (0: a fixed kl_coef) and '
                      f'ppo.kl_horizon={c.kl_horizon} positive.')
    for key in ('epochs', 'minibatch', 'max_new_tokens', 'eval_prompts', 'eval_samples',
                'sample_batch'):
      if getattr(c, key) < 1:
        raise UserError(f'ppo.{key}={getattr(c, key)} must be a positive integer.')
    if batch_size % c.minibatch:
      raise UserError(f'the rollout batch train.batch_size={batch_size} is not divisible by '
                      f'ppo.minibatch={c.minibatch}; make it a multiple.')
    if not (c.clip > 0 and c.value_clip > 0 and c.vf_coef >= 0 and c.value_lr_ratio > 0):
      raise UserError('ppo.clip and ppo.value_clip must be positive, ppo.vf_coef >= 0 and '
                      'ppo.value_lr_ratio > 0.')
    if not (0 <= c.gamma <= 1 and 0 <= c.lam <= 1):
      raise UserError(f'ppo.gamma={c.gamma} and ppo.lam={c.lam} must be in [0, 1].')
    if not c.temperature > 0:
      raise UserError(f'ppo.temperature={c.temperature} must be positive.')
    return c


# ---------------------------------------------------------------------------------------------
# The pieces of the objective (pure, [B, T] arrays; mask marks response tokens).

def masked_mean(x, mask):
  return jnp.sum(x * mask) / jnp.maximum(jnp.sum(mask), 1.0)


def token_rewards(logp, ref_logp, mask, score, last_action, kl_coef):
  """Per-token rewards: the KL penalty on every response token, the score on the last one.

  logp, ref_logp, mask: [B, T]; score [B]; last_action [B] the index t of the last response
  token's action (its target position).
  """
  kl = (logp - ref_logp) * mask
  at_last = jax.nn.one_hot(last_action, logp.shape[1], dtype=logp.dtype)
  return -kl_coef * kl + at_last * score[:, None], kl


def gae(rewards, values, mask, gamma: float, lam: float):
  """Generalised advantage estimation over positions (right to left); (advantages, returns).

  A position whose next position is not a response token is terminal (its next value is 0).
  """
  next_values = jnp.concatenate([values[:, 1:] * mask[:, 1:], jnp.zeros_like(values[:, :1])], 1)
  next_mask = jnp.concatenate([mask[:, 1:], jnp.zeros_like(mask[:, :1])], 1)
  deltas = (rewards + gamma * next_values - values) * mask

  def back(carry, xs):
    delta, nm = xs
    adv = delta + gamma * lam * nm * carry
    return adv, adv
  _, adv = jax.lax.scan(back, jnp.zeros(values.shape[0], values.dtype),
                        (deltas.T, next_mask.T), reverse=True)
  adv = adv.T * mask
  return adv, (adv + values) * mask


def whiten(x, mask, eps: float = 1e-8):
  mean = masked_mean(x, mask)
  var = masked_mean((x - mean) ** 2, mask)
  return (x - mean) * jax.lax.rsqrt(var + eps) * mask


def policy_loss(logp, old_logp, advantages, mask, clip: float):
  """(clipped surrogate loss, ratio, clip fraction, approximate KL) over response tokens."""
  log_ratio = logp - old_logp
  ratio = jnp.exp(log_ratio)
  unclipped = -advantages * ratio
  clipped = -advantages * jnp.clip(ratio, 1 - clip, 1 + clip)
  loss = masked_mean(jnp.maximum(unclipped, clipped), mask)
  clipfrac = masked_mean((jnp.abs(ratio - 1) > clip).astype(logp.dtype), mask)
  approx_kl = masked_mean((ratio - 1) - log_ratio, mask)   # k3 of Schulman (2020): >= 0
  return loss, ratio, clipfrac, approx_kl


def value_loss(values, old_values, returns, mask, clip: float):
  clipped = old_values + jnp.clip(values - old_values, -clip, clip)
  return 0.5 * masked_mean(jnp.maximum((values - returns) ** 2, (clipped - returns) ** 2), mask)


# ---------------------------------------------------------------------------------------------
# One iteration's jitted parts (module level with static settings, so that every run in a
# process shares their compilations).

@functools.partial(jax.jit, static_argnames=('mc', 'temperature'))
def _score(params, frozen, rows, rm_mean, rm_std, *, mc, temperature):
  """Old log-probabilities and entropy, reference log-probabilities, values, normalised scores.
  mc is the policy's model (adapters included for a LoRA policy, on frozen['ref'])."""
  plain = lora_lib.base_config(mc)
  logp, entropy = common.logprobs_and_entropy(mc, params['policy'], rows['tokens'], temperature,
                                              frozen['ref'])
  ref = model_lib.token_logprobs(plain, frozen['ref'], rows['tokens'], temperature)
  values = common.position_scores(plain, params['value'], rows['tokens'])[:, :-1]
  raw = common.last_scores(plain, frozen['rm'], rows)
  return {'logp': logp, 'entropy': entropy, 'ref': ref, 'values': values,
          'score': (raw - rm_mean) / rm_std}


@functools.partial(jax.jit, static_argnames=('gamma', 'lam'))
def _advantages(scored, rows, kl_coef, *, gamma, lam):
  """(whitened advantages, returns, per-response KL to the reference)."""
  mask = rows['mask']
  rewards, kl = token_rewards(scored['logp'], scored['ref'], mask, scored['score'],
                              rows['last'] - 1, kl_coef)
  adv, returns = gae(rewards, scored['values'] * mask, mask, gamma, lam)
  return whiten(adv, mask), returns, jnp.sum(kl, axis=1)


def _minibatch_loss(params, base, mb, mc, pc):
  logp, entropy = common.logprobs_and_entropy(mc, params['policy'], mb['tokens'], pc.temperature,
                                              base)
  pg, ratio, clipfrac, approx_kl = policy_loss(logp, mb['logp'], mb['adv'], mb['mask'], pc.clip)
  values = common.position_scores(lora_lib.base_config(mc), params['value'],
                                  mb['tokens'])[:, :-1]
  vf = value_loss(values, mb['values'], mb['returns'], mb['mask'], pc.value_clip)
  dev = jnp.max(jnp.abs(ratio - 1) * mb['mask'])
  return pg + pc.vf_coef * vf, {'pg_loss': pg, 'value_loss': vf, 'clipfrac': clipfrac,
                                'approx_kl': approx_kl, 'ratio_dev': dev,
                                'entropy_new': masked_mean(entropy, mb['mask'])}


@functools.partial(jax.jit, static_argnames=('mc', 'tc', 'pc'))
def _update(params, opt_state, base, data, key, *, mc, tc, pc):
  """pc.epochs passes of shuffled minibatches, one optimizer step each (a lax.scan); base: a
  LoRA policy's frozen weights (None for a full policy)."""
  opts = _optimizers(tc, pc, params, mc)
  grad_fn = jax.value_and_grad(_minibatch_loss, has_aux=True)
  order = common.minibatch_order(key, data['tokens'].shape[0], pc.epochs, pc.minibatch)

  def body(carry, idx):
    params, opt_state = carry
    mb = jax.tree.map(lambda x: x[idx], data)
    (loss, aux), grads = grad_fn(params, base, mb, mc, pc)
    new_opt, new_params = {}, {}
    for k, o in opts.items():
      upd, new_opt[k] = o.update(grads[k], opt_state[k], params[k])
      new_params[k] = jax.tree.map(jnp.add, params[k], upd)
    aux = dict(aux, loss=loss, grad_norm=optax.global_norm(grads['policy']))
    return (new_params, new_opt), aux
  (params, opt_state), aux = jax.lax.scan(body, (params, opt_state), order)
  stats = jax.tree.map(jnp.mean, aux)
  stats['ratio_dev_first'] = aux['ratio_dev'][0]
  return params, opt_state, stats


# ---------------------------------------------------------------------------------------------
# The stage.

def updates_per_iteration(tc: TrainConfig, pc: PpoConfig) -> int:
  return pc.epochs * (tc.batch_size // pc.minibatch)


def per_update_config(tc: TrainConfig, pc: PpoConfig) -> TrainConfig:
  """train.steps and train.warmup_steps count iterations, but the optimizers step once per
  minibatch: their schedule is stretched over every update of the run."""
  u = updates_per_iteration(tc, pc)
  return dataclasses.replace(tc, steps=tc.steps * u, warmup_steps=tc.warmup_steps * u)


def _optimizers(tc: TrainConfig, pc: PpoConfig, shapes, mc=None):
  """AdamW for the policy (model config mc, for μP's rates) and for the value network
  (per_update_config schedules)."""
  per_update = per_update_config(tc, pc)
  value_tc = dataclasses.replace(per_update, lr=tc.lr * pc.value_lr_ratio)
  return {'policy': make_optimizer(per_update, shapes['policy'], model=mc),
          'value': make_optimizer(value_tc, shapes['value'])}


class _Optimizer:
  """Separate optimizers of the policy and the value network, as one init/update pair."""

  def __init__(self, opts):
    self.opts = opts

  def init(self, params):
    return {k: o.init(params[k]) for k, o in self.opts.items()}


def _train_step(policy, mc, rm, pc: PpoConfig, tc: TrainConfig, headers: list, prompts: list,
                seed: int):
  """One PPO step as the training loop calls it: sample responses to a batch of prompts, score
  them, compute advantages, update policy and value, adapt the KL coefficient. Host-side (its
  sampling and metrics are not jitted), so the loop finishes its metrics at once. mc is the
  trained policy's model (policy.mc with adapters for a LoRA policy)."""
  tok, B, T = policy.tokenizer, tc.batch_size, pc.temperature

  def train_step(state, frozen, prompt_idx):
    step = int(state['step'])
    params = state['params']
    batch_prompts = [prompts[i] for i in prompt_idx]
    pol = dataclasses.replace(policy, params=common.merged_policy(mc, params['policy'],
                                                                  frozen['ref']))
    resp = common.sample_responses(pol, batch_prompts, pc.max_new_tokens, T,
                                   seed * 1_000_003 + step, B)
    texts = [common.response_text(tok, r) for r in resp]
    gold = common.gold_scores([headers[i] for i in prompt_idx], texts)
    rows = jax.device_put(common.make_rows(batch_prompts, resp, tc.seq_len, tok.pad_id))
    scored = _score(params, frozen, rows, rm.mean, rm.std, mc=mc, temperature=T)
    adv, returns, kl = _advantages(scored, rows, state['kl_coef'], gamma=pc.gamma, lam=pc.lam)
    data = {'tokens': rows['tokens'], 'mask': rows['mask'], 'logp': scored['logp'],
            'values': scored['values'], 'adv': adv, 'returns': returns}
    key = jax.random.fold_in(jax.random.PRNGKey(seed), step)
    base = frozen['ref'] if mc.lora_rank else None
    new_params, new_opt, stats = _update(params, state['opt_state'], base, data, key, mc=mc,
                                         tc=tc, pc=pc)
    kl_mean = float(jnp.mean(kl))
    kl_coef = state['kl_coef']
    if pc.kl_target > 0:
      err = float(np.clip(kl_mean / pc.kl_target - 1, -0.2, 0.2))
      kl_coef = kl_coef * jnp.float32(1 + err * B / pc.kl_horizon)
    mask = np.asarray(rows['mask'])
    metrics = {k: float(v) for k, v in stats.items() if k != 'ratio_dev'}
    metrics.update(
        proxy_reward=float(jnp.mean(scored['score'])), gold_reward=float(gold.mean()),
        kl=kl_mean, kl_coef=float(state['kl_coef']),
        entropy=float((np.asarray(scored['entropy']) * mask).sum() / mask.sum()),
        response_length=float(mask.sum(1).mean()))
    new_state = {'params': new_params, 'opt_state': new_opt, 'step': state['step'] + 1,
                 'kl_coef': jnp.asarray(kl_coef, jnp.float32)}
    return new_state, metrics
  return train_step


def build(cfg, workdir: str) -> loop.Stage:
  seed = int(cfg.seed)
  tc = TrainConfig.from_config(cfg.train, 'ppo')
  pc = PpoConfig.from_config(cfg.ppo, tc.batch_size)
  policy, mc, lc = common.stage_policy(cfg, pc.init_from, 'PPO')
  tok = policy.tokenizer
  rm = reward_lib.load(pc.reward_from)
  common.check_compatible(policy, rm.mc, rm.tokenizer, 'reward model')
  tc.check_fits(policy.mc.max_len, "the SFT model's max_len")
  config = json.loads(cfg.to_json())
  config['base'] = common.base_identity(policy)
  config['base']['model'] = json.loads(json.dumps(dataclasses.asdict(mc)))
  config['reward_model'] = rm.identity
  loop.check_config(workdir, config)

  headers = common.task_prompts('train')
  prompts = [common.prompt_ids(tok, h) for h in headers]
  longest = max(len(p) for p in prompts)
  if longest + pc.max_new_tokens > tc.seq_len:
    raise UserError(f'the longest prompt ({longest} tokens) plus ppo.max_new_tokens='
                    f'{pc.max_new_tokens} does not fit train.seq_len={tc.seq_len}; lower '
                    'max_new_tokens or raise seq_len.')
  B, T = tc.batch_size, pc.temperature

  def init_params():
    return {'policy': common.init_adapters(mc, seed) if lc.rank else policy.params,
            'value': common.init_head(policy.mc, rm.params['trunk'])}
  shapes = jax.eval_shape(init_params)
  opts = _optimizers(tc, pc, shapes, mc)
  init_state, abstract_state = common.initial_state(
      init_params, _Optimizer(opts), {'kl_coef': lambda: jnp.asarray(pc.kl_coef, jnp.float32)})
  frozen = {'ref': policy.params, 'rm': rm.params}   # ref: a LoRA policy's base, too

  train_step = _train_step(policy, mc, rm, pc, tc, headers, prompts, seed)

  def batch(step: int):
    return common.epoch_indices(step, B, len(prompts), seed, 0x990)

  evaluator = common.Evaluator(common.task_prompts('eval', pc.eval_prompts), policy, rm,
                               tc.seq_len, pc.max_new_tokens, T, pc.sample_batch,
                               samples=pc.eval_samples, seed=seed + 77)

  def evaluate(params, frozen_) -> dict:
    return evaluator.evaluate(common.merged_policy(mc, params['policy'], frozen_['ref']))

  n = flops_lib.param_counts(policy.params)
  fpt = flops_lib.flops_per_token(policy.mc, tc.seq_len, n['total'], n['nonembed'])
  info = {'reward_model': rm.identity, 'kl_coef': pc.kl_coef, 'kl_target': pc.kl_target,
          'train_prompts': len(prompts), 'mode': 'lora' if lc.rank else 'full',
          'trainable_params': lora_lib.tree_size(shapes['policy'])}

  def summary(last: dict) -> dict:
    return {'ppo': {**info, 'after': last}}

  return loop.Stage(
      config=config, train=tc, dtype=policy.mc.dtype,
      manifest=lambda: common.manifest(policy, n, {'ppo': info}), tokenizer=tok,
      abstract_state=abstract_state, init_state=init_state, frozen=frozen,
      train_step=train_step, batch=batch, evaluate=evaluate,
      tokens_per_step=B * tc.seq_len, flops_per_token=fpt, n_params=n, summary=summary,
      defer_metrics=False)


def train_ppo(cfg, workdir: str, stop_at: int | None = None) -> dict:
  """Trains (or resumes) PPO in workdir; returns the summary."""
  return loop.run(build(cfg, workdir), workdir, stop_at)
