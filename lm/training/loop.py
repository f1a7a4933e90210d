"""The one training loop that every objective runs through.

A `Stage` says what differs between pretraining, fine-tuning and later objectives: the loss (as a
jitted step over a train state and a frozen tree), the batches, the evaluation, how the state is
initialised, and what the workdir records. `run(stage, workdir)` does the rest, identically for
all of them: config.json (a rerun with other settings is refused), manifest.json, the tokenizer,
orbax checkpoints with exact resume, metrics.jsonl and TensorBoard, progress, SIGTERM (checkpoint
and stop at the next step), a NaN stop that keeps the last good checkpoint, and summary.json.

The state is {'params': the trainable tree, 'opt_state', 'step'}; `frozen` is an input to every
step that is never differentiated and never checkpointed with the run (a LoRA run's base model,
or None). `make_step` builds a step from a loss of (trainable, frozen, batch, rng) returning
(loss sum, weight): the reported loss is sum / weight over the whole batch, so micro-batches of
unequal weight (a packed fine-tuning batch's response tokens) accumulate exactly.
"""
import dataclasses
import json
import math
import os
import signal
import time
from typing import Any, Callable

import jax
import jax.numpy as jnp
import numpy as np
import optax
from jax.experimental import multihost_utils

from lm.training import checkpoint as ckpt_lib
from lm.model import flops as flops_lib
from lm import metrics as metrics_lib
from lm.errors import UserError
from lm.model import sharding as shard_lib
from lm.training.optim import TrainConfig, learning_rate_schedule, micro_batches, side_by_side

# Keys that may change between an interrupted run and its resumption.
RESUMABLE_CHANGES = ('train.eval_every', 'train.log_every', 'train.checkpoint_every',
                     'train.keep_checkpoints', 'train.progress', 'train.peak_flops',
                     'data.cache_dir', 'mesh.data', 'mesh.fsdp', 'mesh.tensor',
                     'mesh.distributed', 'model.remat', 'model.attention_impl',
                     'train.eval_tasks', 'train.eval_tasks_every', 'train.eval_task_examples',
                     'train.eval_shots', 'train.profile_steps', 'train.async_checkpoint',
                     'train.micro_batch_tokens', 'mesh.cpu_devices')

# Keys added after runs existed, with the value that means what their absence meant: a config
# written before a key existed equals one that sets it to this default.
ADDED_KEYS = {'train.async_checkpoint': True, 'train.profile_steps': '', 'train.opt_dtype': 'float32', 'model.param_dtype': 'float32', 'train.init_from': '', 'data.tokenizer_path': '',
              'data.arith_fraction': 0.0,
              'data.arith_digits': 4, 'train.eval_tasks': '', 'train.eval_tasks_every': 0,
              'train.eval_task_examples': 100, 'train.eval_shots': 3, 'mesh.cpu_devices': 1}

LossFn = Callable[[Any, Any, Any, Any], tuple[jax.Array, jax.Array]]


def make_step(loss_fn: LossFn, tc: TrainConfig, optimizer, seed: int,
              row_wise: bool = False):
  """(state, frozen, batch) -> (state, metrics) for loss_fn(trainable, frozen, batch, rng) ->
  (loss sum, weight), or (loss sum, (weight, {name: sum})) for further metrics, which are
  reported as sum / weight like the loss. With A micro-batches, the batch's rows i*A + a form
  micro-batch a. A is train.grad_accum; row_wise (a loss whose rows are independent examples)
  lets a CPU step use more, of about train.micro_batch_tokens tokens (optim.micro_batches)."""
  def split_loss(*args):
    total, aux = loss_fn(*args)
    weight, extra = aux if isinstance(aux, tuple) else (aux, {})
    return total, (weight, extra)
  grad_fn = jax.value_and_grad(split_loss, has_aux=True)

  def step(state, frozen, batch):
    rng = jax.random.fold_in(jax.random.PRNGKey(seed), state['step'])
    params = state['params']
    A, P = tc.grad_accum, 1
    if row_wise:   # decided when the step is traced: the batch's rows, mesh and backend
      shards, platform = shard_lib.batch_shards(), jax.default_backend()
      A = micro_batches(tc, jax.tree.leaves(batch)[0].shape[0], shards, platform)
      P = side_by_side(A, shards, platform)
    if A == 1:
      (total, (weight, extra)), grads = grad_fn(params, frozen, batch, rng)
    else:
      # Row i*A + a goes to micro-batch a, so each micro-batch spans every data shard. The loop
      # takes P micro-batches an iteration (j*P + p, side by side, optim.side_by_side) and adds
      # their sums in micro-batch order.
      def split(x):
        rows = x.shape[0] // A
        x = x.reshape(rows, A, *x.shape[1:]).swapaxes(0, 1)
        return x.reshape(A // P, P, rows, *x.shape[2:])
      micro = jax.tree.map(split, batch)

      def body(carry, xs):
        mbs, idx = xs
        for p in range(P):
          mb = jax.tree.map(lambda x: x[p], mbs)
          (l, (w, e)), g = grad_fn(params, frozen, mb, jax.random.fold_in(rng, idx[p]))
          carry = jax.tree.map(jnp.add, carry, (l, w, e, g))
        return carry, None
      first = jax.tree.map(lambda x: x[0, 0], micro)
      shapes = jax.eval_shape(grad_fn, params, frozen, first, rng)
      (_, (_, e_shape)), _ = shapes
      zero = (jnp.zeros((), jnp.float32), jnp.zeros((), jnp.float32),
              jax.tree.map(lambda s: jnp.zeros(s.shape, s.dtype), e_shape),
              jax.tree.map(jnp.zeros_like, params))
      (total, weight, extra, grads), _ = jax.lax.scan(
          body, zero, (micro, jnp.arange(A).reshape(A // P, P)))
    weight = jnp.maximum(weight, 1e-9)   # a batch with nothing to learn from gives loss 0
    loss, grads = total / weight, jax.tree.map(lambda g: g / weight, grads)
    updates, opt_state = optimizer.update(grads, state['opt_state'], params)
    new_state = {'params': optax.apply_updates(params, updates), 'opt_state': opt_state,
                 'step': state['step'] + 1}
    metrics = {k: v / weight for k, v in extra.items()}
    metrics.update(loss=loss, grad_norm=optax.global_norm(grads))
    return new_state, metrics
  return step


@dataclasses.dataclass
class Stage:
  """What `run` needs from one objective.

  batch(step) gives the global batch of a step (a pure function of the step, for exact resume);
  evaluate(params, frozen) gives the fields of an evaluation row (e.g. eval_loss); summary(
  last_eval) gives the stage's own summary.json fields; task_eval(params, step), when set, adds
  task metrics to evaluation rows (lm/eval/evaluate.py: train.eval_tasks).
  """
  config: dict
  train: TrainConfig
  dtype: str
  manifest: Callable[[], dict]
  tokenizer: Any
  abstract_state: Any
  init_state: Callable[[], Any]
  frozen: Any
  train_step: Any
  batch: Callable[[int], Any]
  evaluate: Callable[[Any, Any], dict]
  tokens_per_step: int
  flops_per_token: dict
  n_params: dict
  summary: Callable[[dict], dict] | None = None
  resumable_changes: tuple = RESUMABLE_CHANGES
  # A step that is dispatched asynchronously has its metrics pulled one step later, so the host
  # never waits on the device; a step that returns host values (PPO) is finished at once.
  defer_metrics: bool = True
  task_eval: Callable[[Any, int], dict] | None = None


def flatten(d, prefix=''):
  out = {}
  for k, v in d.items():
    if isinstance(v, dict):
      out.update(flatten(v, f'{prefix}{k}.'))
    else:
      out[f'{prefix}{k}'] = v
  return out


def config_changes(old: dict, new: dict, allowed=RESUMABLE_CHANGES) -> list[tuple]:
  """(dotted key, old value, new value) of every key two configs differ in, harmless ones
  (`allowed`) left out, sorted by key."""
  a, b = flatten(old), flatten(new)
  for k, default in ADDED_KEYS.items():
    for d in (a, b):
      if d.get(k) == default:
        d.pop(k, None)
  return [(k, a.get(k), b.get(k)) for k in sorted(set(a) | set(b))
          if a.get(k) != b.get(k) and k not in allowed]


def check_resumable(old: dict, new: dict, allowed=RESUMABLE_CHANGES) -> None:
  """Refuses to resume a run whose config differs in anything but harmless keys."""
  diff = config_changes(old, new, allowed)
  if diff:
    shown = ', '.join(f'{k} ({x!r} -> {y!r})' for k, x, y in diff[:4])
    raise UserError(f'The workdir holds a run with a different config ({shown}); '
                    'use a new --workdir or the same settings to resume.')


def check_stage_start(cfg: dict) -> None:
  """train.init_from is pretraining's; the later stages start from their own init_from."""
  stage = next((k for k in ('finetune', 'reward', 'dpo', 'ppo') if k in cfg), None)
  if stage and (cfg.get('train') or {}).get('init_from'):
    raise UserError(f'train.init_from is for continued pretraining; a {stage} run starts from '
                    f'{stage}.init_from, so leave train.init_from empty.')


def check_config(workdir: str, new_cfg: dict, allowed=RESUMABLE_CHANGES) -> None:
  """Before anything is built: a workdir's existing config.json must match (see above)."""
  check_stage_start(new_cfg)
  path = os.path.join(workdir, 'config.json')
  if os.path.exists(path):
    with open(path) as f:
      check_resumable(json.load(f), new_cfg, allowed)


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


def run(stage: Stage, workdir: str, stop_at: int | None = None) -> dict:
  """Trains (or resumes) the stage in workdir; returns the summary. `stop_at` simulates a kill."""
  os.makedirs(workdir, exist_ok=True)
  config_path = os.path.join(workdir, 'config.json')
  check_config(workdir, stage.config, stage.resumable_changes)
  summary_path = os.path.join(workdir, 'summary.json')
  is_main = jax.process_index() == 0
  tc = stage.train
  if is_main:
    metrics_lib.write_json_atomic(config_path, stage.config)
    metrics_lib.write_json_atomic(os.path.join(workdir, 'manifest.json'), stage.manifest())
    stage.tokenizer.save(os.path.join(workdir, 'tokenizer'))

  ckpts = ckpt_lib.Checkpoints(os.path.join(workdir, 'checkpoints'), tc.keep_checkpoints,
                               async_save=tc.async_checkpoint)
  state, start = ckpts.restore_latest(stage.abstract_state)
  if state is None:
    state, start = stage.init_state(), 0
  if start >= tc.steps and os.path.exists(summary_path):
    ckpts.close()
    with open(summary_path) as f:
      return json.load(f)

  writer = metrics_lib.MetricsWriter(workdir, start, enabled=is_main)
  progress = metrics_lib.Progress(tc.steps, start, tc.progress, enabled=is_main)
  if start:
    progress.message(f'resuming from step {start}')
  tokens_per_step = stage.tokens_per_step
  fpt = stage.flops_per_token
  dev = jax.devices()[0]
  peak = flops_lib.peak_flops(dev.device_kind, stage.dtype, tc.peak_flops)
  note = None if peak else flops_lib.unknown_device_note(dev.device_kind, dev.platform)
  if note:
    progress.message(note)
  schedule = learning_rate_schedule(tc)
  last_row, last_eval = None, {}
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
    row = {'step': step, 'loss': loss, 'loss_avg': float(np.mean(since['losses'])),
           'grad_norm': float(m['grad_norm']), 'lr': float(schedule(step - 1)),
           'tokens': tokens, 'flops': tokens * fpt['chinchilla'],
           'flops_6nd': tokens * fpt['6n']}
    row.update({k: float(v) for k, v in m.items() if k not in row})   # the stage's own metrics
    return row

  def write(row):
    nonlocal last_row
    now = time.time()
    tps = (row['step'] - since['step']) * tokens_per_step / max(now - since['time'], 1e-9)
    row.update(tokens_per_s=tps, time=now)
    if peak:   # model FLOPs (PaLM's definition, causal attention) and the App. F count
      row['mfu'] = tps * fpt.get('model', fpt['chinchilla']) / (peak * jax.device_count())
      row['mfu_appf'] = tps * fpt['chinchilla'] / (peak * jax.device_count())
    writer.write(row)
    progress.update(row['step'], row)
    since.update(time=now, step=row['step'], losses=[])
    last_row = row

  stopped = False
  profile = tc.profile_range() if tc.profile_steps else None
  tracing = False
  with _StopFlag() as flag:
    step = start
    while step < tc.steps:
      if profile and step == profile[0] and is_main:
        jax.profiler.start_trace(os.path.join(workdir, 'profile'))
        tracing = True
      batch = stage.batch(step)
      if tracing:   # named, numbered steps in the trace; nothing added to untraced steps
        with jax.profiler.StepTraceAnnotation('train', step_num=step + 1):
          state, m = stage.train_step(state, stage.frozen, batch)
      else:
        state, m = stage.train_step(state, stage.frozen, batch)
      step += 1
      if tracing and step == profile[1]:
        jax.block_until_ready(state)
        jax.profiler.stop_trace()
        tracing = False
        progress.message(f'wrote a profiler trace of steps {profile[0] + 1}-{profile[1]} to '
                         f'{os.path.join(workdir, "profile")}')
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
      # Checkpoints keep their own cadence (evaluations do not force one); the last step, a
      # stop and stop_at always save. With async saving the files are written while the next
      # steps train; closing the manager below waits for the last one, so summary.json is only
      # written once the final checkpoint is complete on disk.
      save = (step % tc.checkpoint_every == 0 or step == tc.steps or stop
              or step == stop_at)
      if save or is_eval or not stage.defer_metrics:
        row = finish_row(*pending)   # makes sure the state is finite before saving it
        pending = None
        if is_eval:
          t0 = time.time()
          last_eval = stage.evaluate(state['params'], stage.frozen)
          if stage.task_eval is not None:
            last_eval.update(stage.task_eval(state['params'], step))
          since['time'] += time.time() - t0   # evaluation time is not training throughput
          row.update(last_eval)
        if is_eval or step % tc.log_every == 0:
          write(row)
      if save:
        ckpts.save(step, state)
        if stop or step == stop_at:
          ckpts.wait()   # on disk before the message says so (the process may be killed next)
          stopped = True
          progress.message(f'stopped at step {step}; checkpoint saved, rerun to resume.')
          break
  if tracing:   # stopped (SIGTERM, stop_at) inside the traced steps
    jax.profiler.stop_trace()
  if not stopped and start >= tc.steps:
    # Resumed at the last step: the run died after its final checkpoint but before its summary.
    # The summary is completed from that checkpoint (a fresh evaluation) and the logged rows.
    last_eval = stage.evaluate(state['params'], stage.frozen)
    if stage.task_eval is not None:
      last_eval.update(stage.task_eval(state['params'], start))
    logged = [r for r in metrics_lib.read_jsonl(os.path.join(workdir, 'metrics.jsonl'))
              if isinstance(r.get('loss_avg'), float) and r.get('step', 0) <= start]
    last_row = logged[-1] if logged else None
    progress.message(f'step {start} was already trained; evaluated its checkpoint for the summary')
  progress.close()
  writer.close()
  ckpts.close()
  # final_loss: the mean train loss over the last logging interval (one batch is too noisy).
  summary = {'steps': step, 'final_loss': last_row['loss_avg'] if last_row else None,
             'eval_loss': last_eval.get('eval_loss'), 'tokens': step * tokens_per_step,
             'flops': step * tokens_per_step * fpt['chinchilla'],
             'flops_6nd': step * tokens_per_step * fpt['6n'],
             'params': stage.n_params['total'], 'params_nonembed': stage.n_params['nonembed'],
             'finished': not stopped}
  if not stopped and stage.summary is not None:
    summary.update(stage.summary(last_eval))
  if not stopped and is_main:
    metrics_lib.write_json_atomic(summary_path, summary)
  return summary
