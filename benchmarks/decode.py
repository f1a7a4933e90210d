"""Decode speed with and without the KV cache: python -m benchmarks.decode [--d_model=...].

For each total length L (prompt + new tokens) it greedily generates L - prompt_len tokens with a
randomly initialised model (EOS disabled, so every run makes all its tokens) and prints the mean
time per new token.

  with cache:    `lm.eval.sample.prefill` then the jitted `decode_loop` (one forward of one token per
                 step over a cache of prompt_len + new - 1 slots).
  without cache: every new token recomputes the whole prefix: a jitted full forward over a
                 right-padded buffer whose length is the current length rounded up to a multiple
                 of --bucket (one compilation per bucket, all made before timing).

Compilation is excluded from both; each timing is the best of --repeats runs. The cached time
still grows with length: every step attends over all cache slots, and the model rebuilds its
stacked per-layer cache each step (a copy proportional to the cache size).
"""
import argparse
import time

import jax
import jax.numpy as jnp
import numpy as np

from lm.model import transformer as model_lib
from lm.eval import sample
from lm.config import ModelConfig


def time_cached(mc, params, prompt_BP, n_new):
  lengths = jnp.full((prompt_BP.shape[0],), prompt_BP.shape[1], jnp.int32)
  slots = prompt_BP.shape[1] + n_new - 1

  def run():
    logits, cache = sample.prefill(mc, params, prompt_BP, lengths, slots=slots)
    return sample.decode_loop(mc, params, cache, logits, lengths, jax.random.PRNGKey(0),
                              jnp.int32(-1), jnp.int32(0), max_new_tokens=n_new,
                              temperature=0.0, top_k=0, top_p=1.0)
  return run


def time_uncached(mc, params, prompt_BP, n_new, bucket):
  B, P = prompt_BP.shape

  @jax.jit
  def step(params, buf_BT, n):
    """Recomputes the buffer's prefix, writes the greedy token for position n."""
    logits = model_lib.apply(mc, params, buf_BT)
    nxt = jnp.argmax(jax.lax.dynamic_index_in_dim(logits, n - 1, axis=1, keepdims=False), -1)
    return jax.lax.dynamic_update_index_in_dim(buf_BT, nxt.astype(jnp.int32), n, axis=1)

  def size(n):  # buffer length holding positions 0..n
    return -(-(n + 1) // bucket) * bucket

  for T in sorted({size(n) for n in range(P, P + n_new)}):  # compile every bucket up front
    step(params, jnp.zeros((B, T), jnp.int32), jnp.int32(P)).block_until_ready()

  def run():
    buf = jnp.pad(prompt_BP, ((0, 0), (0, size(P) - P)))
    for n in range(P, P + n_new):
      if buf.shape[1] < size(n):
        buf = jnp.pad(buf, ((0, 0), (0, size(n) - buf.shape[1])))
      buf = step(params, buf, jnp.int32(n))
    return buf
  return run


def best_time(fn, repeats):
  jax.block_until_ready(fn())  # compile / warm up
  times = []
  for _ in range(repeats):
    t = time.perf_counter()
    jax.block_until_ready(fn())
    times.append(time.perf_counter() - t)
  return min(times)


def main():
  ap = argparse.ArgumentParser(description=__doc__.split('\n')[0])
  ap.add_argument('--n_layers', type=int, default=2)
  ap.add_argument('--d_model', type=int, default=128)
  ap.add_argument('--n_heads', type=int, default=4)
  ap.add_argument('--vocab_size', type=int, default=259)
  ap.add_argument('--max_len', type=int, default=1024)
  ap.add_argument('--batch', type=int, default=1)
  ap.add_argument('--prompt_len', type=int, default=16)
  ap.add_argument('--lengths', default='64,128,256,512')
  ap.add_argument('--bucket', type=int, default=64)
  ap.add_argument('--repeats', type=int, default=2)
  args = ap.parse_args()

  mc = ModelConfig(vocab_size=args.vocab_size, n_layers=args.n_layers, d_model=args.d_model,
                   n_heads=args.n_heads, n_kv_heads=args.n_heads, d_ff=4 * args.d_model,
                   max_len=args.max_len, pos='rope')
  params = jax.jit(model_lib.init_params, static_argnums=0)(mc, jax.random.PRNGKey(0))
  prompt = jnp.asarray(np.random.default_rng(0).integers(
      0, 256, (args.batch, args.prompt_len)), jnp.int32)
  print(f'{jax.devices()[0].device_kind}: {args.n_layers} layers, d_model {args.d_model}, '
        f'batch {args.batch}, prompt {args.prompt_len} tokens; ms per new token (per row of '
        'the batch: tokens/s counts the whole batch)')
  print(f"{'total len':>9} {'new':>5} | {'cached ms/tok':>13} {'tok/s':>8} | "
        f"{'uncached ms/tok':>15} {'tok/s':>8} | {'speedup':>7}")
  for L in [int(x) for x in args.lengths.split(',')]:
    n_new = L - args.prompt_len
    cached = best_time(time_cached(mc, params, prompt, n_new), args.repeats) / n_new
    uncached = best_time(time_uncached(mc, params, prompt, n_new, args.bucket),
                         args.repeats) / n_new
    print(f'{L:>9} {n_new:>5} | {1e3 * cached:>13.3f} {args.batch / cached:>8.0f} | '
          f'{1e3 * uncached:>15.3f} {args.batch / uncached:>8.0f} | {uncached / cached:>6.1f}x',
          flush=True)


if __name__ == '__main__':
  main()
