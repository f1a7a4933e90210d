"""Is sweep.parallel worth it on this CPU? python -m benchmarks.parallel_runs [--shapes=2x64,3x128]

For each model shape (n_layers x d_model, head size 32, byte vocabulary, the Chinchilla sweep's
batch of 32 x 256 tokens) it times the project's training step on random tokens two ways:
  together: one process that may use every core (what sweep.parallel=1 does);
  split:    P processes at the same time, each pinned to its own 1/P of the cores (what
            sweep.parallel=P does; P defaults to the number of cores).
Every process compiles and warms up first, then all wait at a barrier (a file) so that the split
processes time the same seconds. The table gives tokens/s for both and their ratio: how much
faster a sweep of such models gets through its runs when P of them train at once.
"""
import json
import os
import subprocess
import sys
import tempfile
import time

from absl import app
from absl import flags
from absl import logging

FLAGS = flags.FLAGS
flags.DEFINE_string('shapes', '2x64,3x128', 'Comma-separated n_layers x d_model.')
flags.DEFINE_integer('parallel', 0, 'Processes in the split case (0: one per core).')
flags.DEFINE_integer('batch', 32, 'Sequences per step.')
flags.DEFINE_integer('seq_len', 256, 'Tokens per sequence.')
flags.DEFINE_float('seconds', 20.0, 'Timed seconds per case.')
flags.DEFINE_string('worker', None, 'Internal: JSON arguments of one timing process.')


def _time_steps(n_layers, d_model, batch, seq_len, seconds, ready, barrier):
  """Tokens/s of the jitted training step, timed after `barrier` (a path) exists."""
  import jax
  import numpy as np

  from lm.model import transformer as model_lib
  from lm.stages import pretrain as train_lib
  from lm.config import ModelConfig
  mc = ModelConfig.from_config(dict(n_layers=n_layers, d_model=d_model, n_heads=d_model // 32,
                                    max_len=seq_len, pos='rope', norm='rmsnorm', mlp='gelu'),
                               259)
  tc = train_lib.TrainConfig(batch_size=batch, seq_len=seq_len, steps=10_000, warmup_steps=10)
  params = model_lib.init_params(mc, jax.random.PRNGKey(0))
  opt = train_lib.make_optimizer(tc, params)
  state = {'params': params, 'opt_state': opt.init(params), 'step': jax.numpy.zeros((), 'int32')}
  step = jax.jit(train_lib.make_train_step(mc, tc, opt, 0), donate_argnums=0)
  rng = np.random.default_rng(0)
  batches = [jax.numpy.asarray(rng.integers(0, 259, (batch, seq_len + 1)), 'int32')
             for _ in range(4)]
  for i in range(3):
    state, m = step(state, batches[i % 4])
  jax.block_until_ready(m)
  open(ready, 'w').close()
  while not os.path.exists(barrier):
    time.sleep(0.01)
  n, t0 = 0, time.perf_counter()
  while time.perf_counter() - t0 < seconds:
    state, m = step(state, batches[n % 4])
    n += 1
    if n % 5 == 0:
      jax.block_until_ready(m)
  jax.block_until_ready(m)
  return n * batch * seq_len / (time.perf_counter() - t0)


def _run_case(shape, groups, tmp):
  """Starts one timing process per core group, releases them together, returns their tokens/s."""
  case = os.path.join(tmp, f'{shape[0]}x{shape[1]}_{len(groups)}')
  procs = []
  for i, cpus in enumerate(groups):
    args = json.dumps(dict(shape=shape, cpus=cpus, batch=FLAGS.batch, seq_len=FLAGS.seq_len,
                           seconds=FLAGS.seconds, ready=f'{case}_ready{i}', barrier=f'{case}_go'))
    procs.append(subprocess.Popen([sys.executable, '-m', 'benchmarks.parallel_runs',
                                   f'--worker={args}'], stdout=subprocess.PIPE, text=True))
  # Each process compiles and warms up, says so with a file, and waits for the barrier.
  while not all(os.path.exists(f'{case}_ready{i}') for i in range(len(groups))):
    if any(p.poll() is not None for p in procs):
      break
    time.sleep(0.05)
  open(f'{case}_go', 'w').close()
  out = []
  for p in procs:
    stdout, _ = p.communicate()
    if p.returncode != 0:
      raise SystemExit(f'a timing process failed (status {p.returncode})')
    out.append(float(stdout.strip().splitlines()[-1]))
  return out


def main(argv):
  if FLAGS.worker:
    logging.set_verbosity(logging.WARNING)
    a = json.loads(FLAGS.worker)
    os.sched_setaffinity(0, set(a['cpus']))
    print(_time_steps(*a['shape'], a['batch'], a['seq_len'], a['seconds'], a['ready'],
                      a['barrier']))
    return
  cores = sorted(os.sched_getaffinity(0))
  p = FLAGS.parallel or len(cores)
  if not 1 <= p <= len(cores):
    raise SystemExit(f'--parallel={p} must be between 1 and the {len(cores)} usable cores.')
  split = [cores[i::p] for i in range(p)]
  print(f'{len(cores)} cores; together: 1 process on all of them; split: {p} processes on '
        f'{len(cores) // p} core(s) each; batch {FLAGS.batch} x {FLAGS.seq_len}, '
        f'{FLAGS.seconds:.0f} s timed per case')
  print('| shape | together tokens/s | split tokens/s (sum) | split / together |')
  print('|---|---|---|---|')
  with tempfile.TemporaryDirectory() as tmp:
    for s in FLAGS.shapes.split(','):
      shape = [int(v) for v in s.split('x')]
      together = _run_case(shape, [cores], tmp)[0]
      parts = _run_case(shape, split, tmp)
      print(f'| L{shape[0]} d{shape[1]} | {together:,.0f} | {sum(parts):,.0f} '
            f'({" + ".join(f"{v:,.0f}" for v in parts)}) | {sum(parts) / together:.2f}x |',
            flush=True)


if __name__ == '__main__':
  app.run(main)
