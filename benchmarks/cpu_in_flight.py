"""How many executions of a multi-device CPU program may be in flight before XLA:CPU aborts.

A program over several CPU devices (a host split by mesh.cpu_devices) carries all-reduces.
Dispatched many times without waiting, it made jax 0.10.2's CPU runtime abort the process: the
shares of one execution wait in an all-reduce for a partner share that does not start within
40 s ("Expected 2 threads to join the rendezvous"). lm.model.sharding.map_bounded keeps at most
MAX_IN_FLIGHT executions unfinished. This script rechecks the threshold (e.g. after a jax upgrade):
each trial is a fresh process that dispatches N executions of a tiny data-parallel program at
once (or bounded, --limit), and the table says how many trials finished.

  python -m benchmarks.cpu_in_flight --devices=2 --counts=16,32,40,48,64 --trials=3
  python -m benchmarks.cpu_in_flight --devices=2 --counts=4000 --limit=8
"""
import subprocess
import sys
import time

from absl import app, flags

FLAGS = flags.FLAGS
flags.DEFINE_integer('devices', 2, 'CPU devices the program runs over')
flags.DEFINE_list('counts', ['16', '32', '40', '48', '64'], 'executions dispatched per trial')
flags.DEFINE_integer('trials', 3, 'fresh processes per count')
flags.DEFINE_integer('limit', 0, 'at most this many in flight (lm.model.sharding.map_bounded); 0: all')
flags.DEFINE_integer('timeout', 120, 'seconds before a trial counts as hung')

TRIAL = r'''
import sys
import jax
devices, count, limit = map(int, sys.argv[1:4])
jax.config.update('jax_num_cpu_devices', devices)
import jax.numpy as jnp
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P
from lm.model import sharding as shard_lib
mesh = Mesh(np.array(jax.devices()), ('data',))
rows, whole = NamedSharding(mesh, P('data')), NamedSharding(mesh, P())
w = jax.device_put(jnp.ones((256, 256)), whole)
f = jax.jit(lambda w, x: jnp.mean(jnp.tanh(x @ w) @ w), in_shardings=(whole, rows),
            out_shardings=whole)
xs = [jax.device_put(np.ones((8, 64, 256), np.float32), rows) for _ in range(count)]
if limit:
  out = shard_lib.map_bounded(lambda x: f(w, x), xs, limit)
else:
  out = [f(w, x) for x in xs]
assert float(np.mean(jax.device_get(out))) == 256.0
'''


def trial(count: int) -> tuple[str, float]:
  start = time.time()
  try:
    proc = subprocess.run([sys.executable, '-c', TRIAL, str(FLAGS.devices), str(count),
                           str(FLAGS.limit)], capture_output=True, text=True,
                          timeout=FLAGS.timeout)
  except subprocess.TimeoutExpired:
    return 'hung', time.time() - start
  if proc.returncode == 0:
    return 'finished', time.time() - start
  return ('aborted' if 'rendezvous' in proc.stderr else f'failed ({proc.returncode})',
          time.time() - start)


def main(_):
  print(f'{FLAGS.devices} CPU devices, in flight: '
        f'{FLAGS.limit if FLAGS.limit else "all dispatched at once"}')
  print('| executions | finished | outcomes | seconds per trial |')
  print('|---|---|---|---|')
  for count in map(int, FLAGS.counts):
    results = [trial(count) for _ in range(FLAGS.trials)]
    done = sum(r == 'finished' for r, _ in results)
    print(f'| {count} | {done}/{FLAGS.trials} | {", ".join(r for r, _ in results)} | '
          f'{", ".join(f"{t:.0f}" for _, t in results)} |', flush=True)


if __name__ == '__main__':
  app.run(main)
