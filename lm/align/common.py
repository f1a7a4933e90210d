"""What the preference stages share: policies, prompt + response rows, log-probabilities,
scalar heads (reward and value), sampling responses, and evaluation against the gold reward.

Rows. A (prompt, response) pair is one row of `seq_len` token ids: the prompt in the chat template
up to the opening <|assistant|> marker, then the response's ids (ending with <|end|> when the
policy ended its turn), then pad ids. Position t's target is id t+1, and `mask` [B, seq_len - 1]
marks the targets that belong to the response. Pads come after every real id, so causality keeps
them from changing anything before them. `last` [B] indexes the last response id: what a scalar
head (reward model) reads.

Log-probabilities at temperature T are log softmax(logits / T): the distribution the sampler
draws from at that temperature (lm/eval/sample.py), so a policy's ratios and KL terms are of what it
actually sampled.

Scalar heads: {'trunk': transformer params, 'head': {'w': [D], 'b': []}}; the score of a position
is hidden(t) . w + b, with hidden the transformer's final normed states (model.apply with
return_hidden).
"""
from __future__ import annotations

import dataclasses
import functools
import json

import jax
import jax.numpy as jnp
import numpy as np

from lm import host
from lm import metrics as metrics_lib
from lm.training import checkpoint as ckpt_lib
from lm.training import loop
from lm.model import transformer as model_lib
from lm import runs
from lm.eval import sample as sample_lib
from lm.data import sft
from lm.data import code_task
from lm.model import lora as lora_lib
from lm.config import ModelConfig, read_section
from lm.errors import UserError


# ---------------------------------------------------------------------------------------------
# Policies and prompts.

@dataclasses.dataclass
class Policy:
  """A language model run loaded for the preference stages."""
  mc: ModelConfig
  params: object
  tokenizer: object
  identity: dict


def load_policy(workdir: str) -> Policy:
  mc, params, tokenizer, identity = runs.load_model(workdir)
  sft.chat_ids(tokenizer)    # a policy must speak the chat template
  return Policy(mc, params, tokenizer, identity)


# ---------------------------------------------------------------------------------------------
# LoRA policies: the adapters train, the starting policy's weights (held once, frozen) are both
# the base the adapters sit on and the reference, which is the adapted model with adapters off.

@dataclasses.dataclass(frozen=True)
class PolicyLora:
  """The `lora` section of a preference stage (keys: configs/ppo.py): rank 0 trains every weight
  of the policy; rank r > 0 trains rank-r adapters on `targets` with the policy's weights frozen."""
  rank: int = 0
  alpha: float = 16.0
  targets: tuple = ('q', 'k', 'v', 'o', 'up', 'down')

  @classmethod
  def from_config(cls, cfg) -> 'PolicyLora':
    c = cls(**read_section(cls, cfg.get('lora'), 'lora'))
    if c.rank < 0:
      raise UserError(f'lora.rank={c.rank} must be >= 1 for a LoRA policy, or 0 to train every '
                      'weight.')
    return c

  def model(self, mc: ModelConfig) -> ModelConfig:
    """The policy's model with adapters (mc itself at rank 0); refuses bad targets or ranks."""
    if not self.rank:
      return mc
    return dataclasses.replace(mc, lora_rank=self.rank, lora_alpha=self.alpha,
                               lora_targets=tuple(self.targets), lora_dropout=0.0, lora_tokens=())


def stage_policy(cfg, init_from: str, stage: str):
  """(starting policy, the model the stage trains: the policy's, with adapters when lora.rank > 0,
  the lora settings) of a preference stage starting from the SFT-like run init_from."""
  lc = PolicyLora.from_config(cfg)
  check_single_process()
  runs.check_finetuned(init_from, stage)
  policy = load_policy(init_from)
  return policy, lc.model(policy.mc), lc


def kl_reference(policy: Policy, init_from: str) -> tuple[str, Policy]:
  """(path, policy) of the SFT run at the root of init_from's chain: what every preference stage
  measures its KL against (the starting policy itself when it is that run)."""
  root = runs.sft_root(init_from)
  return root, policy if root == policy.identity['workdir'] else load_policy(root)


def init_adapters(mc_lora: ModelConfig, seed: int):
  """Fresh adapters of a LoRA model (B = 0: the adapted policy starts equal to its base)."""
  return model_lib.init_variables(mc_lora, jax.random.PRNGKey(seed))[lora_lib.COLLECTION]


def policy_logits(mc: ModelConfig, params, tokens, base=None):
  """Logits of a policy: the full model `params`, or (mc with adapters) the adapters `params`
  on the frozen `base`."""
  if mc.lora_rank:
    return model_lib.apply(mc, base, tokens, adapters=params)
  return model_lib.apply(mc, params, tokens)


def merged_policy(mc: ModelConfig, params, base):
  """The policy as plain weights (sampling, evaluation): params, or base with adapters folded."""
  if mc.lora_rank:
    return _merge(params, base, mc=mc)
  return params


@functools.partial(jax.jit, static_argnames=('mc',))
def _merge(adapters, base, *, mc):
  return lora_lib.merge(mc, base, adapters)


def preference_loss(margin, label_smoothing: float = 0.0):
  """-log sigmoid(margin) per pair: the Bradley-Terry loss of the reward model and of DPO.

  label_smoothing e > 0 takes each label to be wrong with probability e:
  (1 - e) (-log sigmoid(m)) + e (-log sigmoid(-m)), least at m = log((1 - e) / e), so a flipped
  label cannot pull a margin towards infinity (conservative DPO, Mitchell 2023).
  """
  if not label_smoothing:
    return -jax.nn.log_sigmoid(margin)
  return (-(1 - label_smoothing) * jax.nn.log_sigmoid(margin)
          - label_smoothing * jax.nn.log_sigmoid(-margin))


def prompt_ids(tokenizer, prompt: str) -> np.ndarray:
  """A user prompt in the chat template, ending with the opening assistant marker."""
  return sft.encode_chat(tokenizer, [{'role': 'user', 'content': prompt}],
                         generation_prompt=True)[0]


def response_ids(tokenizer, text: str, ended: bool = True) -> np.ndarray:
  """A response's ids, closed by the end-of-turn marker when `ended`."""
  ids = list(tokenizer.encode(text))
  return np.asarray(ids + ([tokenizer.chat_ids['end']] if ended else []), np.int32)


def response_text(tokenizer, ids) -> str:
  """The text of sampled response ids (up to the end-of-turn marker)."""
  return tokenizer.decode(sample_lib.cut_at_eos(ids, tokenizer.chat_ids['end']))


def task_prompts(split: str, limit: int = 0) -> list[str]:
  """The code task's headers of a split ('train' or 'eval'), at most `limit` (0: all)."""
  ex = code_task.examples()[split]
  return [h for h, _ in (ex[:limit] if limit else ex)]


# ---------------------------------------------------------------------------------------------
# Rows.

def make_rows(prompts: list, responses: list, seq_len: int, pad_id: int) -> dict:
  """{'tokens' [B, seq_len], 'mask' [B, seq_len - 1], 'last' [B]} of prompt + response id pairs."""
  B = len(prompts)
  tokens = np.full((B, seq_len), pad_id, np.int32)
  mask = np.zeros((B, seq_len - 1), np.float32)
  last = np.zeros((B,), np.int32)
  for i, (p, r) in enumerate(zip(prompts, responses)):
    n, m = len(p), len(r)
    if n + m > seq_len:
      raise UserError(f'a prompt of {n} tokens with a response of {m} does not fit seq_len='
                      f'{seq_len}; raise seq_len (up to the model\'s max_len) or lower '
                      'max_new_tokens.')
    if m == 0:
      raise UserError('a response is empty; every response needs at least one token.')
    tokens[i, :n] = p
    tokens[i, n:n + m] = r
    mask[i, n - 1:n + m - 1] = 1.0     # targets n .. n+m-1 are the response
    last[i] = n + m - 1
  return {'tokens': tokens, 'mask': mask, 'last': last}


def epoch_indices(step: int, batch_size: int, n: int, seed: int, salt: int) -> list[int]:
  """The item indices of a step's batch: epoch e visits the n items in a permutation seeded by
  (seed, e, salt), so every batch is a pure function of the step (exact resume)."""
  first, idx = step * batch_size, []
  while len(idx) < batch_size:
    e, at = divmod(first + len(idx), n)
    perm = np.random.default_rng([seed, e, salt]).permutation(n)
    idx.extend(perm[at:at + batch_size - len(idx)].tolist())
  return idx


def minibatch_order(key, n: int, epochs: int, minibatch: int):
  """[epochs * n / minibatch, minibatch] row indices: each epoch a permutation of the n rollouts
  (seeded by key and the epoch), cut into minibatches; the scan of an RL update walks its rows."""
  return jnp.concatenate([jax.random.permutation(jax.random.fold_in(key, e), n)
                          for e in range(epochs)]).reshape(epochs * n // minibatch, minibatch)


def pad_rows(rows: dict, size: int) -> dict:
  """Rows padded with empty copies of row 0 (mask 0) to `size`, for a fixed compiled shape."""
  short = size - len(rows['tokens'])
  if short <= 0:
    return rows
  out = {k: np.concatenate([v, np.repeat(v[:1], short, axis=0)]) for k, v in rows.items()}
  out['mask'][-short:] = 0.0
  return out


# ---------------------------------------------------------------------------------------------
# Log-probabilities and scalar heads (pure; jit them with mc static).

def logprobs_and_entropy(mc: ModelConfig, params, tokens, temperature: float = 1.0, base=None):
  """(log p_T(target t), entropy of p_T at t), both [B, seq_len - 1], for every position (a LoRA
  policy: params are its adapters on `base`, policy_logits)."""
  logits = policy_logits(mc, params, tokens[:, :-1], base) / temperature
  logp_all = jax.nn.log_softmax(logits, axis=-1)
  logp = jnp.take_along_axis(logp_all, tokens[:, 1:, None], axis=-1)[..., 0]
  entropy = -jnp.sum(jnp.exp(logp_all) * logp_all, axis=-1)
  return logp, entropy


def token_logprobs(mc: ModelConfig, params, tokens, temperature: float = 1.0, base=None):
  """log p_T(target t) [B, seq_len - 1] of a policy (a LoRA policy: policy_logits)."""
  if not mc.lora_rank:
    return model_lib.token_logprobs(mc, params, tokens, temperature)
  logits = policy_logits(mc, params, tokens[:, :-1], base) / temperature
  return jnp.take_along_axis(jax.nn.log_softmax(logits, axis=-1), tokens[:, 1:, None],
                             axis=-1)[..., 0]


def sequence_logprob(mc: ModelConfig, params, rows, temperature: float = 1.0, base=None):
  """Summed log-probability of each row's response: [B] (a LoRA policy: policy_logits)."""
  logp = token_logprobs(mc, params, rows['tokens'], temperature, base)
  return jnp.sum(logp * rows['mask'], axis=-1)


def init_head(mc: ModelConfig, trunk) -> dict:
  """A scalar head on a trunk, zero-initialised (its score starts at 0 everywhere)."""
  return {'trunk': trunk, 'head': {'w': jnp.zeros((mc.d_model,), jnp.float32),
                                   'b': jnp.zeros((), jnp.float32)}}


def position_scores(mc: ModelConfig, scalar_params, tokens):
  """The scalar head at every position: [B, T]."""
  h = model_lib.apply(mc, scalar_params['trunk'], tokens, return_hidden=True)
  return h @ scalar_params['head']['w'] + scalar_params['head']['b']


def last_scores(mc: ModelConfig, scalar_params, rows):
  """The scalar head at each row's last response id: [B] (the reward model's score)."""
  s = position_scores(mc, scalar_params, rows['tokens'])
  return jnp.take_along_axis(s, rows['last'][:, None], axis=1)[:, 0]


# ---------------------------------------------------------------------------------------------
# Sampling.

def sample_responses(policy: Policy, prompts: list, max_new_tokens: int, temperature: float,
                     seed: int, batch_size: int) -> list[np.ndarray]:
  """One sampled response (ids, ending with <|end|> if the policy ended its turn) per prompt
  (token ids), in batches of batch_size (the last padded, so one compilation serves all)."""
  end = policy.tokenizer.chat_ids['end']
  out = []
  for i in range(0, len(prompts), batch_size):
    chunk = list(prompts[i:i + batch_size])
    n = len(chunk)
    chunk += [chunk[0]] * (batch_size - n)
    ids = sample_lib.generate_tokens(policy.mc, policy.params, chunk, max_new_tokens,
                                     temperature=temperature, seed=seed * 100_003 + i,
                                     eos_id=end, pad_id=policy.tokenizer.pad_id)
    for row in ids[:n]:
      row = [int(t) for t in row]
      out.append(np.asarray(row[:row.index(end) + 1] if end in row else row, np.int32))
  return out


# ---------------------------------------------------------------------------------------------
# Reward models as loaded by the later stages.

@functools.partial(jax.jit, static_argnames=('mc', 'temperature'))
def jit_sequence_logprob(params, rows, *, mc: ModelConfig, temperature: float = 1.0):
  return sequence_logprob(mc, params, rows, temperature)


@functools.partial(jax.jit, static_argnames=('mc',))
def jit_last_scores(params, rows, *, mc: ModelConfig):
  return last_scores(mc, params, rows)


def batched(fn, rows: dict, batch_size: int, keys=('tokens', 'mask', 'last')) -> np.ndarray:
  """fn(rows chunk) over fixed-size chunks of rows (the last padded), concatenated: [N]."""
  out, n = [], len(rows['tokens'])
  for i in range(0, n, batch_size):
    chunk = pad_rows({k: rows[k][i:i + batch_size] for k in keys}, batch_size)
    out.append(np.asarray(fn(chunk))[:min(batch_size, n - i)])
  return np.concatenate(out)


@dataclasses.dataclass
class RewardModel:
  """A finished reward-model run: its scalar params and the normalisation of its scores."""
  mc: ModelConfig
  params: dict
  tokenizer: object
  mean: float
  std: float
  identity: dict

  def scores(self, rows: dict, batch_size: int) -> np.ndarray:
    """Normalised scores (mean 0, std 1 on the SFT policy's samples) of rows."""
    raw = batched(lambda r: jit_last_scores(self.params, r, mc=self.mc), rows, batch_size)
    return (raw - self.mean) / self.std


def check_compatible(policy: Policy, other_mc: ModelConfig, other_tokenizer, what: str) -> None:
  """A reward model (or reference) must share the policy's tokenizer and model shape."""
  if other_tokenizer.hash != policy.tokenizer.hash:
    raise UserError(f'the {what} has another tokenizer than the policy; train it from the same '
                    'SFT run as the policy.')
  keys = ('vocab_size', 'd_model', 'n_layers', 'n_heads', 'max_len', 'pos')
  diff = [k for k in keys if getattr(other_mc, k) != getattr(policy.mc, k)]
  if diff:
    raise UserError(f'the {what} has another model shape than the policy ({", ".join(diff)} '
                    'differ); train it from the same SFT run as the policy.')


def check_single_process() -> None:
  if jax.process_count() > 1:
    raise UserError('the preference stages run in one process; start them without '
                    'jax.distributed.')


def base_identity(policy: Policy) -> dict:
  """What a stage's config.json records of the run it starts from (a resume checks it)."""
  ident = {k: policy.identity[k] for k in ('workdir', 'step', 'params_sha256', 'tokenizer_hash')}
  ident['model'] = dataclasses.asdict(policy.mc)
  return json.loads(json.dumps(ident))     # tuples as lists, as config.json reads back


def manifest(policy: Policy, n: dict, extra: dict) -> dict:
  """A preference stage's manifest.json."""
  return dict(host.device_manifest(), params=n['total'], params_nonembed=n['nonembed'],
              model=dataclasses.asdict(policy.mc), base=policy.identity, **extra)


def initial_state(make_params, optimizer, extra=None):
  """(jitted init_state, abstract state on one device) of a train state {'params', 'opt_state',
  'step'} plus `extra` entries ({name: () -> array})."""
  def init_state():
    state = loop.new_state(make_params(), optimizer)
    state.update({k: f() for k, f in (extra or {}).items()})
    return state
  return jax.jit(init_state), ckpt_lib.on_one_device(jax.eval_shape(init_state))


def read_json(path: str, fix: str = 'restore it, or rerun the command that wrote it') -> dict:
  """A JSON state file (a run's summary.json ...) through metrics.read_json_object."""
  return metrics_lib.read_json_object(path, fix)


# ---------------------------------------------------------------------------------------------
# Evaluation against the gold reward.

def gold_scores(headers: list[str], texts: list[str]) -> np.ndarray:
  return np.asarray([code_task.gold(h, t) for h, t in zip(headers, texts)], np.float64)


@dataclasses.dataclass
class Evaluator:
  """Scores a policy on fixed held-out prompts: gold and proxy reward of its samples, and the
  Monte Carlo KL to a reference (the mean over samples of sum_t log p - log p_ref)."""
  headers: list
  ref: Policy
  rm: RewardModel | None
  seq_len: int
  max_new_tokens: int
  temperature: float
  batch_size: int
  samples: int = 1
  seed: int = 1234

  def __post_init__(self):
    self.prompts = [prompt_ids(self.ref.tokenizer, h) for h in self.headers]

  def _seq_logprobs(self, params, rows) -> np.ndarray:
    return batched(lambda r: jit_sequence_logprob(params, r, mc=self.ref.mc,
                                                  temperature=self.temperature),
                   rows, self.batch_size)

  def evaluate(self, params, prefix: str = 'eval_') -> dict:
    pol = dataclasses.replace(self.ref, params=params)
    prompts = [p for p in self.prompts for _ in range(self.samples)]
    headers = [h for h in self.headers for _ in range(self.samples)]
    resp = sample_responses(pol, prompts, self.max_new_tokens, self.temperature, self.seed,
                            self.batch_size)
    texts = [response_text(self.ref.tokenizer, r) for r in resp]
    rows = make_rows(prompts, resp, self.seq_len, self.ref.tokenizer.pad_id)
    kl = self._seq_logprobs(params, rows) - self._seq_logprobs(self.ref.params, rows)
    out = {f'{prefix}gold': float(gold_scores(headers, texts).mean()),
           f'{prefix}kl': float(kl.mean()),
           f'{prefix}length': float(np.mean([len(r) for r in resp]))}
    if self.rm is not None:
      out[f'{prefix}proxy'] = float(self.rm.scores(rows, self.batch_size).mean())
    return out


def best_of_n(policy: Policy, rm: RewardModel, headers: list[str], ns: tuple, seq_len: int,
              max_new_tokens: int, temperature: float, batch_size: int, seed: int = 4321
              ) -> dict:
  """Best-of-n sampling with the reward model: for each n in `ns`, the response with the highest
  score among the first n samples per prompt. {n: {'gold', 'proxy', 'kl'}}, where kl is the
  closed form log n - (n - 1) / n of the best-of-n distribution's KL to the policy (Stiennon et
  al. 2020, appendix G.3; exact when the n samples are distinct)."""
  tok = policy.tokenizer
  prompts = [prompt_ids(tok, h) for h in headers]
  golds, scores = [], []
  for k in range(max(ns)):
    resp = sample_responses(policy, prompts, max_new_tokens, temperature, seed + 7919 * k,
                            batch_size)
    golds.append(gold_scores(headers, [response_text(tok, r) for r in resp]))
    scores.append(rm.scores(make_rows(prompts, resp, seq_len, tok.pad_id), batch_size))
  golds, scores = np.stack(golds), np.stack(scores)        # [samples, prompts]
  out = {}
  for n in ns:
    pick = np.argmax(scores[:n], axis=0)
    cols = np.arange(len(headers))
    out[n] = {'gold': float(golds[pick, cols].mean()), 'proxy': float(scores[pick, cols].mean()),
              'kl': float(np.log(n) - (n - 1) / n)}
  return out
