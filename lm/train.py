"""Pretraining by next-token prediction: train state, jitted steps, the loop, resume.

`train(cfg, workdir)` is the whole job: it prepares the data, builds the mesh, creates (or
restores) the sharded state, trains with periodic evaluation and checkpoints, and writes
config.json, manifest.json, metrics.jsonl, TensorBoard events and summary.json into workdir.
"""
import dataclasses
import json
import math
import os
import platform
import signal
import subprocess
import sys
import time
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import optax
from jax.experimental import multihost_utils

from lm import checkpoint as ckpt_lib
from lm import data as data_lib
from lm import flops as flops_lib
from lm import metrics as metrics_lib
from lm import model as model_lib
from lm import sharding as shard_lib
from lm.config import ModelConfig
from lm.errors import UserError

SCHEDULES = ('cosine', 'wsd', 'constant')
# Keys that may change between an interrupted run and its resumption.
RESUMABLE_CHANGES = ('train.eval_every', 'train.log_every', 'train.checkpoint_every',
                     'train.keep_checkpoints', 'train.progress', 'train.peak_flops',
                     'data.cache_dir', 'mesh.data', 'mesh.fsdp', 'mesh.tensor',
                     'mesh.distributed', 'model.remat', 'model.attention_impl')


@dataclasses.dataclass(frozen=True)
class TrainConfig:
  """Optimisation, evaluation and checkpointing options (see configs/base.py)."""
  steps: int = 200
  batch_size: int = 16
  seq_len: int = 128
  lr: float = 3e-3
  warmup_steps: int = 20
  schedule: str = 'cosine'
  final_lr_fraction: float = 0.1
  decay_fraction: float = 0.2
  b1: float = 0.9
  b2: float = 0.99
  eps: float = 1e-8
  weight_decay: float = 0.1
  decay_embeddings: bool = False
  grad_clip: float = 1.0
  grad_accum: int = 1
  eval_every: int = 100
  eval_batches: int = 8
  log_every: int = 10
  checkpoint_every: int = 100
  keep_checkpoints: int = 2
  peak_flops: float = 0.0
  progress: str = 'auto'

  def __post_init__(self):
    p = 'train.'
    for key in ('steps', 'batch_size', 'seq_len', 'grad_accum', 'eval_every', 'eval_batches',
                'log_every', 'checkpoint_every', 'keep_checkpoints'):
      v = getattr(self, key)
      if not isinstance(v, int) or v < 1:
        raise UserError(f'{p}{key}={v} must be a positive integer.')
    if not self.lr > 0:
      raise UserError(f'{p}lr={self.lr} must be positive.')
    if not 0 <= self.warmup_steps < self.steps:
      raise UserError(f'{p}warmup_steps={self.warmup_steps} must be in [0, train.steps) '
                      f'= [0, {self.steps}).')
    if self.schedule not in SCHEDULES:
      raise UserError(f"{p}schedule={self.schedule!r} is not known; use one of "
                      f"{', '.join(SCHEDULES)}.")
    if not 0 <= self.final_lr_fraction <= 1:
      raise UserError(f'{p}final_lr_fraction={self.final_lr_fraction} must be in [0, 1].')
    if not 0 < self.decay_fraction <= 1:
      raise UserError(f'{p}decay_fraction={self.decay_fraction} must be in (0, 1].')
    if self.batch_size % self.grad_accum:
      raise UserError(f'{p}grad_accum={self.grad_accum} does not divide '
                      f'{p}batch_size={self.batch_size}; pick a divisor.')
    for key in ('b1', 'b2'):
      if not 0 <= getattr(self, key) < 1:
        raise UserError(f'{p}{key}={getattr(self, key)} must be in [0, 1).')
    if self.weight_decay < 0 or self.grad_clip < 0 or self.eps <= 0:
      raise UserError(f'{p}weight_decay, {p}grad_clip must be >= 0 and {p}eps > 0.')
    if self.progress not in ('auto', 'bar', 'log', 'none'):
      raise UserError(f"{p}progress={self.progress!r} must be auto, bar, log or none.")

  @classmethod
  def from_config(cls, train_cfg) -> 'TrainConfig':
    return cls(**dict(train_cfg))


def learning_rate_schedule(tc: TrainConfig) -> optax.Schedule:
  """Step -> learning rate. Warmup reaches the peak at step warmup_steps - 1 (from peak/W at 0);
  cosine and WSD reach peak * final_lr_fraction exactly at the last step (steps - 1)."""
  peak, final, W = tc.lr, tc.lr * tc.final_lr_fraction, tc.warmup_steps
  parts, bounds = [], []
  if W > 0:
    parts.append(optax.linear_schedule(peak / W, peak, max(W - 1, 1)))
    bounds.append(W)
  rest = tc.steps - W                 # steps from the end of warmup to the end, inclusive
  if tc.schedule == 'cosine':
    parts.append(optax.cosine_decay_schedule(peak, max(rest - 1, 1), alpha=tc.final_lr_fraction))
  elif tc.schedule == 'constant':
    parts.append(optax.constant_schedule(peak))
  else:  # wsd: stable at the peak, then a linear decay over the last decay_fraction of steps
    decay = min(max(1, round(tc.decay_fraction * tc.steps)), rest)
    if rest - decay > 0:
      parts.append(optax.constant_schedule(peak))
      bounds.append(tc.steps - decay)
    parts.append(optax.linear_schedule(peak, final, max(decay - 1, 1)))
  return parts[0] if len(parts) == 1 else optax.join_schedules(parts, bounds)


def decay_mask(params, decay_embeddings: bool):
  """True for weight matrices; norms, biases and (unless asked) embeddings are not decayed."""
  def keep(path, x):
    name = str(getattr(path[-1], 'key', path[-1]))
    if name in ('embed', 'pos_embed'):
      return decay_embeddings
    return name in ('wq', 'wk', 'wv', 'wo', 'wi', 'wg', 'head')
  return jax.tree_util.tree_map_with_path(keep, params)


def make_optimizer(tc: TrainConfig, params) -> optax.GradientTransformation:
  """AdamW with the decay mask, after global-norm clipping (clip 0 disables it)."""
  adamw = optax.adamw(learning_rate_schedule(tc), b1=tc.b1, b2=tc.b2, eps=tc.eps,
                      weight_decay=tc.weight_decay, mask=decay_mask(params, tc.decay_embeddings))
  if tc.grad_clip > 0:
    return optax.chain(optax.clip_by_global_norm(tc.grad_clip), adamw)
  return adamw


def next_token_loss(mc: ModelConfig, params, batch_BT1, rng=None):
  """Mean next-token cross-entropy (float32) of windows [B, T+1]."""
  inputs, targets = batch_BT1[:, :-1], batch_BT1[:, 1:]
  deterministic = rng is None or mc.dropout == 0
  logits = model_lib.apply(mc, params, inputs, deterministic=deterministic,
                           rngs=None if deterministic else {'dropout': rng})
  return optax.softmax_cross_entropy_with_integer_labels(logits, targets).mean()


def make_train_step(mc: ModelConfig, tc: TrainConfig, optimizer, seed: int):
  """(state, batch [B, T+1]) -> (state, metrics); micro-batches are summed when grad_accum > 1."""
  grad_fn = jax.value_and_grad(lambda p, b, r: next_token_loss(mc, p, b, r))
  A = tc.grad_accum

  def step(state, batch):
    rng = jax.random.fold_in(jax.random.PRNGKey(seed), state['step'])
    params = state['params']
    if A == 1:
      loss, grads = grad_fn(params, batch, rng)
    else:
      # Row i*A + a goes to micro-batch a, so each micro-batch spans every data shard.
      micro = batch.reshape(batch.shape[0] // A, A, -1).swapaxes(0, 1)

      def body(carry, xs):
        mb, i = xs
        l, g = grad_fn(params, mb, jax.random.fold_in(rng, i))
        return jax.tree.map(jnp.add, carry, (l, g)), None
      zero = (jnp.zeros((), jnp.float32), jax.tree.map(jnp.zeros_like, params))
      (loss, grads), _ = jax.lax.scan(body, zero, (micro, jnp.arange(A)))
      loss, grads = loss / A, jax.tree.map(lambda g: g / A, grads)
    updates, opt_state = optimizer.update(grads, state['opt_state'], params)
    new_state = {'params': optax.apply_updates(params, updates), 'opt_state': opt_state,
                 'step': state['step'] + 1}
    return new_state, {'loss': loss, 'grad_norm': optax.global_norm(grads)}
  return step


def _git_commit() -> str | None:
  try:
    out = subprocess.run(['git', 'rev-parse', 'HEAD'], capture_output=True, text=True, timeout=5,
                         cwd=os.path.dirname(os.path.abspath(__file__)))
    return out.stdout.strip() or None
  except (OSError, subprocess.SubprocessError):
    return None


def _versions() -> dict:
  import flax
  import orbax.checkpoint
  return {'python': platform.python_version(), 'jax': jax.__version__,
          'jaxlib': jax.lib.__version__ if hasattr(jax.lib, '__version__') else None,
          'flax': flax.__version__, 'optax': optax.__version__,
          'orbax_checkpoint': orbax.checkpoint.__version__, 'numpy': np.__version__}


def _flatten(d, prefix=''):
  out = {}
  for k, v in d.items():
    if isinstance(v, dict):
      out.update(_flatten(v, f'{prefix}{k}.'))
    else:
      out[f'{prefix}{k}'] = v
  return out


def check_resumable(old: dict, new: dict) -> None:
  """Refuses to resume a run whose config differs in anything but harmless keys."""
  a, b = _flatten(old), _flatten(new)
  diff = sorted(k for k in set(a) | set(b) if a.get(k) != b.get(k) and k not in RESUMABLE_CHANGES)
  if diff:
    shown = ', '.join(f'{k} ({a.get(k)!r} -> {b.get(k)!r})' for k in diff[:4])
    raise UserError(f'The workdir holds a run with a different config ({shown}); '
                    'use a new --workdir or the same settings to resume.')


@dataclasses.dataclass
class Run:
  """Everything the loop, the evaluation and the tests need about one configured run."""
  cfg: dict
  model: ModelConfig
  train: TrainConfig
  dataset: Any
  mesh: Any
  state_shardings: Any
  abstract_state: Any
  init_state: Any
  train_step: Any
  eval_step: Any
  optimizer: Any
  n_params: dict
  flops_per_token: dict
  eval_data: Any = None


def build(cfg) -> Run:
  """Data, model, mesh, optimizer and jitted steps for a config (no state is created yet)."""
  seed = int(cfg.seed)
  tc = TrainConfig.from_config(cfg.train)
  mesh_cfg = shard_lib.MeshConfig.from_config(cfg.mesh)
  shard_lib.maybe_initialize_distributed(mesh_cfg)
  mesh = shard_lib.make_mesh(mesh_cfg)   # before the data: a bad mesh fails in a second
  dataset = data_lib.prepare(data_lib.DataConfig.from_config(cfg.data))
  mc = ModelConfig.from_config(cfg.model, dataset.tokenizer.vocab_size)
  if tc.seq_len > mc.max_len:
    raise UserError(f'train.seq_len={tc.seq_len} is longer than model.max_len={mc.max_len}; '
                    'lower seq_len or raise max_len.')
  shard_lib.check_divisibility(mesh, mc, tc.batch_size)
  dataset.check(tc.batch_size, tc.seq_len, jax.process_count())

  param_shapes = model_lib.param_shapes(mc)
  p_shard = shard_lib.param_shardings(mesh, model_lib.logical_specs(mc), param_shapes)
  optimizer = make_optimizer(tc, param_shapes)

  def init_state(rng):
    params = model_lib.init_params(mc, rng)
    return {'params': params, 'opt_state': optimizer.init(params),
            'step': jnp.zeros((), jnp.int32)}
  state_shapes = jax.eval_shape(init_state, jax.random.PRNGKey(0))
  s_shard = shard_lib.state_shardings(mesh, state_shapes, p_shard)
  s_shard['params'] = p_shard
  batch_sh = shard_lib.batch_sharding(mesh)
  replicated = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec())

  init_fn = jax.jit(init_state, out_shardings=s_shard)
  train_step = jax.jit(make_train_step(mc, tc, optimizer, seed),
                       in_shardings=(s_shard, batch_sh), out_shardings=(s_shard, replicated),
                       donate_argnums=0)
  eval_step = jax.jit(lambda p, b: next_token_loss(mc, p, b),
                      in_shardings=(p_shard, batch_sh), out_shardings=replicated)
  counts = flops_lib.param_counts(param_shapes)
  return Run(cfg=cfg.to_dict(), model=mc, train=tc, dataset=dataset, mesh=mesh,
             state_shardings=s_shard, abstract_state=ckpt_lib.abstract(state_shapes, s_shard),
             init_state=init_fn, train_step=train_step, eval_step=eval_step,
             optimizer=optimizer, n_params=counts,
             flops_per_token=flops_lib.flops_per_token(mc, tc.seq_len, counts['total']))


def get_batch(run: Run, split: str, index: int):
  """The global batch `index` of a split, placed with the batch sharding."""
  tc = run.train
  rows = run.dataset.batch(split, index, tc.batch_size, tc.seq_len, seed=int(run.cfg['seed']),
                           process_index=jax.process_index(),
                           process_count=jax.process_count())
  return shard_lib.global_batch(rows, run.mesh)


def evaluate(run: Run, params) -> float:
  """Mean loss over the fixed validation batches (the same windows at every evaluation)."""
  tc = run.train
  if run.eval_data is None:
    rows = run.dataset.eval_batches(tc.eval_batches, tc.batch_size, tc.seq_len,
                                    jax.process_index(), jax.process_count())
    run.eval_data = [shard_lib.global_batch(r, run.mesh) for r in rows]
  losses = [run.eval_step(params, b) for b in run.eval_data]
  return float(np.mean(jax.device_get(losses)))


def manifest(run: Run) -> dict:
  dev = jax.devices()[0]
  mc = run.model
  return {
      'versions': _versions(), 'git_commit': _git_commit(), 'command': sys.argv,
      'device_kind': dev.device_kind, 'platform': dev.platform,
      'device_count': jax.device_count(), 'process_count': jax.process_count(),
      'mesh': dict(zip(run.mesh.axis_names, run.mesh.devices.shape)),
      'data': run.dataset.info,
      'params': run.n_params['total'], 'params_nonembed': run.n_params['nonembed'],
      'flops_per_token': {'chinchilla_appendix_f': run.flops_per_token['chinchilla'],
                          '6n': run.flops_per_token['6n']},
      'flops_convention': 'flops = Chinchilla App. F count (3x forward, embeddings, attention '
                          'and logits included); flops_6nd = 6 * N_total * tokens',
      'model': dataclasses.asdict(mc), 'head_dim': mc.head_dim,
      'epochs': run.dataset.epochs(run.train.steps, run.train.batch_size, run.train.seq_len),
  }


class _StopFlag:
  """Turns SIGTERM into a request to checkpoint and stop at the next step boundary."""

  def __init__(self):
    self.stop = False
    self.previous = None

  def __enter__(self):
    try:
      self.previous = signal.signal(signal.SIGTERM, self._handle)
    except ValueError:  # not the main thread: no signal handling
      self.previous = None
    return self

  def _handle(self, *_):
    self.stop = True

  def __exit__(self, *exc):
    if self.previous is not None:
      signal.signal(signal.SIGTERM, self.previous)


def train(cfg, workdir: str, stop_at: int | None = None) -> dict:
  """Trains (or resumes) the run in workdir; returns the summary. `stop_at` simulates a kill."""
  os.makedirs(workdir, exist_ok=True)
  config_path = os.path.join(workdir, 'config.json')
  new_cfg = json.loads(cfg.to_json())
  if os.path.exists(config_path):
    with open(config_path) as f:
      check_resumable(json.load(f), new_cfg)
  summary_path = os.path.join(workdir, 'summary.json')

  run = build(cfg)  # first: it joins a multi-host job, which must precede any other jax call
  is_main = jax.process_index() == 0
  tc = run.train
  if is_main:
    metrics_lib.write_json_atomic(config_path, new_cfg)
    metrics_lib.write_json_atomic(os.path.join(workdir, 'manifest.json'), manifest(run))
    run.dataset.tokenizer.save(os.path.join(workdir, 'tokenizer'))

  ckpts = ckpt_lib.Checkpoints(os.path.join(workdir, 'checkpoints'), tc.keep_checkpoints)
  state, start = ckpts.restore_latest(run.abstract_state)
  if state is None:
    state, start = run.init_state(jax.random.PRNGKey(int(cfg.seed))), 0
  if start >= tc.steps and os.path.exists(summary_path):
    ckpts.close()
    with open(summary_path) as f:
      return json.load(f)

  writer = metrics_lib.MetricsWriter(workdir, start, enabled=is_main)
  progress = metrics_lib.Progress(tc.steps, start, tc.progress, enabled=is_main)
  if start:
    progress.message(f'resuming from step {start}')
  tokens_per_step = tc.batch_size * tc.seq_len
  fpt = run.flops_per_token
  peak = flops_lib.peak_flops(jax.devices()[0].device_kind, run.model.dtype, tc.peak_flops)
  schedule = learning_rate_schedule(tc)
  bpt = run.dataset.bytes_per_token('val')
  last_row, eval_loss = None, None
  pending = None                      # (step, metrics on device): pulled one step later
  since = {'time': time.time(), 'step': start, 'losses': []}   # since the last written row

  def finish_row(step, m):
    """Host-side metrics of one step; the row's averages cover the steps since the last row."""
    m = jax.device_get(m)
    loss = float(m['loss'])
    if not math.isfinite(loss):
      raise UserError(f'The loss became {loss} at step {step}; the last good checkpoint is kept. '
                      'Lower train.lr or raise train.warmup_steps, then rerun to resume.')
    since['losses'].append(loss)
    tokens = step * tokens_per_step
    return {'step': step, 'loss': loss, 'loss_avg': float(np.mean(since['losses'])),
            'grad_norm': float(m['grad_norm']), 'lr': float(schedule(step - 1)),
            'tokens': tokens, 'flops': tokens * fpt['chinchilla'],
            'flops_6nd': tokens * fpt['6n']}

  def write(row):
    nonlocal last_row
    now = time.time()
    tps = (row['step'] - since['step']) * tokens_per_step / max(now - since['time'], 1e-9)
    row.update(tokens_per_s=tps, time=now)
    if peak:
      row['mfu'] = tps * fpt['chinchilla'] / (peak * jax.device_count())
    writer.write(row)
    progress.update(row['step'], row)
    since.update(time=now, step=row['step'], losses=[])
    last_row = row

  stopped = False
  with _StopFlag() as flag:
    step = start
    while step < tc.steps:
      batch = get_batch(run, 'train', step)
      state, m = run.train_step(state, batch)
      step += 1
      if pending is not None:
        row = finish_row(*pending)
        if pending[0] % tc.log_every == 0:
          write(row)
      pending = (step, m)
      is_eval = step % tc.eval_every == 0 or step == tc.steps
      stop = flag.stop
      if jax.process_count() > 1 and step % tc.log_every == 0:
        # Every host must stop at the same step, or the others wait forever in the next step.
        stop = bool(multihost_utils.process_allgather(np.int32(flag.stop)).max())
      elif jax.process_count() > 1:
        stop = False
      if is_eval or step % tc.checkpoint_every == 0 or stop or step == stop_at:
        row = finish_row(*pending)   # makes sure the state is finite before saving it
        pending = None
        if is_eval:
          eval_loss = evaluate(run, state['params'])
          row.update(eval_loss=eval_loss, eval_ppl=math.exp(min(eval_loss, 50)))
          if bpt:
            row['eval_bpb'] = eval_loss / (math.log(2) * bpt)
        if is_eval or step % tc.log_every == 0:
          write(row)
        ckpts.save(step, state)
        if stop or step == stop_at:
          stopped = True
          progress.message(f'stopped at step {step}; checkpoint saved, rerun to resume.')
          break
  progress.close()
  writer.close()
  ckpts.close()
  # final_loss: the mean train loss over the last logging interval (one batch is too noisy).
  summary = {'steps': step, 'final_loss': last_row['loss_avg'] if last_row else None,
             'eval_loss': eval_loss, 'tokens': step * tokens_per_step,
             'flops': step * tokens_per_step * fpt['chinchilla'],
             'flops_6nd': step * tokens_per_step * fpt['6n'],
             'params': run.n_params['total'], 'params_nonembed': run.n_params['nonembed'],
             'finished': not stopped}
  if not stopped and is_main:
    metrics_lib.write_json_atomic(summary_path, summary)
  return summary
