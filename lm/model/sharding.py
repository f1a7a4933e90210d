"""Device mesh, logical-axis rules and the shardings of params, optimizer state and batches.

One Mesh with axes ('data', 'fsdp', 'tensor'). The model names logical axes only; RULES maps
them to mesh axes:
  data parallel:   the batch is split over data and fsdp;
  FSDP:            parameters' `embed` axis is split over fsdp (gathered per layer by XLA);
  tensor parallel: `heads`, `kv_heads`, `mlp` and `vocab` over tensor (Megatron-style).
A parameter dimension that the mesh axis does not divide evenly stays replicated.

Activations follow the same rules, except that their model width is never split: FSDP shards
the weights, not the hidden states. `constrain` pins them inside a step traced under
`activation_constraints(mesh)` (the training and evaluation steps of lm/stages/pretrain.py), so XLA's
partitioner keeps the intended plan (batch over data x fsdp, heads and MLP units over tensor)
instead of guessing one, which could move whole activations between devices.
"""
import contextlib
import contextvars
import dataclasses
import math
import os

import jax
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

from lm.config import read_section
from lm.errors import UserError
from lm.host import host_cores

AXES = ('data', 'fsdp', 'tensor')
RULES = (
    ('batch', ('data', 'fsdp')),
    ('embed', 'fsdp'),
    ('heads', 'tensor'),
    ('kv_heads', 'tensor'),
    ('mlp', 'tensor'),
    ('vocab', 'tensor'),
    ('head_dim', None),
    ('norm', None),
    ('pos', None),
    ('layers', None),
)


@dataclasses.dataclass(frozen=True)
class MeshConfig:
  data: int = -1
  fsdp: int = 1
  tensor: int = 1
  distributed: bool = False
  cpu_devices: int = 0   # a CPU host split into this many devices; 0: one per core (split_host)

  @classmethod
  def from_config(cls, mesh_cfg) -> 'MeshConfig':
    return cls(**read_section(cls, mesh_cfg, 'mesh'))


def maybe_initialize_distributed(mc: MeshConfig) -> None:
  """Joins a multi-host job when asked (mesh.distributed) or when a cluster says so.

  `jax.distributed.initialize()` with no arguments reads the coordinator, process count and
  index from SLURM, Open MPI or TPU pod metadata; JAX_COORDINATOR_ADDRESS, JAX_NUM_PROCESSES
  and JAX_PROCESS_ID set them by hand (e.g. several processes on one machine). It must run
  before anything else touches jax devices.
  """
  explicit = os.environ.get('JAX_COORDINATOR_ADDRESS')
  if not (mc.distributed or explicit):
    return
  if jax.distributed.is_initialized():
    return
  if explicit:
    try:
      n, i = int(os.environ['JAX_NUM_PROCESSES']), int(os.environ['JAX_PROCESS_ID'])
    except (KeyError, ValueError):
      raise UserError('JAX_COORDINATOR_ADDRESS is set, so JAX_NUM_PROCESSES and JAX_PROCESS_ID '
                      'must be set to integers too.') from None
    jax.distributed.initialize(explicit, n, i)
    return
  try:
    jax.distributed.initialize()
  except ValueError as e:  # no cluster environment detected
    raise UserError(f'mesh.distributed=True but no SLURM, Open MPI or TPU pod environment was '
                    f'found ({e}); set JAX_COORDINATOR_ADDRESS, JAX_NUM_PROCESSES and '
                    'JAX_PROCESS_ID, or drop mesh.distributed.') from None


def mesh_shape(mc: MeshConfig, n_devices: int) -> tuple[int, int, int]:
  """Resolves -1 (the rest of the devices) and checks the product against the device count."""
  sizes = [mc.data, mc.fsdp, mc.tensor]
  if sum(s == -1 for s in sizes) > 1:
    raise UserError('Only one of mesh.data, mesh.fsdp, mesh.tensor may be -1.')
  for name, s in zip(AXES, sizes):
    if s == 0 or s < -1:
      raise UserError(f'mesh.{name}={s} must be a positive integer or -1 (the rest).')
  known = int(np.prod([s for s in sizes if s != -1]))
  if -1 in sizes:
    if n_devices % known:
      raise UserError(f'The mesh axes given multiply to {known}, which does not divide the '
                      f'{n_devices} devices; change mesh.data/fsdp/tensor.')
    sizes[sizes.index(-1)] = n_devices // known
  if int(np.prod(sizes)) != n_devices:
    raise UserError(f'The mesh {tuple(sizes)} (data, fsdp, tensor) holds {int(np.prod(sizes))} '
                    f'devices but {n_devices} are present; make the product equal {n_devices} '
                    'or set one axis to -1.')
  return tuple(sizes)


# The CPU device count this process chose for itself (split_host), 0 if it did not choose.
_host_split = {'devices': 0}
MAX_HOST_DEVICES = 8


def split_host(cpu_devices: int = 0) -> int:
  """Splits a CPU host into several XLA devices before JAX's backend starts, so that a step's
  batch is computed as data-parallel shards side by side on the cores.

  XLA:CPU fills two cores poorly with one small program (its batched attention matmuls run on
  one thread); the same step split over one device per core ran 1.10-1.15x faster on two cores
  (benchmarks/README.md). cpu_devices=0 (mesh.cpu_devices) takes one device per core this
  process may use, at most MAX_HOST_DEVICES; 1 keeps one device. Nothing changes when the
  caller chose a count already (XLA_FLAGS' --xla_force_host_platform_device_count or
  jax_num_cpu_devices), in a multi-process job, or once JAX has started. Accelerators ignore the
  CPU's device count. Returns the count this call set, else 0.
  """
  if cpu_devices < 0:
    raise UserError(f'mesh.cpu_devices={cpu_devices} must be 0 (one per core) or a positive '
                    'count.')
  n = cpu_devices or min(host_cores(), MAX_HOST_DEVICES)
  if (n <= 1 or _host_split['devices'] or jax.config.jax_num_cpu_devices != -1
      or 'xla_force_host_platform_device_count' in os.environ.get('XLA_FLAGS', '')
      or os.environ.get('JAX_COORDINATOR_ADDRESS') or jax.distributed.is_initialized()):
    return 0
  try:
    jax.config.update('jax_num_cpu_devices', n)
  except RuntimeError:   # JAX has started in this process: its devices stay as they are
    return 0
  _host_split['devices'] = n
  return n


def make_mesh(mc: MeshConfig, devices=None, batch_size: int | None = None) -> Mesh:
  """The mesh over `devices` (default: all, after split_host(mc.cpu_devices)). On CPU devices
  the process split itself into, a pure data mesh takes the most of them that divide
  batch_size, so any batch runs (the rest stay idle)."""
  if devices is None:
    split_host(mc.cpu_devices)
    devices = jax.devices()
    if (batch_size and _host_split['devices'] and devices[0].platform == 'cpu'
        and (mc.data, mc.fsdp, mc.tensor) == (-1, 1, 1)):
      devices = devices[:math.gcd(len(devices), batch_size)]
  shape = mesh_shape(mc, len(devices))
  return Mesh(np.asarray(devices).reshape(shape), AXES)


def check_divisibility(mesh: Mesh, model_cfg, batch_size: int) -> None:
  """The errors that would otherwise surface as an XLA failure after compiling."""
  dp = mesh.shape['data'] * mesh.shape['fsdp']
  if batch_size % dp:
    raise UserError(f'train.batch_size={batch_size} is not divisible by the data axes '
                    f'(data x fsdp = {dp}); pick a multiple of {dp}.')
  tp = mesh.shape['tensor']
  for key in ('n_heads', 'n_kv_heads', 'd_ff'):
    v = getattr(model_cfg, key)
    if v % tp:
      raise UserError(f'model.{key}={v} is not divisible by mesh.tensor={tp}; '
                      'change one of them.')
  check_process_layout(mesh)


def check_process_layout(mesh: Mesh) -> None:
  """Each process must own whole batch shards, the same number of them.

  Every process reads only its own rows (lm/data/tokens.py) and `global_batch` places them on its
  devices, so a batch shard whose devices span two processes (mesh.tensor across hosts, or
  data x fsdp smaller than the process count) would need rows no single process has.
  """
  procs = np.vectorize(lambda d: d.process_index, otypes=[int])(mesh.devices)
  n_proc = len(np.unique(procs))
  if n_proc == 1:
    return
  # Row b of by_shard is batch shard b (data-major, then fsdp); its columns differ in tensor.
  by_shard = procs.reshape(-1, procs.shape[-1])
  owners = by_shard[:, 0]
  _, shares = np.unique(owners, return_counts=True)
  if not (by_shard == owners[:, None]).all() or len(set(shares)) != 1:
    raise UserError(f'The mesh {tuple(mesh.devices.shape)} (data, fsdp, tensor) splits a batch '
                    f'shard across processes; make data x fsdp a multiple of the {n_proc} '
                    'processes and keep mesh.tensor within one host.')


def _mesh_axes(logical: str | None):
  for name, target in RULES:
    if name == logical:
      return target
  if logical is None:
    return None
  raise ValueError(f'logical axis {logical!r} has no rule in lm.model.sharding.RULES')


def spec_for(logical_spec: P, shape: tuple[int, ...], mesh: Mesh) -> P:
  """Mesh PartitionSpec for one array; dimensions the mesh axis does not divide stay whole."""
  out = []
  for dim, logical in zip(shape, tuple(logical_spec) + (None,) * (len(shape) - len(logical_spec))):
    target = _mesh_axes(logical)
    names = (target,) if isinstance(target, str) else (target or ())
    size = int(np.prod([mesh.shape[n] for n in names])) if names else 1
    out.append(target if names and dim % size == 0 and size > 1 else None)
  return P(*out)


def param_shardings(mesh: Mesh, logical_specs, shapes):
  """NamedShardings for the params tree from its logical specs."""
  return jax.tree.map(lambda spec, s: NamedSharding(mesh, spec_for(spec, s.shape, mesh)),
                      logical_specs, shapes, is_leaf=lambda x: isinstance(x, P))


def _path_key(path) -> tuple[str, ...]:
  return tuple(str(getattr(k, 'key', getattr(k, 'name', getattr(k, 'idx', k)))) for k in path)


def state_shardings(mesh: Mesh, state_shapes, params_shardings):
  """Shardings for any state tree whose leaves mirror params (optimizer moments) or are scalars.

  A leaf takes the sharding of the param whose path is the longest suffix of its own path and
  whose shape matches; anything else (step counters, scalars) is replicated.
  """
  by_path = {_path_key(p): s for p, s in jax.tree_util.tree_flatten_with_path(params_shardings)[0]}
  replicated = NamedSharding(mesh, P())

  def pick(path, leaf):
    key = _path_key(path)
    for i in range(len(key)):
      s = by_path.get(key[i:])
      if s is not None and len(s.spec) <= len(leaf.shape):
        return s
    return replicated
  return jax.tree_util.tree_map_with_path(pick, state_shapes)


def batch_sharding(mesh: Mesh) -> NamedSharding:
  return NamedSharding(mesh, P(_mesh_axes('batch')))


def global_batch(local_rows: np.ndarray, mesh: Mesh) -> jax.Array:
  """Assembles each process's rows into one global array sharded over the data axes."""
  sharding = batch_sharding(mesh)
  n = jax.process_count()
  if n == 1:
    return jax.device_put(local_rows, sharding)
  # Stated, not inferred, so a process holding the wrong number of rows fails loudly.
  shape = (local_rows.shape[0] * n,) + local_rows.shape[1:]
  return jax.make_array_from_process_local_data(sharding, local_rows, shape)


# At most this many executions of one program may be dispatched and unfinished (map_bounded).
# XLA:CPU aborts the process when many executions of a program with collectives (any program
# over several CPU devices, e.g. a host split by split_host) are in flight at once: from about 40
# on a 2-core host (32 finished in every trial; benchmarks/cpu_in_flight.py), the shares of one
# execution wait in an all-reduce for a partner share that never starts, and the rendezvous's
# 40 s timeout ends the process. Chaining the executions through a data dependency does not
# prevent it; bounding the number in flight does. 8 keeps a device's queue full at no measurable
# cost.
MAX_IN_FLIGHT = 8


def map_bounded(fn, items, limit: int = MAX_IN_FLIGHT) -> list:
  """[fn(x) for x in items] with at most `limit` of the results not yet computed: every loop that
  dispatches many jitted calls before reading any (evaluation over many batches) goes through
  here, so a multi-device CPU program cannot pile up executions (see MAX_IN_FLIGHT)."""
  out = []
  for x in items:
    if len(out) >= limit:
      jax.block_until_ready(out[-limit])
    out.append(fn(x))
  return out


_ACTIVATION_MESH = contextvars.ContextVar('activation_mesh', default=None)


@contextlib.contextmanager
def activation_constraints(mesh: Mesh):
  """While a step is traced inside this block, `constrain` pins activations on `mesh`."""
  token = _ACTIVATION_MESH.set(mesh if mesh.size > 1 else None)
  try:
    yield
  finally:
    _ACTIVATION_MESH.reset(token)


def with_activation_constraints(fn, mesh: Mesh):
  """fn traced (whenever jit traces it) under activation_constraints(mesh)."""
  def traced(*args, **kwargs):
    with activation_constraints(mesh):
      return fn(*args, **kwargs)
  return traced


def batch_shards() -> int:
  """How many ways the batch is split on the mesh a step is being traced for (1 outside
  `activation_constraints`, where a single-device step is traced)."""
  mesh = _ACTIVATION_MESH.get()
  return 1 if mesh is None else _split_size(mesh, _mesh_axes('batch'))


def _split_size(mesh: Mesh, target) -> int:
  """How many ways the mesh axes `target` (one name, a tuple of names or None) split a dim."""
  names = (target,) if isinstance(target, str) else (target or ())
  return int(np.prod([mesh.shape[n] for n in names]))


def constrain(x, *logical):
  """x pinned to the mesh by the logical names of its dimensions (None: not split; 'embed' is
  never split for activations). A dimension its mesh axes do not divide is left to XLA. Outside
  `activation_constraints` (sampling, single-device runs) x comes back unchanged."""
  mesh = _ACTIVATION_MESH.get()
  if mesh is None:
    return x
  out = []
  for dim, name in zip(x.shape, logical):
    target = None if name in (None, 'embed') else _mesh_axes(name)
    out.append(target if dim % _split_size(mesh, target) == 0 else P.UNCONSTRAINED)
  return jax.lax.with_sharding_constraint(x, NamedSharding(mesh, P(*out)))
