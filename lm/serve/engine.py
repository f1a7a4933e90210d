"""Continuous batching: many requests decoded together over one KV cache.

The engine owns a cache of `slots` rows. Each row holds one sequence at a time; a finished
sequence's row is refilled with the next waiting request at once (continuous batching), so
requests of different lengths never wait for each other. One background thread runs the loop:

  admit: a waiting request's prompt is prefilled alone (one forward pass over its prompt, padded
         to a bucket length) and its keys and values are copied into a free row; its first token
         is sampled from the prefill's logits.
  step:  one jitted decode step feeds every row its last token and samples the next, each row
         with its own temperature, top-k, top-p and random key.

The slots of a row: all rows write each step at one shared cache index (the model's cache API).
A row's own tokens are a window of at most model.max_len slots ending at that index; an admitted
prompt is copied so that it ends just below the index, and everything else in the row is marked
invalid, so nothing of the previous sequence is seen. Attention is causal by slot and masked by
validity, and every token carries its own position, so where a window lies does not matter. The
cache has max_len + H slots (H = `headroom`, a quarter of max_len by default) and the index runs
from max_len up; when it reaches the end (or a prompt would not fit below it), every row's window
lies in the max_len slots below the index, and one roll moves them to the front. Every step
attends over all the slots, so a small H keeps steps cheap, and a roll (one copy of the cache)
comes every H steps.

Rows: a new request takes the lowest free row, and a step decodes only rows 0..R-1, R the
smallest power of two (or `slots`) above the highest busy row, so one lone request does not pay
for a full batch.

Compilation: the decode step and the roll have one shape; prefills are padded to bucket lengths
(16, 32, 64, ... up to max_len), and `warmup` compiles every bucket, so no request compiles
anything afterwards.

Sampling equals `lm.eval.sample`'s: token t of a sequence is drawn with fold_in(PRNGKey(seed), t)
from logits divided by the temperature, then top-k, then top-p (temperature 0 is argmax). A
request answered alone and the same request answered beside others get the same tokens.
"""
from __future__ import annotations

import dataclasses
import functools
import secrets
import threading
from collections import deque
from typing import Callable

import jax
import jax.numpy as jnp
import numpy as np

from lm.config import ModelConfig
from lm.errors import UserError
from lm.eval import sample as sample_lib
from lm.model import transformer as model_lib

MIN_BUCKET = 16


def buckets(max_len: int) -> tuple[int, ...]:
  """Prefill lengths: powers of two from MIN_BUCKET, the last one max_len."""
  out, b = [], MIN_BUCKET
  while b < max_len:
    out.append(b)
    b *= 2
  return tuple(out) + (max_len,)


def bucket_for(n: int, max_len: int) -> int:
  return next(b for b in buckets(max_len) if b >= n)


def row_buckets(slots: int) -> tuple[int, ...]:
  """How many rows a decode step runs: powers of two below slots, then slots."""
  out, b = [], 1
  while b < slots:
    out.append(b)
    b *= 2
  return tuple(out) + (slots,)


# ---------------------------------------------------------------------------------------------
# Sampling with per-row settings (traced, so one compilation serves every mix of requests).

def _top_k_row(x_V, k):
  """apply_top_k with a traced k (0 keeps every token)."""
  kth = -jnp.sort(-x_V)[jnp.clip(k - 1, 0, x_V.shape[0] - 1)]
  return jnp.where((k > 0) & (x_V < kth), -jnp.inf, x_V)


def _top_p_row(x_V, p):
  return jnp.where(p < 1.0, sample_lib.nucleus(x_V, p), x_V)


def sample_rows(keys_B, logits_BV, temperature_B, top_k_B, top_p_B):
  """One token per row, row b drawn as sample.sample_logits(keys_B[b], logits_BV[b:b+1], ...)
  draws it alone. The sorts behind top-k and top-p run only when some row asks for them."""
  greedy = jnp.argmax(logits_BV, axis=-1).astype(jnp.int32)
  x = logits_BV.astype(jnp.float32) / jnp.where(temperature_B > 0, temperature_B, 1.0)[:, None]
  x = jax.lax.cond(jnp.any(top_k_B > 0), lambda x: jax.vmap(_top_k_row)(x, top_k_B),
                   lambda x: x, x)
  x = jax.lax.cond(jnp.any(top_p_B < 1.0), lambda x: jax.vmap(_top_p_row)(x, top_p_B),
                   lambda x: x, x)
  drawn = jax.vmap(lambda key, row: jax.random.categorical(key, row[None], axis=-1)[0])(keys_B, x)
  return jnp.where(temperature_B > 0, drawn.astype(jnp.int32), greedy)


# ---------------------------------------------------------------------------------------------
# The jitted pieces. The cache is donated: each call updates it in place.

@functools.partial(jax.jit, static_argnames=('mc',), donate_argnames=('cache',))
def _admit(mc: ModelConfig, params, cache, tokens_1P, length, row, key, temperature, top_k,
           top_p):
  """Prefills one prompt (right-padded to P), copies it into `row` so that its last token sits
  just below the cache index (the pads above are invalid, and overwritten by the row's next
  tokens), and samples its first token. Needs index - length + P <= slots. (token, cache)."""
  P = tokens_1P.shape[1]
  logits_1V, small = sample_lib.prefill(mc, params, tokens_1P, length[None], slots=P)
  start = cache.index - length
  k = jax.lax.dynamic_update_slice(cache.k, small.k, (0, row, start, 0, 0))
  v = jax.lax.dynamic_update_slice(cache.v, small.v, (0, row, start, 0, 0))
  pos = jax.lax.dynamic_update_slice(cache.pos, small.pos, (row, start))
  own = jax.lax.dynamic_update_slice(jnp.zeros_like(cache.valid[0]), small.valid[0], (start,))
  valid = cache.valid.at[row].set(own)
  first = sample_rows(jax.random.fold_in(key, 0)[None], logits_1V, temperature[None], top_k[None],
                      top_p[None])[0]
  return first, cache._replace(k=k, v=v, pos=pos, valid=valid)


@functools.partial(jax.jit, static_argnames=('mc', 'rows'), donate_argnames=('cache',))
def _step(mc: ModelConfig, params, cache, tokens_B, positions_B, keys_B, t_B, temperature_B,
          top_k_B, top_p_B, rows: int):
  """Feeds rows 0..rows-1 their last token and samples their next one (draw t_B); the other
  rows are idle and untouched. Returns (tokens [rows], cache)."""
  B = cache.pos.shape[0]
  sub = cache if rows == B else cache._replace(
      k=cache.k[:, :rows], v=cache.v[:, :rows], pos=cache.pos[:rows], valid=cache.valid[:rows])
  logits_BV, sub = sample_lib.decode_step(mc, params, sub, tokens_B[:rows], positions_B[:rows])
  step_keys = jax.vmap(jax.random.fold_in)(keys_B[:rows], t_B[:rows])
  out = sample_rows(step_keys, logits_BV, temperature_B[:rows], top_k_B[:rows], top_p_B[:rows])
  if rows < B:
    sub = cache._replace(k=cache.k.at[:, :rows].set(sub.k), v=cache.v.at[:, :rows].set(sub.v),
                         pos=cache.pos.at[:rows].set(sub.pos),
                         valid=cache.valid.at[:rows].set(sub.valid), index=sub.index)
  return out, sub


@functools.partial(jax.jit, static_argnames=('window',), donate_argnames=('cache',))
def _roll(cache, window: int):
  """Moves the `window` slots below the index to the front of every row; index = window."""
  shift = cache.index - window
  roll = lambda a, axis: jnp.roll(a, -shift, axis=axis)
  valid = roll(cache.valid, 1) & (jnp.arange(cache.valid.shape[1]) < window)[None]
  return cache._replace(k=roll(cache.k, 2), v=roll(cache.v, 2), pos=roll(cache.pos, 1),
                        valid=valid, index=jnp.asarray(window, jnp.int32))


# ---------------------------------------------------------------------------------------------
# Requests and the engine.

@dataclasses.dataclass
class Request:
  """One sequence to generate. `emit(token_id)` is called for each new token (stop tokens are
  not emitted), then `finish(reason)` once, with 'stop' (a stop token), 'length' (max_tokens) or
  'cancelled'; both run on the engine's thread."""
  prompt: np.ndarray
  max_tokens: int
  emit: Callable[[int], None]
  finish: Callable[[str], None]
  temperature: float = 1.0
  top_k: int = 0
  top_p: float = 1.0
  seed: int | None = None
  stop_ids: tuple = ()
  cancelled: bool = False
  # Filled in by the engine.
  generated: int = 0


class Engine:
  """Serves Requests from a background thread (start()/close())."""

  def __init__(self, mc: ModelConfig, params, slots: int = 32, headroom: int | None = None):
    if int(slots) != slots or slots < 1:
      raise UserError(f'slots={slots} must be a positive integer (sequences decoded together).')
    self.mc, self.params, self.slots = mc, params, int(slots)
    self.window = mc.max_len
    self.size = self.window + (headroom or max(MIN_BUCKET, self.window // 4))
    # Committed to the device like every later (jit-made) cache, so calls hit one cache entry.
    self.cache = jax.device_put(model_lib.init_cache(mc, self.slots, self.size)._replace(
        index=jnp.asarray(self.window, jnp.int32)), jax.devices()[0])
    self.index = self.window      # the cache's index, tracked on the host
    B = self.slots
    self.rows: list[Request | None] = [None] * B
    self.tokens = np.zeros(B, np.int32)
    self.positions = np.zeros(B, np.int32)
    self.draws = np.zeros(B, np.int32)
    self.keys = np.zeros((B, 2), np.uint32)
    self.temperature = np.zeros(B, np.float32)
    self.top_k = np.zeros(B, np.int32)
    self.top_p = np.ones(B, np.float32)
    self.waiting: deque[Request] = deque()
    self.cv = threading.Condition()
    self.thread: threading.Thread | None = None
    self.closing = False
    self.error: BaseException | None = None
    self.steps = 0

  # -- what fits -------------------------------------------------------------------------------
  def room(self, prompt_len: int) -> int:
    """New tokens a prompt of prompt_len tokens leaves room for (the last one is never fed)."""
    return self.window - prompt_len + 1

  def check(self, prompt_len: int, max_tokens: int) -> None:
    if prompt_len < 1:
      raise UserError('the prompt is empty; it must hold at least one token.')
    if prompt_len > self.window:
      raise UserError(f'the prompt is {prompt_len} tokens, more than the context of '
                      f'{self.window} tokens (model.max_len); shorten it.')
    if max_tokens > self.room(prompt_len):
      raise UserError(f'max_tokens={max_tokens} does not fit: the prompt is {prompt_len} tokens '
                      f'and the context {self.window}, which leaves room for at most '
                      f'{self.room(prompt_len)} new tokens.')

  # -- life cycle ------------------------------------------------------------------------------
  def start(self) -> 'Engine':
    self.thread = threading.Thread(target=self._run, name='lm-serve-engine', daemon=True)
    self.thread.start()
    return self

  def close(self) -> None:
    with self.cv:
      self.closing = True
      self.cv.notify_all()
    if self.thread:
      self.thread.join()

  def submit(self, req: Request) -> None:
    self.check(len(req.prompt), req.max_tokens)
    if self.error is not None:
      raise RuntimeError(f'the decoding engine stopped: {self.error!r}')
    if req.seed is None:
      req.seed = secrets.randbits(31)
    with self.cv:
      self.waiting.append(req)
      self.cv.notify()

  def busy(self) -> tuple[int, int]:
    """(rows decoding, requests waiting)."""
    return sum(r is not None for r in self.rows), len(self.waiting)

  def warmup(self) -> None:
    """Compiles the decode step, the roll and every prefill bucket (before start())."""
    for P in buckets(self.window):
      self._admit(0, Request(np.zeros(P, np.int32), 2, lambda t: None, lambda r: None, seed=0))
      self.rows[0] = None
    for rows in row_buckets(self.slots):
      self.rows[rows - 1] = Request(np.zeros(1, np.int32), 2, lambda t: None, lambda r: None)
      self._step()
      self.rows[rows - 1] = None
    self._roll()
    self.cache = self.cache._replace(valid=jnp.zeros_like(self.cache.valid))
    self.steps = 0

  # -- the loop --------------------------------------------------------------------------------
  def _run(self) -> None:
    try:
      while True:
        with self.cv:
          while not self.closing and not self.waiting and not any(self.rows):
            self.cv.wait()
          if self.closing:
            break
          admit = []
          for row in range(self.slots):
            if self.rows[row] is None and self.waiting:
              admit.append((row, self.waiting.popleft()))
        for row, req in admit:
          self._admit(row, req)
        if any(self.rows):
          self._step()
    except BaseException as e:   # report to every caller rather than hang them
      self.error = e
      for row, req in enumerate(self.rows):
        if req is not None:
          req.finish('error')
      while self.waiting:
        self.waiting.popleft().finish('error')
      raise
    finally:
      for row, req in enumerate(self.rows):
        if req is not None:
          self.rows[row] = None
          req.finish('cancelled')
      with self.cv:
        while self.waiting:
          self.waiting.popleft().finish('cancelled')

  def _admit(self, row: int, req: Request) -> None:
    if req.cancelled:
      req.finish('cancelled')
      return
    n = len(req.prompt)
    P = bucket_for(n, self.window)
    if self.index - n + P > self.size:
      self._roll()
    tokens = np.zeros((1, P), np.int32)
    tokens[0, :n] = req.prompt
    key = np.asarray(jax.random.PRNGKey(req.seed), np.uint32)
    first, self.cache = _admit(self.mc, self.params, self.cache, jnp.asarray(tokens),
                               jnp.int32(n), jnp.int32(row), key, jnp.float32(req.temperature),
                               jnp.int32(req.top_k), jnp.float32(req.top_p))
    self.rows[row] = req
    self.keys[row] = key
    self.temperature[row], self.top_k[row], self.top_p[row] = req.temperature, req.top_k, req.top_p
    self.positions[row] = n       # the first new token's position
    self._deliver(row, int(first))

  def _roll(self) -> None:
    self.cache = _roll(self.cache, self.window)
    self.index = self.window

  def _step(self) -> None:
    if self.index == self.size:
      self._roll()
    highest = max(row for row, req in enumerate(self.rows) if req is not None)
    rows = next(b for b in row_buckets(self.slots) if b > highest)
    out, self.cache = _step(self.mc, self.params, self.cache, jnp.asarray(self.tokens),
                            jnp.asarray(self.positions), jnp.asarray(self.keys),
                            jnp.asarray(self.draws), jnp.asarray(self.temperature),
                            jnp.asarray(self.top_k), jnp.asarray(self.top_p), rows=rows)
    self.steps += 1
    self.index += 1
    out = np.asarray(out)
    for row, req in enumerate(self.rows):
      if req is not None:
        self.positions[row] += 1
        self._deliver(row, int(out[row]))

  def _deliver(self, row: int, token: int) -> None:
    """Hands a row's new token to its request and frees the row when the sequence ends."""
    req = self.rows[row]
    self.tokens[row] = token
    req.generated += 1
    self.draws[row] = req.generated     # the next token is draw number `generated`
    reason = None
    if req.cancelled:
      reason = 'cancelled'
    elif token in req.stop_ids:
      reason = 'stop'
    else:
      req.emit(token)
      if req.generated >= req.max_tokens:
        reason = 'length'
    if reason:
      self.rows[row] = None
      req.finish(reason)
