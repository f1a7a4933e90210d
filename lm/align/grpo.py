"""GRPO: group relative policy optimisation with verifiable rewards (Shao et al. 2024,
"DeepSeekMath"), no value network.

One training step of the loop (lm/training/loop.py) is one GRPO iteration:

  1. Rollouts. train.batch_size training prompts (a pure function of the step) are each answered
     grpo.group_size times by the policy through the KV-cache sampler at grpo.temperature, seeded
     by (seed, step).
  2. Rewards from a verifier named by grpo.reward, computed on the host:
       arith  addition problems in the instruction set's phrasings (lm/data/instruct.py, family
              'add', grpo.arith_digits digits per operand, held-out instances never trained on):
              1 for the exact sum, else grpo.partial_credit times the share of the sum's digits
              right (aligned from the last digit);
       code   the code-body task's gold program (lm/data/code_task.py: the reward PPO's reward
              model only learns to imitate);
       model  a reward-model run's normalised score (grpo.reward_from) on the code task, the
              gold reward logged beside it.
  3. Advantages, group-relative: within each prompt's group of G rewards, A_i = (r_i - mean) /
     std, the population std of the group (grpo.scale_rewards='group'), of the whole batch
     ('batch') or 1 ('none'); a group whose rewards are all equal teaches nothing and gets A = 0
     (its share is logged as zero_variance). Every response token of sample i has advantage A_i.
  4. grpo.epochs passes over the rollouts in shuffled minibatches of grpo.minibatch responses,
     each an AdamW step on the per-token objective

         -min(ratio A, clip(ratio, 1 +- clip) A) + kl_coef * k3,
         k3 = exp(ref - logp) - (ref - logp) - 1     (Schulman 2020's unbiased, positive estimator
                                                     of KL(pi || ref) from samples of pi)

     averaged over each response's tokens, then over responses (the paper's 1/G sum 1/|o| sum_t;
     grpo.loss_norm='response'), or over every response token of the minibatch ('token').
     ratio = pi / pi_old with pi_old the sampling policy, so the first minibatch of a rollout
     has ratio 1 up to rounding (logged as ratio_dev_first).

The KL to the reference is in the loss, not the reward, and there is no value network: the group
mean is the baseline. The reference is the starting (SFT) policy.

LoRA (lora.rank > 0, common.PolicyLora): the train state holds the adapters alone; the starting
policy's weights are held once, as the frozen input: with the adapters they are the policy, without
them the reference. Rollouts and evaluation sample the merged weights.
"""
from __future__ import annotations

import dataclasses
import functools
import json
from typing import Callable

import jax
import jax.numpy as jnp
import numpy as np
import optax

from lm.align import common
from lm.align import reward as reward_lib
from lm.config import read_section
from lm.data import instruct
from lm.errors import UserError
from lm.model import flops as flops_lib
from lm.model import lora as lora_lib
from lm.model import transformer as model_lib
from lm.training import loop
from lm.training.optim import TrainConfig, make_optimizer

REWARDS = ('arith', 'code', 'model')
SCALE_REWARDS = ('group', 'batch', 'none')
LOSS_NORMS = ('response', 'token')
ARITH_DIGITS = (1, 2, 3)     # the instruction set's numbers go up to 999


@dataclasses.dataclass(frozen=True)
class GrpoConfig:
  """The `grpo` section (keys and meanings: configs/grpo.py)."""
  init_from: str
  reward: str
  reward_from: str
  group_size: int
  kl_coef: float
  clip: float
  scale_rewards: str
  loss_norm: str
  epochs: int
  minibatch: int
  temperature: float
  max_new_tokens: int
  partial_credit: float
  arith_digits: int
  eval_prompts: int
  eval_samples: int
  sample_batch: int

  @classmethod
  def from_config(cls, s, batch_size: int) -> 'GrpoConfig':
    c = cls(**read_section(cls, s, 'grpo'))
    if not c.init_from:
      raise UserError('grpo.init_from is empty; name the SFT run to start from, e.g. '
                      '--config.grpo.init_from=runs/sft.')
    if c.reward not in REWARDS:
      raise UserError(f"grpo.reward={c.reward!r} is not a verifier; use one of "
                      f"{', '.join(REWARDS)}.")
    if (c.reward == 'model') != bool(c.reward_from):
      raise UserError('grpo.reward_from names the reward-model run exactly when grpo.reward='
                      "'model'; set both or neither.")
    if c.group_size < 2:
      raise UserError(f'grpo.group_size={c.group_size} must be at least 2: advantages compare '
                      'the samples of one prompt.')
    for key in ('epochs', 'minibatch', 'max_new_tokens', 'eval_prompts', 'eval_samples',
                'sample_batch'):
      if getattr(c, key) < 1:
        raise UserError(f'grpo.{key}={getattr(c, key)} must be a positive integer.')
    rollouts = batch_size * c.group_size
    if rollouts % c.minibatch:
      raise UserError(f'the {rollouts} rollouts of an iteration (train.batch_size={batch_size} x '
                      f'grpo.group_size={c.group_size}) do not divide into minibatches of '
                      f'grpo.minibatch={c.minibatch}; make them divide.')
    if not c.kl_coef >= 0 or not c.clip > 0:
      raise UserError(f'grpo.kl_coef={c.kl_coef} must be >= 0 and grpo.clip={c.clip} positive.')
    if c.scale_rewards not in SCALE_REWARDS:
      raise UserError(f"grpo.scale_rewards={c.scale_rewards!r} is not known; use one of "
                      f"{', '.join(SCALE_REWARDS)}.")
    if c.loss_norm not in LOSS_NORMS:
      raise UserError(f"grpo.loss_norm={c.loss_norm!r} is not known; use one of "
                      f"{', '.join(LOSS_NORMS)}.")
    if not c.temperature > 0:
      raise UserError(f'grpo.temperature={c.temperature} must be positive.')
    if not 0 <= c.partial_credit < 1:
      raise UserError(f'grpo.partial_credit={c.partial_credit} must be in [0, 1): the most a '
                      'wrong answer can earn.')
    if c.arith_digits not in ARITH_DIGITS:
      raise UserError(f'grpo.arith_digits={c.arith_digits} must be one of '
                      f"{', '.join(map(str, ARITH_DIGITS))}.")
    return c


# ---------------------------------------------------------------------------------------------
# The pieces of the objective (pure).

def group_advantages(rewards, scale: str = 'group') -> np.ndarray:
  """[P, G] rewards -> [P, G] advantages r - group mean, divided by the group's std (scale
  'group', the paper's), by the std of every reward of the batch ('batch') or by nothing
  ('none'; Liu et al. 2025, "Understanding R1-Zero-like training"). A group whose rewards are
  all equal gets 0."""
  if scale not in SCALE_REWARDS:
    raise ValueError(f'scale={scale!r} is not one of {SCALE_REWARDS}')
  r = np.asarray(rewards, np.float64)
  group_std = r.std(axis=1, keepdims=True)
  divisor = {'group': group_std, 'batch': r.std(), 'none': 1.0}[scale]
  return np.where(group_std > 1e-8, (r - r.mean(axis=1, keepdims=True))
                  / np.maximum(divisor, 1e-8), 0.0)


def k3(logp, ref_logp):
  """Per-token estimate of KL(pi || ref) from tokens sampled from pi: exp(d) - d - 1, d = ref -
  logp; >= 0, and its expectation under pi is the KL."""
  d = ref_logp - logp
  return jnp.exp(d) - d - 1.0


def grpo_loss(logp, old_logp, ref_logp, adv, mask, clip: float, kl_coef: float,
              norm: str = 'response'):
  """(loss, metrics) of [B, T] log-probabilities, [B] advantages and the [B, T] response mask.
  norm 'response' averages over each response's tokens, then over responses (every response
  weighs the same, so a short one's tokens weigh more); 'token' averages over every response
  token of the minibatch (Yu et al. 2025, "DAPO")."""
  ratio = jnp.exp(logp - old_logp)
  a = adv[:, None]
  surrogate = jnp.minimum(ratio * a, jnp.clip(ratio, 1 - clip, 1 + clip) * a)
  kl = k3(logp, ref_logp)
  per_token = (-surrogate + kl_coef * kl) * mask
  n = jnp.maximum(jnp.sum(mask), 1.0)
  if norm == 'token':
    loss = jnp.sum(per_token) / n
  else:
    lengths = jnp.maximum(jnp.sum(mask, axis=1), 1.0)
    loss = jnp.mean(jnp.sum(per_token, axis=1) / lengths)
  return loss, {'k3': jnp.sum(kl * mask) / n,
                'clipfrac': jnp.sum((jnp.abs(ratio - 1) > clip) * mask) / n,
                'ratio_dev': jnp.max(jnp.abs(ratio - 1) * mask)}


def arith_reward(text: str, answer: str, partial_credit: float) -> float:
  """1 for the exact answer (surrounding whitespace ignored); else partial_credit times the share
  of the answer's digits the text has right, aligned from the last digit (0 for no number)."""
  got = text.strip()
  if got == answer:
    return 1.0
  if not partial_credit or not got.lstrip('-').isdigit():
    return 0.0
  right = sum(x == y for x, y in zip(reversed(got), reversed(answer)))
  return partial_credit * right / max(len(answer), len(got))


# ---------------------------------------------------------------------------------------------
# Tasks: prompts and their verifier.

@dataclasses.dataclass
class Task:
  """Prompts (text) of one split and their verifier: verify(prompt indices, response texts) ->
  rewards [N]."""
  name: str
  prompts: list
  answers: list            # arith: the sums; code and model: the headers (the gold's input)
  verify: Callable[[list, list], np.ndarray]

  def rewards(self, idx, texts) -> np.ndarray:
    return np.asarray(self.verify(idx, texts), np.float64)


def arith_problems(digits: int, heldout: bool) -> list[tuple[int, int]]:
  """Every (a, b) with `digits`-digit operands on one side of the instruction set's split of
  the 'add' family (instruct.is_heldout), sorted."""
  lo, hi = (0 if digits == 1 else 10 ** (digits - 1)), 10 ** digits
  return [(a, b) for a in range(lo, hi) for b in range(lo, hi)
          if instruct.is_heldout('add', f'{a},{b}') == heldout]


def arith_task(split: str, digits: int, limit: int = 0, partial_credit: float = 0.0,
               seed: int = 0) -> Task:
  """Addition prompts in the training phrasings of the 'add' family: 'train' the training
  instances, 'eval' the held-out ones (limit > 0: that many, drawn once by a fixed seed)."""
  problems = arith_problems(digits, heldout=split == 'eval')
  rng = np.random.default_rng([seed, digits, 0xADD])
  if limit and limit < len(problems):
    problems = [problems[i] for i in np.sort(rng.choice(len(problems), limit, replace=False))]
  templates = instruct.phrasings('add')[:-instruct.HELDOUT_PHRASINGS]
  which = rng.integers(0, len(templates), size=len(problems))
  answers = [str(a + b) for a, b in problems]
  return Task('arith', [templates[k].format(a=a, b=b) for (a, b), k in zip(problems, which)],
              answers, lambda idx, texts: [arith_reward(t, answers[i], partial_credit)
                                           for i, t in zip(idx, texts)])


def code_task(split: str, limit: int = 0) -> Task:
  """The code-body task's headers, rewarded by its gold program."""
  headers = common.task_prompts(split, limit)
  return Task('code', headers, headers,
              lambda idx, texts: common.gold_scores([headers[i] for i in idx], texts))


def make_task(gc: GrpoConfig, split: str, limit: int = 0) -> Task:
  if gc.reward == 'arith':
    return arith_task(split, gc.arith_digits, limit, gc.partial_credit)
  return code_task(split, limit)


# ---------------------------------------------------------------------------------------------
# One iteration's jitted parts (module level with static settings, so that every run in a
# process shares their compilations).

@functools.partial(jax.jit, static_argnames=('mc', 'temperature'))
def _score(policy_params, ref_params, tokens, *, mc, temperature):
  """Old log-probabilities and entropy of the policy, the reference's log-probabilities."""
  logp, entropy = common.logprobs_and_entropy(mc, policy_params, tokens, temperature,
                                              ref_params)
  ref = model_lib.token_logprobs(lora_lib.base_config(mc), ref_params, tokens, temperature)
  return logp, entropy, ref


def _optimizer(tc: TrainConfig, gc: GrpoConfig, shapes, mc=None):
  """AdamW stepping once per minibatch, its schedule stretched over every update of the run
  (model config mc, for μP's rates)."""
  u = updates_per_iteration(tc, gc)
  return make_optimizer(dataclasses.replace(tc, steps=tc.steps * u,
                                            warmup_steps=tc.warmup_steps * u), shapes,
                        model=mc)


def updates_per_iteration(tc: TrainConfig, gc: GrpoConfig) -> int:
  return gc.epochs * (tc.batch_size * gc.group_size // gc.minibatch)


def _minibatch_loss(params, ref_params, mb, mc, gc):
  logp = common.token_logprobs(mc, params, mb['tokens'], gc.temperature, ref_params)
  return grpo_loss(logp, mb['logp'], mb['ref'], mb['adv'], mb['mask'], gc.clip, gc.kl_coef,
                   gc.loss_norm)


@functools.partial(jax.jit, static_argnames=('mc', 'tc', 'gc'))
def _update(params, opt_state, ref_params, data, key, *, mc, tc, gc):
  """gc.epochs passes of shuffled minibatches, one optimizer step each (a lax.scan)."""
  opt = _optimizer(tc, gc, params, mc)
  grad_fn = jax.value_and_grad(_minibatch_loss, has_aux=True)
  order = common.minibatch_order(key, data['tokens'].shape[0], gc.epochs, gc.minibatch)

  def body(carry, idx):
    params, opt_state = carry
    mb = jax.tree.map(lambda x: x[idx], data)
    (loss, aux), grads = grad_fn(params, ref_params, mb, mc, gc)
    upd, opt_state = opt.update(grads, opt_state, params)
    params = optax.apply_updates(params, upd)
    return (params, opt_state), dict(aux, loss=loss, grad_norm=optax.global_norm(grads))
  (params, opt_state), aux = jax.lax.scan(body, (params, opt_state), order)
  stats = jax.tree.map(jnp.mean, aux)
  stats['ratio_dev_first'] = aux['ratio_dev'][0]
  return params, opt_state, stats


# ---------------------------------------------------------------------------------------------
# The stage.

def _train_step(policy, mc, gc: GrpoConfig, tc: TrainConfig, task: Task, prompts: list, rm,
                seed: int):
  """One GRPO iteration as the training loop calls it (host-side: sampling and verifiers)."""
  tok, G, T = policy.tokenizer, gc.group_size, gc.temperature

  def train_step(state, frozen, prompt_idx):
    step = int(state['step'])
    params = state['params']['policy']
    plain = common.merged_policy(mc, params, frozen['ref'])
    pol = dataclasses.replace(policy, params=plain)
    idx = [i for i in prompt_idx for _ in range(G)]
    batch_prompts = [prompts[i] for i in idx]
    resp = common.sample_responses(pol, batch_prompts, gc.max_new_tokens, T,
                                   seed * 1_000_003 + step, gc.sample_batch)
    texts = [common.response_text(tok, r) for r in resp]
    verified = task.rewards(idx, texts)
    rows = common.make_rows(batch_prompts, resp, tc.seq_len, tok.pad_id)
    rewards = verified if rm is None else rm.scores(rows, gc.sample_batch)
    grouped = rewards.reshape(-1, G)
    adv = group_advantages(grouped, gc.scale_rewards).reshape(-1)
    rows = jax.device_put(rows)
    logp, entropy, ref = _score(params, frozen['ref'], rows['tokens'], mc=mc, temperature=T)
    data = {'tokens': rows['tokens'], 'mask': rows['mask'], 'logp': logp, 'ref': ref,
            'adv': jnp.asarray(adv, jnp.float32)}
    key = jax.random.fold_in(jax.random.PRNGKey(seed), step)
    new_params, new_opt, stats = _update(params, state['opt_state'], frozen['ref'], data, key,
                                         mc=mc, tc=tc, gc=gc)
    mask = np.asarray(rows['mask'])
    kl = (np.asarray(logp) - np.asarray(ref)) * mask
    metrics = {k: float(v) for k, v in stats.items() if k != 'ratio_dev'}
    metrics.update(
        reward_mean=float(rewards.mean()), reward_std=float(grouped.std(axis=1).mean()),
        zero_variance=float(np.mean(grouped.std(axis=1) <= 1e-8)),
        kl=float(kl.sum(1).mean()),
        entropy=float((np.asarray(entropy) * mask).sum() / mask.sum()),
        response_length=float(mask.sum(1).mean()))
    metrics['exact' if task.name == 'arith' else 'gold_reward'] = float(
        (verified == 1.0).mean() if task.name == 'arith' else verified.mean())
    new_state = {'params': {'policy': new_params}, 'opt_state': new_opt,
                 'step': state['step'] + 1}
    return new_state, metrics
  return train_step


class ArithEvaluator:
  """A policy on held-out addition problems: greedy exact match, and its samples' reward and
  Monte Carlo KL to the reference (sum over response tokens of log pi - log ref, averaged)."""

  def __init__(self, task: Task, ref: common.Policy, gc: GrpoConfig, seq_len: int, seed: int):
    self.task, self.ref, self.gc, self.seq_len, self.seed = task, ref, gc, seq_len, seed
    self.prompts = [common.prompt_ids(ref.tokenizer, p) for p in task.prompts]

  def _seq_logprobs(self, params, rows) -> np.ndarray:
    return common.batched(lambda r: common.jit_sequence_logprob(
        params, r, mc=self.ref.mc, temperature=self.gc.temperature), rows, self.gc.sample_batch)

  def evaluate(self, params, prefix: str = 'eval_') -> dict:
    gc, tok = self.gc, self.ref.tokenizer
    pol = dataclasses.replace(self.ref, params=params)
    greedy = greedy_texts(pol, self.prompts, gc.max_new_tokens, gc.sample_batch)
    exact = float(np.mean([t.strip() == a for t, a in zip(greedy, self.task.answers)]))
    n = len(self.prompts)
    idx = [i for i in range(n) for _ in range(gc.eval_samples)]
    prompts = [self.prompts[i] for i in idx]
    resp = common.sample_responses(pol, prompts, gc.max_new_tokens, gc.temperature, self.seed,
                                   gc.sample_batch)
    texts = [common.response_text(tok, r) for r in resp]
    rewards = self.task.rewards(idx, texts)
    rows = common.make_rows(prompts, resp, self.seq_len, tok.pad_id)
    kl = self._seq_logprobs(params, rows) - self._seq_logprobs(self.ref.params, rows)
    return {f'{prefix}exact': exact, f'{prefix}reward': float(rewards.mean()),
            f'{prefix}sample_exact': float(np.mean(rewards == 1.0)),
            f'{prefix}kl': float(kl.mean()), f'{prefix}length': float(np.mean([len(r) for r in resp]))}


def greedy_texts(policy: common.Policy, prompts: list, max_new_tokens: int,
                 batch_size: int) -> list[str]:
  """Greedy responses (text up to the end-of-turn marker) to token-id prompts."""
  resp = common.sample_responses(policy, prompts, max_new_tokens, 0.0, 0, batch_size)
  return [common.response_text(policy.tokenizer, r) for r in resp]


def build(cfg, workdir: str) -> loop.Stage:
  seed = int(cfg.seed)
  tc = TrainConfig.from_config(cfg.train, 'grpo')
  gc = GrpoConfig.from_config(cfg.grpo, tc.batch_size)
  policy, mc, lc = common.stage_policy(cfg, gc.init_from, 'GRPO')
  tok = policy.tokenizer
  rm = None
  if gc.reward == 'model':
    rm = reward_lib.load(gc.reward_from)
    common.check_compatible(policy, rm.mc, rm.tokenizer, 'reward model')
  tc.check_fits(policy.mc.max_len, "the SFT model's max_len")
  config = json.loads(cfg.to_json())
  config['base'] = common.base_identity(policy)
  config['base']['model'] = json.loads(json.dumps(dataclasses.asdict(mc)))
  if rm is not None:
    config['reward_model'] = rm.identity
  loop.check_config(workdir, config)

  task = make_task(gc, 'train')
  prompts = [common.prompt_ids(tok, p) for p in task.prompts]
  longest = max(len(p) for p in prompts)
  if longest + gc.max_new_tokens > tc.seq_len:
    raise UserError(f'the longest prompt ({longest} tokens) plus grpo.max_new_tokens='
                    f'{gc.max_new_tokens} does not fit train.seq_len={tc.seq_len}; lower '
                    'max_new_tokens or raise seq_len.')
  B = tc.batch_size

  def init_params():
    if lc.rank:
      return {'policy': common.init_adapters(mc, seed)}
    return {'policy': policy.params}
  shapes = jax.eval_shape(init_params)
  optimizer = _optimizer(tc, gc, shapes['policy'], mc)

  class _Opt:   # the state's opt_state is the policy optimizer's
    init = staticmethod(lambda params: optimizer.init(params['policy']))
  init_state, abstract_state = common.initial_state(init_params, _Opt)
  frozen = {'ref': policy.params}
  train_step = _train_step(policy, mc, gc, tc, task, prompts, rm, seed)

  def batch(step: int):
    return common.epoch_indices(step, B, len(prompts), seed, 0x6790)

  root, kl_ref = common.kl_reference(policy, gc.init_from)
  if gc.reward == 'arith':
    evaluator = ArithEvaluator(make_task(gc, 'eval', gc.eval_prompts), kl_ref, gc, tc.seq_len,
                               seed + 77)
  else:
    evaluator = common.Evaluator(common.task_prompts('eval', gc.eval_prompts), kl_ref, rm,
                                 tc.seq_len, gc.max_new_tokens, gc.temperature, gc.sample_batch,
                                 samples=gc.eval_samples, seed=seed + 77)

  def evaluate(params, frozen_) -> dict:
    return evaluator.evaluate(common.merged_policy(mc, params['policy'], frozen_['ref']))

  n = flops_lib.param_counts(policy.params)
  fpt = flops_lib.flops_per_token(policy.mc, tc.seq_len, n['total'], n['nonembed'])
  info = {'reward': gc.reward, 'group_size': gc.group_size, 'kl_coef': gc.kl_coef,
          'train_prompts': len(prompts), 'kl_reference': root,
          'mode': 'lora' if lc.rank else 'full',
          'trainable_params': lora_lib.tree_size(shapes['policy'])}
  if rm is not None:
    info['reward_model'] = rm.identity

  def summary(last: dict) -> dict:
    return {'grpo': {**info, 'after': last}}

  return loop.Stage(
      config=config, train=tc, dtype=policy.mc.dtype,
      manifest=lambda: common.manifest(policy, n, {'grpo': info}), tokenizer=tok,
      abstract_state=abstract_state, init_state=init_state, frozen=frozen,
      train_step=train_step, batch=batch, evaluate=evaluate,
      tokens_per_step=B * gc.group_size * tc.seq_len, flops_per_token=fpt, n_params=n,
      summary=summary, defer_metrics=False)


def train_grpo(cfg, workdir: str, stop_at: int | None = None) -> dict:
  """Trains (or resumes) GRPO in workdir; returns the summary."""
  return loop.run(build(cfg, workdir), workdir, stop_at)
