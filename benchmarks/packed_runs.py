"""Is sweep.pack worth it on this device? python -m benchmarks.packed_runs [--shapes=2x32,3x64] [--k=4]

For each model shape (n_layers x d_model, head size 16, byte vocabulary, the default sweep's batch
of 16 x 128 tokens) it times, on random tokens, in one process:
  alone:  the project's jitted training step of one run (what a sweep without packing runs,
          one run after another);
  packed: the vmapped step of K such runs (lm/scaling/packed.py), each with its own parameters,
          optimizer state and learning rate.
The table gives the aggregate tokens/s of both (packed counts the tokens of all K runs) and their
ratio: how much faster K same-shape runs finish packed than one after another. Rounds of the two
are interleaved so that a machine's drift affects both alike.
"""
import statistics
import time

from absl import app
from absl import flags

FLAGS = flags.FLAGS
flags.DEFINE_string('shapes', '2x32,3x64,4x128', 'Comma-separated n_layers x d_model.')
flags.DEFINE_integer('k', 4, 'Runs per pack.')
flags.DEFINE_integer('batch', 16, 'Sequences per step (per run).')
flags.DEFINE_integer('seq_len', 128, 'Tokens per sequence.')
flags.DEFINE_integer('steps', 10, 'Steps per timed round.')
flags.DEFINE_integer('rounds', 5, 'Timed rounds of each (the median is reported).')


def _member_configs(n_layers, d_model, k):
  from configs import base
  cfgs = []
  for i in range(k):
    c = base.get_config()
    c.seed = i
    c.model.n_layers, c.model.d_model, c.model.n_heads = n_layers, d_model, max(1, d_model // 16)
    c.model.max_len = FLAGS.seq_len
    c.model.vocab_size = 259
    c.train.batch_size, c.train.seq_len, c.train.steps = FLAGS.batch, FLAGS.seq_len, 1000
    c.train.lr = 3e-3 * (1 + 0.25 * i)
    cfgs.append(c)
  return cfgs


def time_shape(n_layers, d_model, k):
  import jax
  import numpy as np

  from lm.stages import pretrain as train_lib
  from lm.scaling import packed as packed_lib
  cfgs = _member_configs(n_layers, d_model, k)
  run = train_lib.build(cfgs[0], vocab_size=259)
  pack = packed_lib.Pack(cfgs, run=run)
  rng = np.random.default_rng(0)
  tokens = lambda *lead: rng.integers(0, 259, (*lead, FLAGS.batch, FLAGS.seq_len + 1)).astype(
      np.int32)
  lone_batch, pack_batch = jax.numpy.asarray(tokens()), jax.numpy.asarray(tokens(k))
  state = {'alone': run.init_state(jax.random.PRNGKey(0)), 'packed': pack.init_state()}
  steps = {'alone': lambda s: run.train_step(s, lone_batch),
           'packed': lambda s: pack.step(s, pack_batch)}

  def go(name, n):
    s = state[name]
    for _ in range(n):
      s, m = steps[name](s)
    jax.block_until_ready(m['loss'])
    state[name] = s
  t0 = time.perf_counter()
  go('alone', 2)
  compile_alone = time.perf_counter() - t0
  t0 = time.perf_counter()
  go('packed', 2)
  compile_packed = time.perf_counter() - t0
  times = {'alone': [], 'packed': []}
  for _ in range(FLAGS.rounds):
    for name in times:
      t0 = time.perf_counter()
      go(name, FLAGS.steps)
      times[name].append((time.perf_counter() - t0) / FLAGS.steps)
  tok = FLAGS.batch * FLAGS.seq_len
  alone = tok / statistics.median(times['alone'])
  packed = k * tok / statistics.median(times['packed'])
  return alone, packed, compile_alone, compile_packed, run.n_params['total']


def main(argv):
  del argv
  import jax
  dev = jax.devices()[0]
  print(f'{jax.device_count()} x {dev.device_kind}; K = {FLAGS.k} runs per pack, '
        f'batch {FLAGS.batch} x {FLAGS.seq_len} per run; median of {FLAGS.rounds} rounds of '
        f'{FLAGS.steps} steps')
  print(f"{'shape':>8} {'params':>9} {'alone tok/s':>12} {'packed tok/s':>13} {'ratio':>6} "
        f"{'first steps':>16}")
  for shape in FLAGS.shapes.split(','):
    L, d = (int(x) for x in shape.lower().split('x'))
    alone, packed, ca, cp, n = time_shape(L, d, FLAGS.k)
    print(f'{shape:>8} {n:>9,} {alone:>12,.0f} {packed:>13,.0f} {packed / alone:>5.2f}x '
          f'{ca:>6.1f}s /{cp:>6.1f}s', flush=True)


if __name__ == '__main__':
  app.run(main)
