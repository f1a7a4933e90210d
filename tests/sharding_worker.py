"""Subprocess half of tests/test_sharding.py: runs with fake CPU devices and writes JSON.

XLA_FLAGS must be set before jax starts, so the tests run this file in a fresh interpreter:

  python tests/sharding_worker.py meshes CACHE_DIR WORKDIR OUT.json
      trains the same config on every mesh in MESHES in one process (8 fake devices), records
      losses and shardings, then saves a checkpoint on (8,1,1) and restores/resumes it on
      (2,2,2) and on one device.
  python tests/sharding_worker.py multihost CACHE_DIR WORKDIR OUT.json
      one process of a multi-process run (JAX_COORDINATOR_ADDRESS, JAX_NUM_PROCESSES and
      JAX_PROCESS_ID set by the caller): trains with a stop and a resume in a shared workdir.
"""
import contextlib
import json
import os
import shutil
import sys
import time

N_DEVICES = int(os.environ.get('WORKER_DEVICES', '8'))
# Compiling dominates this worker on a small CPU; fewer LLVM passes halve it and change only
# speed and float32 rounding, which the tests' tolerance covers.
os.environ['XLA_FLAGS'] = (os.environ.get('XLA_FLAGS', '') +
                           f' --xla_force_host_platform_device_count={N_DEVICES}'
                           ' --xla_backend_optimization_level=0'
                           ' --xla_llvm_disable_expensive_passes=true')
os.environ.setdefault('JAX_PLATFORMS', 'cpu')
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import jax  # noqa: E402
import numpy as np  # noqa: E402

from configs import base  # noqa: E402
from lm.training import checkpoint as ckpt_lib  # noqa: E402
from lm import metrics as metrics_lib  # noqa: E402
from lm.model import sharding as shard_lib  # noqa: E402
from lm.stages import pretrain as train_lib  # noqa: E402
from lm.errors import UserError  # noqa: E402

T0 = time.time()
MESHES = ((1, 1, 1), (8, 1, 1), (1, 8, 1), (2, 2, 2), (1, 2, 4))
STEPS = 4
# Leaves whose shardings the test checks against the rules (path, as '/'-joined keys).
WATCHED = ('embed', 'layer_0/attn/wq', 'layer_0/attn/wo', 'layer_0/mlp/wi', 'layer_0/mlp/wo',
           'final_norm/scale')


def config(cache_dir: str, mesh=(-1, 1, 1), steps: int = STEPS):
  """Tiny model, batch 8 x 32 tokens; d_ff 64 and 4 heads divide tensor=4, vocab 259 does not."""
  c = base.get_config()
  c.model.update(n_layers=2, d_model=32, n_heads=4, d_ff=64, max_len=32)
  c.data.update(max_bytes=400_000, cache_dir=cache_dir)
  c.train.update(steps=steps, batch_size=8, seq_len=32, warmup_steps=1, eval_every=steps,
                 eval_batches=1, log_every=1, checkpoint_every=100, progress='none')
  c.mesh.update(data=mesh[0], fsdp=mesh[1], tensor=mesh[2])
  return c


@contextlib.contextmanager
def on_devices(n: int):
  """Makes train.build lay its mesh over the first n devices (a 1-device mesh among 8)."""
  make_mesh = shard_lib.make_mesh
  shard_lib.make_mesh = lambda mc, devices=None, batch_size=None: make_mesh(mc, jax.devices()[:n])
  try:
    yield
  finally:
    shard_lib.make_mesh = make_mesh


def _key(path) -> str:
  return '/'.join(str(getattr(k, 'key', getattr(k, 'name', getattr(k, 'idx', k)))) for k in path)


def leaves(tree) -> dict:
  return {_key(p): x for p, x in jax.tree_util.tree_flatten_with_path(tree)[0]}


def spec(x) -> list:
  """A PartitionSpec as JSON: one entry per dimension (None, an axis, or a list of axes)."""
  s = tuple(x.sharding.spec) + (None,) * (x.ndim - len(x.sharding.spec))
  return [list(a) if isinstance(a, tuple) else a for a in s]


def describe(state) -> dict:
  """Specs and per-device shard shapes of the watched params and their Adam moments."""
  p, opt = leaves(state['params']), leaves(state['opt_state'])
  out = {}
  for name in WATCHED:
    for kind, x in (('param', p[name]), ('mu', opt.get(f'1/0/mu/{name}')),
                    ('nu', opt.get(f'1/0/nu/{name}'))):
      out[f'{kind}:{name}'] = {'spec': spec(x), 'shard': list(x.addressable_shards[0].data.shape),
                               'shape': list(x.shape), 'devices': len(x.sharding.device_set)}
  return out


def log(msg: str) -> None:
  print(f'[{time.time() - T0:6.1f}s] {msg}', file=sys.stderr, flush=True)


def host(tree):
  return jax.tree.map(np.asarray, jax.device_get(tree))


def max_diff(a, b) -> float:
  return max(float(np.max(np.abs(x - y))) for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b)))


def losses_of(workdir: str) -> dict:
  rows = metrics_lib.read_jsonl(os.path.join(workdir, 'metrics.jsonl'))
  return {r['step']: r['loss'] for r in rows if 'loss' in r}


# Bad settings train() must refuse before compiling anything: (mesh, model and train overrides).
BAD = {
    'mesh_product': ((2, 2, 1), {}, {}),
    'batch': ((2, 2, 2), {}, {'batch_size': 6}),
    'heads': ((1, 1, 8), {}, {}),
    'kv_heads': ((1, 2, 4), {'n_kv_heads': 2}, {}),
    'd_ff': ((1, 2, 4), {'d_ff': 66}, {}),
}


COMPILES = []    # jax tracing and compiling events, to show the refusals come before any
jax.monitoring.register_event_duration_secs_listener(
    lambda event, *_, **__: COMPILES.append(event) if '/jax/core/compile/' in event else None)


def refusals(cache_dir: str, workdir: str) -> dict:
  """The UserError of each BAD config and how many XLA compiles happened before it."""
  out = {}
  for name, (mesh, model, train) in BAD.items():
    cfg = config(cache_dir, mesh)
    cfg.model.update(model)
    cfg.train.update(train)
    COMPILES.clear()
    try:
      train_lib.train(cfg, os.path.join(workdir, f'bad-{name}'))
      out[name] = {'error': None}
    except UserError as e:
      out[name] = {'error': str(e)}
    out[name]['compiles'] = len(COMPILES)
  return out


def meshes(cache_dir: str, workdir: str) -> dict:
  out = {'refusals': refusals(cache_dir, workdir), 'losses': {}, 'shardings': {},
         'batch_spec': {}, 'param_diff': {}}
  ref_params, snapshot = None, None
  COMPILES.clear()
  for shape in MESHES:
    name = 'x'.join(map(str, shape))
    with on_devices(int(np.prod(shape))):
      run = train_lib.build(config(cache_dir, shape))
    state = run.init_state(jax.random.PRNGKey(0))
    out['shardings'][name] = describe(state)
    losses = []
    for step in range(STEPS):
      batch = train_lib.get_batch(run, 'train', step)
      out['batch_spec'][name] = spec(batch)
      state, m = run.train_step(state, batch)
      losses.append(float(m['loss']))
      if shape == (8, 1, 1) and step == 1:
        snapshot = host(state)         # what the (8,1,1) checkpoint at step 2 must hold
    out['losses'][name] = losses
    log(f'mesh {name}: {losses}')
    params = host(state['params'])
    ref_params = params if ref_params is None else ref_params
    out['param_diff'][name] = max_diff(ref_params, params)
  out['compiles'] = len(COMPILES)

  # Save on (8,1,1) at step 2 (a simulated kill), then restore and resume on other meshes.
  saved = os.path.join(workdir, 'saved')
  train_lib.train(config(cache_dir, (8, 1, 1)), saved, stop_at=2)
  log('saved on 8x1x1')
  out['restore'], out['resume'] = {}, {}
  for shape in ((2, 2, 2), (1, 1, 1)):
    name = 'x'.join(map(str, shape))
    cfg = config(cache_dir, shape)
    with on_devices(int(np.prod(shape))):
      run = train_lib.build(cfg)
    ckpts = ckpt_lib.Checkpoints(os.path.join(saved, 'checkpoints'), 2)
    state, step = ckpts.restore_latest(run.abstract_state)
    ckpts.close()
    got, want = leaves(state), leaves(run.state_shardings)
    out['restore'][name] = {
        'step': step,
        'equal': all(np.array_equal(a, b) for a, b in zip(jax.tree.leaves(host(state)),
                                                           jax.tree.leaves(snapshot))),
        'shardings_match': all(got[k].sharding.is_equivalent_to(want[k], got[k].ndim)
                               for k in got),
        'mesh_devices': len(got['params/layer_0/attn/wq'].sharding.device_set),
        'shardings': describe(state)}
    resumed = os.path.join(workdir, f'resumed-{name}')
    shutil.copytree(saved, resumed)
    with on_devices(int(np.prod(shape))):
      summary = train_lib.train(cfg, resumed)
    with open(os.path.join(resumed, 'manifest.json')) as f:
      manifest = json.load(f)
    with open(os.path.join(resumed, 'config.json')) as f:
      saved_cfg = json.load(f)
    log(f'restored and resumed on {name}')
    out['resume'][name] = {'losses': losses_of(resumed), 'eval_loss': summary['eval_loss'],
                           'finished': summary['finished'], 'manifest_mesh': manifest['mesh'],
                           'config_mesh': saved_cfg['mesh']}
  return out


def multihost(cache_dir: str, workdir: str) -> dict:
  mesh = tuple(int(v) for v in os.environ.get('WORKER_MESH', '2,2,2').split(','))
  cfg = config(cache_dir, mesh)
  first = train_lib.train(cfg, workdir, stop_at=2)
  summary = train_lib.train(cfg, workdir)
  out = {'process_index': jax.process_index(), 'process_count': jax.process_count(),
         'device_count': jax.device_count(), 'local_devices': jax.local_device_count(),
         'stopped_at': first['steps'], 'summary': summary}
  if jax.process_index() == 0:
    with open(os.path.join(workdir, 'manifest.json')) as f:
      out['manifest_mesh'] = json.load(f)['mesh']
    out['losses'] = losses_of(workdir)
  return out


if __name__ == '__main__':
  mode, cache, work, result = sys.argv[1:5]
  # train() re-jits the same computations the mesh loop compiled; the on-disk cache lets it
  # reuse them instead of compiling again (most of this worker's time on a slow CPU).
  jax.config.update('jax_compilation_cache_dir', result + '.jax-cache')
  jax.config.update('jax_persistent_cache_min_compile_time_secs', 0)
  jax.config.update('jax_persistent_cache_min_entry_size_bytes', 0)
  out = {'meshes': meshes, 'multihost': multihost}[mode](cache, work)
  with open(result, 'w') as f:
    json.dump(out, f, indent=1)
