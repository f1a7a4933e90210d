"""Sampling from a model: batched cached generation, continuation log-probabilities.

Generation runs in two jitted calls: `prefill` writes the whole prompt batch into a fresh KV cache
in one forward pass, then `decode_loop` samples one token per step inside a `lax.while_loop` that
stops when every sequence has emitted EOS or `max_new_tokens` is reached.

Padding: prompts are right-padded. Row b of the batch holds its prompt in slots 0..len_b-1 and pad
tokens in slots len_b..P-1 (P the longest prompt, rounded up to a multiple of 16 so that nearby
lengths share one compilation). Causality keeps the prompt from seeing the pads during prefill,
and afterwards the pad slots are marked invalid in the cache, so they are holes nobody attends to.
Every row then appends its new tokens at the shared slots P, P+1, ..., with its own positions
len_b, len_b+1, ...: slot and position differ, and positions are what the model's positional
encodings see (learned and sinusoidal tables, RoPE angles, ALiBi distances). This needs nothing
from the model beyond its cache API with explicit `positions_BT`.

Lengths: the cache has P + max_new_tokens - 1 slots (the last new token is sampled, never fed).
What limits length is positions, not slots: a prompt of n tokens followed by m new ones feeds the
model positions 0..n+m-2. With learned positions these index a table of model.max_len rows, so
n + m - 1 <= max_len is required; the other variants can run past max_len (positions the model was
never trained on, so quality may drop). Every variant requires the prompt itself to fit in max_len.

Text prompts: `generate` puts the EOS id before every prompt. The training stream separates
documents with EOS alone (BOS never occurs in it), so EOS is what the model has seen before the
start of a document; an empty prompt is therefore valid and samples a document from its start.

Sampling (`sample_logits`): temperature 0 is greedy (argmax); otherwise the logits are divided by
the temperature, then top-k, then top-p (nucleus) filtering are applied, and a token is drawn.
A fixed seed gives the same tokens for the same batch.
"""
import functools

import jax
import jax.numpy as jnp
import numpy as np

from lm.model import transformer as model_lib
from lm.data import sft
from lm.config import ModelConfig
from lm.errors import UserError

PAD_MULTIPLE = 16  # prompt and scoring lengths are rounded up to this to reuse compilations


# ---------------------------------------------------------------------------------------------
# Logits filtering and sampling (pure; [..., V] logits).

def apply_top_k(logits, k: int):
  """Keeps the k largest logits (ties with the k-th are kept too), -inf elsewhere; k=0 keeps all."""
  if k <= 0 or k >= logits.shape[-1]:
    return logits
  kth = jax.lax.top_k(logits, k)[0][..., -1:]
  return jnp.where(logits < kth, -jnp.inf, logits)


def apply_top_p(logits, p: float):
  """Keeps the smallest set of most likely tokens whose probability reaches p, -inf elsewhere."""
  return logits if p >= 1.0 else nucleus(logits, p)


def nucleus(logits, p):
  """apply_top_p for p < 1, with p a traced value allowed (per-row settings in serving)."""
  sorted_desc = -jnp.sort(-logits, axis=-1)
  probs = jax.nn.softmax(sorted_desc, axis=-1)
  # Mass strictly before each token; an exclusive cumsum stays monotone under rounding.
  before = jnp.cumsum(probs, axis=-1)
  before = jnp.concatenate([jnp.zeros_like(before[..., :1]), before[..., :-1]], axis=-1)
  n_keep = jnp.sum(before < p, axis=-1, keepdims=True)  # >= 1 since before[0] = 0 < p
  threshold = jnp.take_along_axis(sorted_desc, n_keep - 1, axis=-1)
  return jnp.where(logits < threshold, -jnp.inf, logits)


def sample_logits(rng, logits, temperature: float, top_k: int = 0, top_p: float = 1.0):
  """Token ids [...] drawn from logits [..., V]; temperature 0 is argmax (filters then moot)."""
  if temperature == 0:
    return jnp.argmax(logits, axis=-1).astype(jnp.int32)
  logits = logits.astype(jnp.float32) / temperature
  logits = apply_top_p(apply_top_k(logits, top_k), top_p)
  return jax.random.categorical(rng, logits, axis=-1).astype(jnp.int32)


def check_sampling(temperature, top_k, top_p, num_samples=1, max_new_tokens=1) -> None:
  """Raises UserError for sampling settings outside their ranges."""
  if not temperature >= 0:  # also catches NaN
    raise UserError(f'temperature={temperature} must be >= 0 (0 is greedy decoding).')
  if int(top_k) != top_k or top_k < 0:
    raise UserError(f'top_k={top_k} must be an integer >= 0 (0 keeps every token).')
  if not 0 < top_p <= 1:
    raise UserError(f'top_p={top_p} must be in (0, 1] (1 keeps every token).')
  if int(num_samples) != num_samples or num_samples < 1:
    raise UserError(f'num_samples={num_samples} must be a positive integer.')
  if int(max_new_tokens) != max_new_tokens or max_new_tokens < 0:
    raise UserError(f'max_new_tokens={max_new_tokens} must be an integer >= 0.')


# ---------------------------------------------------------------------------------------------
# Cached generation.

def _round_up(n: int, multiple: int) -> int:
  return -(-n // multiple) * multiple


def padded_len(mc: ModelConfig, n: int) -> int:
  """n rounded up to PAD_MULTIPLE, but within the learned position table."""
  m = _round_up(max(n, 1), PAD_MULTIPLE)
  return max(n, min(m, mc.max_len)) if mc.pos == 'learned' else m


@functools.partial(jax.jit, static_argnames=('mc', 'slots', 'all_logits'))
def prefill(mc: ModelConfig, params, tokens_BP, lengths_B, slots: int, all_logits=False):
  """Writes right-padded prompts into a new cache of `slots` slots.

  Returns (logits, cache): logits [B, V] at each row's last prompt token ([B, P, V] for every
  slot when all_logits); the pad slots are invalid in the cache.
  """
  B, P = tokens_BP.shape
  cache = model_lib.init_cache(mc, B, slots)
  positions_BP = jnp.broadcast_to(jnp.arange(P, dtype=jnp.int32), (B, P))
  logits_BPV, cache = model_lib.apply(mc, params, tokens_BP, positions_BT=positions_BP,
                                      cache=cache)
  real_BS = jnp.arange(slots)[None, :] < lengths_B[:, None]
  cache = cache._replace(valid=cache.valid & real_BS)
  if all_logits:
    return logits_BPV, cache
  last = jnp.take_along_axis(logits_BPV, (lengths_B - 1)[:, None, None], axis=1)[:, 0]
  return last, cache


def decode_step(mc: ModelConfig, params, cache, token_B, position_B):
  """Feeds one token per row at the cache index; returns (logits [B, V], cache)."""
  logits_B1V, cache = model_lib.apply(mc, params, token_B[:, None],
                                      positions_BT=position_B[:, None], cache=cache)
  return logits_B1V[:, 0], cache


@functools.partial(jax.jit, static_argnames=('mc', 'max_new_tokens', 'temperature', 'top_k',
                                             'top_p'))
def decode_loop(mc: ModelConfig, params, cache, logits_BV, lengths_B, rng, eos_id, pad_id, *,
                max_new_tokens: int, temperature: float, top_k: int, top_p: float):
  """Samples up to max_new_tokens per row after prefill; [B, max_new_tokens], pad after EOS.

  eos_id < 0 never stops early (benchmarks). Step t draws with fold_in(rng, t).
  """
  B = logits_BV.shape[0]
  sample = functools.partial(sample_logits, temperature=temperature, top_k=top_k, top_p=top_p)
  first = sample(jax.random.fold_in(rng, 0), logits_BV)
  out_BN = jnp.full((B, max_new_tokens), pad_id, jnp.int32).at[:, 0].set(first)

  def cond(state):
    t, _, _, _, done_B = state
    return (t < max_new_tokens) & ~jnp.all(done_B)

  def body(state):
    t, token_B, cache, out_BN, done_B = state
    # Row b's token t-1 sits at position len_b + t - 1, whatever its slot.
    logits_BV, cache = decode_step(mc, params, cache, token_B, lengths_B + t - 1)
    new_B = sample(jax.random.fold_in(rng, t), logits_BV)
    new_B = jnp.where(done_B, pad_id, new_B)
    out_BN = jax.lax.dynamic_update_slice_in_dim(out_BN, new_B[:, None], t, axis=1)
    return t + 1, new_B, cache, out_BN, done_B | (new_B == eos_id)

  state = (jnp.ones((), jnp.int32), first, cache, out_BN, first == eos_id)
  return jax.lax.while_loop(cond, body, state)[3]


def check_lengths(mc: ModelConfig, longest_prompt: int, max_new_tokens: int) -> None:
  """UserError when a prompt does not fit max_len, or learned positions would run out."""
  if longest_prompt > mc.max_len:
    raise UserError(f'the prompt is {longest_prompt} tokens (counting any start token) but the '
                    f'model was trained on at most model.max_len={mc.max_len}; shorten the prompt.')
  # The last new token is only sampled, never fed, so positions reach n + m - 2.
  if mc.pos == 'learned' and longest_prompt + max_new_tokens - 1 > mc.max_len:
    raise UserError(
        f'the prompt ({longest_prompt} tokens) plus max_new_tokens={max_new_tokens} needs '
        f'positions up to {longest_prompt + max_new_tokens - 2}, past the learned position '
        f'table of model.max_len={mc.max_len}; use max_new_tokens <= '
        f'{mc.max_len - longest_prompt + 1} or a shorter prompt.')


# Positions past model.max_len that sampling may reach with encodings that extrapolate (all but
# learned): a multiple of max_len. It also bounds the KV cache a single request allocates.
EXTRAPOLATE_FACTOR = 4
CACHE_MEMORY_SHARE = 0.5   # of the device's memory, at most, for one request's KV cache


def device_memory_bytes() -> int | None:
  """The memory of the first device, where JAX reports it (GPUs, TPUs; not the CPU)."""
  try:
    return (jax.devices()[0].memory_stats() or {}).get('bytes_limit')
  except Exception:   # backends without memory statistics raise their own errors
    return None


def cap_new_tokens(mc: ModelConfig, prompt_len: int, max_new_tokens: int,
                   rows: int = 1) -> tuple[int, str | None]:
  """(new tokens to generate, a note when max_new_tokens had to be lowered) for `rows` prompts of
  up to prompt_len tokens: learned positions end at model.max_len; other encodings may run past it
  up to EXTRAPOLATE_FACTOR x max_len positions; and the KV cache must fit in CACHE_MEMORY_SHARE of
  the device's memory where that is known. A prompt too long for the model is left to
  check_lengths to refuse."""
  if mc.pos == 'learned':
    allowed, why = mc.max_len - prompt_len + 1, f'learned positions end at model.max_len={mc.max_len}'
  else:
    allowed = EXTRAPOLATE_FACTOR * mc.max_len - prompt_len + 1
    why = f'at most {EXTRAPOLATE_FACTOR} x model.max_len={mc.max_len} positions'
  memory = device_memory_bytes()
  if memory:
    per_slot = rows * mc.n_layers * 2 * mc.n_kv_heads * mc.head_dim * jnp.dtype(mc.dtype).itemsize
    slots = int(CACHE_MEMORY_SHARE * memory // max(per_slot, 1))
    if slots - padded_len(mc, prompt_len) + 1 < allowed:
      allowed = slots - padded_len(mc, prompt_len) + 1
      why = f'the KV cache of {rows} row(s) must fit in {CACHE_MEMORY_SHARE:.0%} of device memory'
  if max_new_tokens <= allowed or allowed < 1:
    return max_new_tokens, None
  return allowed, (f'note: max_new_tokens={max_new_tokens} is more than this model allows after a '
                   f'{prompt_len}-token prompt ({why}); generating at most {allowed}.')


def generate_tokens(mc: ModelConfig, params, prompts, max_new_tokens: int,
                    temperature: float = 1.0, top_k: int = 0, top_p: float = 1.0, seed: int = 0,
                    eos_id: int | None = None, pad_id: int = 0) -> np.ndarray:
  """Continuations of token-id prompts (non-empty sequences): int32 [len(prompts), max_new_tokens].

  Each row stops at eos_id (kept in the output, then pad_id); eos_id None never stops.
  """
  check_sampling(temperature, top_k, top_p, 1, max_new_tokens)
  prompts = [np.asarray(p, np.int32).reshape(-1) for p in prompts]
  if not prompts or max_new_tokens == 0:
    return np.zeros((len(prompts), max_new_tokens), np.int32)
  lengths = np.array([len(p) for p in prompts], np.int32)
  if lengths.min() < 1:
    raise UserError('a token prompt is empty; start every prompt with at least one token '
                    '(generate() adds EOS as the start token).')
  check_lengths(mc, int(lengths.max()), max_new_tokens)
  for p in prompts:
    if p.min() < 0 or p.max() >= mc.vocab_size:
      raise UserError(f'a prompt holds token ids outside [0, {mc.vocab_size}); encode it with '
                      "the run's tokenizer.")
  P = padded_len(mc, int(lengths.max()))
  tokens = np.full((len(prompts), P), pad_id, np.int32)
  for i, p in enumerate(prompts):
    tokens[i, :len(p)] = p
  logits, cache = prefill(mc, params, jnp.asarray(tokens), jnp.asarray(lengths),
                          slots=P + max_new_tokens - 1)
  out = decode_loop(mc, params, cache, logits, jnp.asarray(lengths), jax.random.PRNGKey(seed),
                    jnp.int32(-1 if eos_id is None else eos_id), jnp.int32(pad_id),
                    max_new_tokens=int(max_new_tokens), temperature=float(temperature),
                    top_k=int(top_k), top_p=float(top_p))
  return np.asarray(out)


def cut_at_eos(ids, eos_id: int) -> list[int]:
  """The ids before the first EOS."""
  ids = [int(i) for i in ids]
  return ids[:ids.index(eos_id)] if eos_id in ids else ids


def generate(mc: ModelConfig, params, tokenizer, prompts: list[str], max_new_tokens: int = 200,
             temperature: float = 0.8, top_k: int = 0, top_p: float = 1.0, seed: int = 0,
             num_samples: int = 1) -> list[str]:
  """num_samples continuations (text after the prompt, up to EOS) per prompt, prompt-major."""
  check_sampling(temperature, top_k, top_p, num_samples, max_new_tokens)
  start = [tokenizer.eos_id]
  encoded = [start + list(tokenizer.encode(p)) for p in prompts]
  rows = [ids for ids in encoded for _ in range(num_samples)]
  out = generate_tokens(mc, params, rows, max_new_tokens, temperature, top_k, top_p, seed,
                        eos_id=tokenizer.eos_id, pad_id=tokenizer.pad_id)
  return [tokenizer.decode(cut_at_eos(row, tokenizer.eos_id)) for row in out]


# ---------------------------------------------------------------------------------------------
# Scoring.

# The model's token log-probabilities (lm/model/transformer.py), compiled once per model and shape.
score_tokens = jax.jit(model_lib.token_logprobs, static_argnums=0)


def continuation_logprobs(mc: ModelConfig, params, prompt_ids: list, continuation_ids: list
                          ) -> np.ndarray:
  """Sum of log p(continuation | prompt) per pair, float64 [N]; one right-padded forward pass."""
  pairs = [(np.asarray(p, np.int32).reshape(-1), np.asarray(c, np.int32).reshape(-1))
           for p, c in zip(prompt_ids, continuation_ids, strict=True)]
  if not pairs:
    return np.zeros((0,), np.float64)
  if any(len(p) == 0 for p, _ in pairs):
    raise UserError('a prompt is empty; give at least one token (e.g. EOS) to condition on.')
  longest = max(len(p) + len(c) for p, c in pairs)
  # The last token is only a target, so positions reach longest - 2.
  if mc.pos == 'learned' and longest - 1 > mc.max_len:
    raise UserError(f'prompt plus continuation is {longest} tokens, more than the learned '
                    f'positions allow (model.max_len={mc.max_len} + 1); shorten them.')
  T = padded_len(mc, longest - 1) + 1
  tokens = np.zeros((len(pairs), T), np.int32)
  mask = np.zeros((len(pairs), T - 1), bool)
  for i, (p, c) in enumerate(pairs):
    seq = np.concatenate([p, c])
    tokens[i, :len(seq)] = seq
    mask[i, len(p) - 1:len(seq) - 1] = True  # targets are the continuation's tokens
  picks = np.asarray(score_tokens(mc, params, jnp.asarray(tokens)), np.float64)
  return np.where(mask, picks, 0.0).sum(axis=1)


def continuation_logprob(mc: ModelConfig, params, prompt_ids, continuation_ids) -> float:
  """Sum of log p(continuation | prompt) under the model (0 for an empty continuation)."""
  return float(continuation_logprobs(mc, params, [prompt_ids], [continuation_ids])[0])


# ---------------------------------------------------------------------------------------------
# Command line.

def chat(mc: ModelConfig, params, tokenizer, messages: list[dict], max_new_tokens: int = 200,
         temperature: float = 0.8, top_k: int = 0, top_p: float = 1.0, seed: int = 0,
         num_samples: int = 1) -> list[str]:
  """Replies to a conversation in the chat template (lm/data/sft.py), each cut at <|end|>."""
  check_sampling(temperature, top_k, top_p, num_samples, max_new_tokens)
  ids, _ = sft.encode_chat(tokenizer, messages, generation_prompt=True)
  end = tokenizer.chat_ids['end']
  out = generate_tokens(mc, params, [ids] * num_samples, max_new_tokens, temperature, top_k,
                        top_p, seed, eos_id=end, pad_id=tokenizer.pad_id)
  return [tokenizer.decode(cut_at_eos(row, end)) for row in out]
