"""Sharding: mesh equivalence, the rules' specs, cross-mesh checkpoints, two processes, bad input.

The multi-device tests need XLA_FLAGS set before jax starts, so they run tests/sharding_worker.py
in subprocesses with 8 fake CPU devices (one process) or 2 x 4 (two processes) and check the
JSON it writes. Checkpoints and the data cache live in pytest's temporary folders.

Tolerance. Meshes change only the order of float32 reductions (the data/fsdp all-reduce of the
gradients, the partial sums of tensor-split contractions), each worth a few ulps (float32 eps
1.2e-7) of the sums involved; Adam normalises its updates, so after 4 steps the params differ by
about 1e-6 and the losses by a few 1e-7 relative. A sharding bug (rows missing from the batch, a
missing all-reduce, a param sliced wrongly) moves the loss by 1e-3 or more. Hence RTOL = 1e-5.
"""
import json
import os
import socket
import subprocess
import sys
import time
import types

import numpy as np
import pytest

from configs import base
from lm.data import tokens as data_lib
from lm.model import sharding as shard_lib
from lm.config import ModelConfig
from lm.errors import UserError

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
WORKER = os.path.join(REPO, 'tests', 'sharding_worker.py')
MESHES = ('1x1x1', '8x1x1', '1x8x1', '2x2x2', '1x2x4')
RTOL = 1e-5       # losses across meshes (module docstring)
PARAM_ATOL = 1e-5  # params after 4 steps; one step moves them by ~lr = 3e-3


def _env(**extra):
  env = {k: v for k, v in os.environ.items() if not k.startswith('JAX_')}
  env.update(JAX_PLATFORMS='cpu', PYTHONPATH=REPO, **extra)
  return env


def _run_workers(commands, timeout: float):
  """Runs worker processes together; if one fails, the others are killed (no 5-minute hang)."""
  procs = [subprocess.Popen([sys.executable, WORKER, *args], env=env, cwd=REPO,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
           for args, env in commands]
  deadline = time.time() + timeout
  try:
    while any(p.poll() is None for p in procs):
      if time.time() > deadline or any(p.poll() not in (None, 0) for p in procs):
        break
      time.sleep(0.2)
  finally:
    for p in procs:
      if p.poll() is None:
        p.kill()
  logs = [p.communicate()[0] for p in procs]
  for p, log in zip(procs, logs):
    if p.returncode != 0:
      tail = '\n'.join(line for line in log.splitlines() if 'SPMD' not in line)[-4000:]
      pytest.fail(f'worker exited with {p.returncode}:\n{tail}')
  return logs


@pytest.fixture(scope='module')
def meshes(cache_dir, tmp_path_factory):
  """One subprocess: refusals, every mesh's losses and shardings, save/restore/resume."""
  work = tmp_path_factory.mktemp('meshes')
  out = work / 'out.json'
  log, = _run_workers([(('meshes', cache_dir, str(work), str(out)), _env())], timeout=400)
  return dict(json.loads(out.read_text()), log=log)


# --- mesh equivalence and the rules -------------------------------------------------------------

def test_same_losses_on_every_mesh(meshes):
  losses = meshes['losses']
  assert sorted(losses) == sorted(MESHES)
  ref = np.asarray(losses['1x1x1'])
  assert ref[-1] < ref[0]        # it trains
  for name in MESHES:
    np.testing.assert_allclose(losses[name], ref, rtol=RTOL, atol=0, err_msg=name)
    assert meshes['param_diff'][name] <= PARAM_ATOL, name


def test_no_involuntary_rematerialisation(meshes):
  """With the activation constraints XLA's partitioner keeps the intended plan on every mesh
  (2x2x2 included) instead of gathering whole tensors and warning about it."""
  assert 'ematerializ' not in meshes['log'], [
      line for line in meshes['log'].splitlines() if 'ematerializ' in line][:3]


def _expected(mesh: str, name: str) -> list:
  """The rules, restated: embed->fsdp, heads/mlp->tensor, vocab 259 stays whole, norms whole."""
  _, f, t = (int(v) for v in mesh.split('x'))
  F = 'fsdp' if f > 1 else None
  T = 'tensor' if t > 1 else None
  return {'embed': [None, F], 'layer_0/attn/wq': [F, T, None], 'layer_0/attn/wo': [T, None, F],
          'layer_0/mlp/wi': [F, T], 'layer_0/mlp/wo': [T, F], 'final_norm/scale': [None]}[name]


def test_params_and_moments_sharded_by_the_rules(meshes):
  sh = meshes['shardings']
  # The example, spelled out: on (1,2,4) wq [embed, heads, head_dim] is (fsdp, tensor, -).
  assert sh['1x2x4']['param:layer_0/attn/wq']['spec'] == ['fsdp', 'tensor', None]
  assert sh['1x2x4']['param:layer_0/attn/wq']['shard'] == [16, 1, 8]
  assert sh['1x2x4']['nu:embed']['spec'] == [None, 'fsdp']    # 259 % 4 != 0: vocab whole
  for mesh in MESHES:
    sizes = dict(zip(('data', 'fsdp', 'tensor'), (int(v) for v in mesh.split('x'))))
    for key, got in sh[mesh].items():
      kind, name = key.split(':')
      want = _expected(mesh, name)
      assert got['spec'] == want, (mesh, key)
      # The arrays really are split that way: each device holds shape / axis size.
      shard = [n // (sizes[a] if a else 1) for n, a in zip(got['shape'], want)]
      assert got['shard'] == shard, (mesh, key)
      assert got['devices'] == int(np.prod(list(sizes.values()))), (mesh, key)


def test_batch_split_over_the_data_axes(meshes):
  for mesh in MESHES:
    assert meshes['batch_spec'][mesh] == [['data', 'fsdp'], None]


# --- checkpoints across meshes ------------------------------------------------------------------

@pytest.mark.parametrize('mesh', ('2x2x2', '1x1x1'))
def test_checkpoint_from_8_devices_restores_onto_another_mesh(meshes, mesh):
  r = meshes['restore'][mesh]
  assert r['step'] == 2
  assert r['equal']                # params, moments and step bit for bit
  assert r['shardings_match']      # every leaf carries the new mesh's sharding
  assert r['mesh_devices'] == int(np.prod([int(v) for v in mesh.split('x')]))
  for key, got in r['shardings'].items():
    assert got['spec'] == _expected(mesh, key.split(':')[1]), key


@pytest.mark.parametrize('mesh', ('2x2x2', '1x1x1'))
def test_resume_on_another_mesh_continues_the_losses(meshes, mesh):
  r = meshes['resume'][mesh]
  assert r['finished']
  steps = sorted(int(s) for s in r['losses'])
  assert steps == [1, 2, 3, 4]
  uninterrupted = meshes['losses']['8x1x1']
  np.testing.assert_allclose([r['losses'][str(s)] for s in steps], uninterrupted, rtol=RTOL)
  # The manifest and config.json describe the mesh the run continued on.
  d, f, t = (int(v) for v in mesh.split('x'))
  assert r['manifest_mesh'] == {'data': d, 'fsdp': f, 'tensor': t}
  assert (r['config_mesh']['data'], r['config_mesh']['fsdp'], r['config_mesh']['tensor']) == (
      d, f, t)


# --- bad input ----------------------------------------------------------------------------------

@pytest.mark.parametrize('name,words', [
    ('mesh_product', ('(2, 2, 1)', '4 devices', '8 are present')),
    ('batch', ('batch_size=6', 'data x fsdp = 4')),
    ('heads', ('n_heads=4', 'mesh.tensor=8')),
    ('kv_heads', ('n_kv_heads=2', 'mesh.tensor=4')),
    ('d_ff', ('d_ff=66', 'mesh.tensor=4')),
])
def test_bad_settings_refused_before_compiling(meshes, name, words):
  r = meshes['refusals'][name]
  assert r['error'] is not None, name
  assert all(w in r['error'] for w in words), r['error']
  assert r['error'].count('. ') == 0 and r['error'].endswith('.'), r['error']   # one sentence
  assert r['compiles'] == 0        # no jax tracing or XLA compile happened before the error
  assert meshes['compiles'] > 0    # (the counter does see the compiles of real runs)


def test_mesh_shape_errors():
  MC = shard_lib.MeshConfig
  assert shard_lib.mesh_shape(MC(data=-1, fsdp=2, tensor=2), 8) == (2, 2, 2)
  for mc, words in ((MC(data=2, fsdp=2, tensor=2), '8 devices but 4'),
                    (MC(data=-1, fsdp=3), 'does not divide'),
                    (MC(data=-1, fsdp=-1), 'Only one'),
                    (MC(data=0), 'positive integer')):
    with pytest.raises(UserError, match=words):
      shard_lib.mesh_shape(mc, 4)


HOST_SPLIT = """
import json, jax
from lm.model import sharding as s
n = s.split_host(2)
m3 = s.make_mesh(s.MeshConfig(cpu_devices=2), batch_size=3)
m4 = s.make_mesh(s.MeshConfig(cpu_devices=2), batch_size=4)
print(json.dumps([n, jax.device_count(), m3.devices.size, m4.devices.size, s.split_host(2)]))
"""


@pytest.mark.parametrize('forced,expect', [
    ('', [2, 2, 1, 2, 0]),   # split in two; a batch of 3 runs on one device, of 4 on both
    ('--xla_force_host_platform_device_count=3', [0, 3, 3, 3, 0]),   # the caller's count stays
])
def test_host_split_before_jax_starts(forced, expect):
  """mesh.cpu_devices splits a CPU host into devices in a fresh process, and the data mesh takes
  the most of them that divide the batch; a device count the caller set is left alone."""
  env = dict(os.environ)
  flags = [f for f in env.get('XLA_FLAGS', '').split() if 'device_count' not in f]
  env['XLA_FLAGS'] = ' '.join(flags + [forced]).strip()
  env['JAX_PLATFORMS'] = 'cpu'
  out = subprocess.run([sys.executable, '-c', HOST_SPLIT], env=env, cwd=REPO, text=True,
                       capture_output=True, timeout=120)
  assert out.returncode == 0, out.stderr[-2000:]
  assert json.loads(out.stdout.strip().splitlines()[-1]) == expect
  with pytest.raises(UserError, match='cpu_devices=-1'):
    shard_lib.split_host(-1)


def _fake_mesh(owners):
  """A stand-in mesh whose device [d, f, t] lives in process owners[d, f, t] (no real devices)."""
  owners = np.asarray(owners)
  devs = np.vectorize(lambda p: types.SimpleNamespace(process_index=int(p)),
                      otypes=[object])(owners)
  return types.SimpleNamespace(devices=devs, shape=dict(zip(shard_lib.AXES, owners.shape)))


@pytest.mark.parametrize('owners,ok', [
    (np.arange(8).reshape(2, 2, 2) // 4, True),
    (np.arange(8).reshape(1, 2, 4) // 4, True),
    (np.arange(8).reshape(8, 1, 1), True),                # one device per process
    (np.array([0, 1, 0, 1]).reshape(1, 4, 1), True),      # interleaved shards are fine
    (np.arange(8).reshape(1, 1, 8) // 4, False),          # tensor spans both processes
    (np.arange(8).reshape(2, 1, 4) // 2, False),          # 4 processes, 2 batch shards
    (np.array([0, 1, 1, 1]).reshape(1, 4, 1), False),     # unequal shares
])
def test_each_process_must_own_whole_batch_shards(owners, ok):
  mc = ModelConfig(vocab_size=259, n_layers=1, d_model=32, n_heads=8, n_kv_heads=8, d_ff=64,
                   max_len=32)
  mesh = _fake_mesh(owners)
  if ok:
    shard_lib.check_divisibility(mesh, mc, 8)
  else:
    with pytest.raises(UserError, match='splits a batch shard across processes'):
      shard_lib.check_divisibility(mesh, mc, 8)


def test_coordinator_without_process_count_is_refused(monkeypatch):
  monkeypatch.setenv('JAX_COORDINATOR_ADDRESS', '127.0.0.1:1')
  monkeypatch.delenv('JAX_NUM_PROCESSES', raising=False)
  with pytest.raises(UserError, match='JAX_NUM_PROCESSES'):
    shard_lib.maybe_initialize_distributed(shard_lib.MeshConfig())


# --- two processes ------------------------------------------------------------------------------

def _free_port() -> int:
  with socket.socket() as s:
    s.bind(('127.0.0.1', 0))
    return s.getsockname()[1]


def test_two_processes_match_one_process(meshes, cache_dir, tmp_path):
  """2 processes x 4 devices on mesh (2,2,2), stopped at step 2 and resumed, in one workdir."""
  port = _free_port()
  outs = [tmp_path / f'out{i}.json' for i in range(2)]
  _run_workers([(('multihost', cache_dir, str(tmp_path / 'work'), str(outs[i])),
                 _env(WORKER_DEVICES='4', WORKER_MESH='2,2,2',
                      JAX_COORDINATOR_ADDRESS=f'127.0.0.1:{port}', JAX_NUM_PROCESSES='2',
                      JAX_PROCESS_ID=str(i)))
                for i in range(2)], timeout=400)
  results = [json.loads(o.read_text()) for o in outs]
  for i, r in enumerate(results):
    assert (r['process_index'], r['process_count'], r['device_count'], r['local_devices']) == (
        i, 2, 8, 4)
    assert r['stopped_at'] == 2 and r['summary']['finished']
  main = results[0]
  assert main['manifest_mesh'] == {'data': 2, 'fsdp': 2, 'tensor': 2}
  losses = [main['losses'][str(s)] for s in range(1, 5)]
  np.testing.assert_allclose(losses, meshes['losses']['8x1x1'], rtol=RTOL)
  np.testing.assert_allclose(main['summary']['eval_loss'], meshes['resume']['2x2x2']['eval_loss'],
                             rtol=RTOL)
  assert results[1]['summary'] == main['summary']


def test_two_processes_preparing_one_cache_folder_build_it_once(tmp_path):
  """A second process asking for token files that another is building waits for them (the
  builder holds the lock of the partial folder) and reads the builder's folder; nothing is left
  behind. The builder here is a subprocess slowed down after it takes the lock."""
  cache = str(tmp_path / 'cache')
  ready = tmp_path / 'ready'
  script = f"""
import os, sys, time
sys.path.insert(0, {REPO!r})
from configs import base
from lm.data import tokens as data_lib
real = data_lib.lock_lib.acquire
def slow(folder):
  held = real(folder)
  open({str(ready)!r}, 'w').close()
  time.sleep(3)
  return held
data_lib.lock_lib.acquire = slow
c = base.get_config()
c.data.update(max_bytes=50_000, cache_dir={cache!r})
ds = data_lib.prepare(c.data)
print(os.stat(os.path.join(ds.path, data_lib.INFO_JSON)).st_ino)
"""
  builder = subprocess.Popen([sys.executable, '-c', script], cwd=REPO, env=_env(),
                             stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
  deadline = time.time() + 120
  while not ready.exists() and time.time() < deadline and builder.poll() is None:
    time.sleep(0.05)
  assert ready.exists(), builder.communicate()[1][-2000:]
  c = base.get_config()
  c.data.update(max_bytes=50_000, cache_dir=cache)
  waited = time.time()
  ds = data_lib.prepare(c.data)
  waited = time.time() - waited
  out, err = builder.communicate(timeout=120)
  assert builder.returncode == 0, err[-2000:]
  assert os.stat(os.path.join(ds.path, data_lib.INFO_JSON)).st_ino == int(out.split()[-1])
  assert waited > 1.0                      # it waited for the builder instead of building
  assert sorted(os.listdir(cache)) == [os.path.basename(ds.path)]   # no partial folder left


def test_a_split_host_evaluates_many_batches(tmp_path):
  """A run over two CPU devices scores 128 validation batches and finishes. Unbounded, those 128
  executions of a program with an all-reduce made XLA:CPU abort the process (exit 134) after a
  40 s rendezvous timeout; shard_lib.map_bounded keeps at most MAX_IN_FLIGHT in flight."""
  workdir = str(tmp_path / 'run')
  overrides = {'mesh.cpu_devices': 2, 'model.n_layers': 1, 'model.d_model': 32,
               'model.n_heads': 2, 'train.seq_len': 32, 'train.batch_size': 2, 'train.steps': 2,
               'train.warmup_steps': 1, 'train.eval_every': 2, 'train.eval_batches': 128,
               'train.checkpoint_every': 2, 'data.corpus': 'synthetic',
               'data.synthetic_tokens': 20_000, 'data.cache_dir': str(tmp_path / 'cache')}
  cmd = [sys.executable, 'run.py', 'train', '--config=configs/tiny.py', f'--workdir={workdir}']
  cmd += [f'--config.{k}={v}' for k, v in overrides.items()]
  proc = subprocess.run(cmd, cwd=REPO, env=_env(), capture_output=True, text=True, timeout=300)
  assert proc.returncode == 0, proc.stderr[-3000:]
  with open(os.path.join(workdir, 'manifest.json')) as f:
    assert json.load(f)['mesh']['data'] == 2   # the batch really was split over two devices
  with open(os.path.join(workdir, 'metrics.jsonl')) as f:
    evals = [json.loads(line) for line in f if 'eval_loss' in line]
  assert len(evals) == 1 and np.isfinite(evals[0]['eval_loss'])
