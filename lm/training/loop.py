"""The one training loop that every objective runs through.

A `Stage` says what differs between pretraining, fine-tuning and later objectives: the loss (as a
jitted step over a train state and a frozen tree), the batches, the evaluation, how the state is
initialised, and what the workdir records. `run(stage, workdir)` does the rest, identically for
all of them: the workdir's lock (lm/lock.py: one writer per folder), config.json (a rerun with
other settings is refused), manifest.json, the tokenizer, orbax checkpoints with exact resume (a
save that fails stops the run: lm/training/checkpoint.py), metrics.jsonl and TensorBoard,
progress, SIGTERM (checkpoint and stop at the next step; the stop is recorded for run.py's exit
status), a NaN stop that says which checkpoint exists and what a rerun does, and summary.json.

The state is {'params': the trainable tree, 'opt_state', 'step'}; `frozen` is an input to every
step that is never differentiated and never checkpointed with the run (a LoRA run's base model,
or None). `make_step` builds a step from a loss of (trainable, frozen, batch, rng) returning
(loss sum, weight): the reported loss is sum / weight over the whole batch, so micro-batches of
unequal weight (a packed fine-tuning batch's response tokens) accumulate exactly.
"""
import contextlib
import dataclasses
import errno
import os
import shutil
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
from lm import lock as lock_lib
from lm import metrics as metrics_lib
from lm import tracking
from lm.errors import UserError, record_signal_stop
from lm.model import sharding as shard_lib
from lm.training.optim import TrainConfig, learning_rate_schedule, micro_batches, side_by_side

# Keys that may change between an interrupted run and its resumption.
RESUMABLE_CHANGES = ('train.eval_every', 'train.log_every', 'train.checkpoint_every',
                     'train.keep_checkpoints', 'train.progress', 'train.peak_flops',
                     'data.cache_dir', 'mesh.data', 'mesh.fsdp', 'mesh.tensor',
                     'mesh.distributed', 'model.remat', 'model.attention_impl',
                     'train.eval_tasks', 'train.eval_tasks_every', 'train.eval_task_examples',
                     'train.eval_shots', 'train.profile_steps', 'train.async_checkpoint',
                     'train.micro_batch_tokens', 'mesh.cpu_devices', 'data.workers',
                     'train.wandb', 'train.wandb_project', 'train.wandb_group', 'train.wandb_tags',
                     'train.eval_harness', 'train.eval_harness_limit',
                     'train.eval_harness_include')

# Keys added after runs existed, with the value that means what their absence meant: a config
# written before a key existed equals one that sets it to this default.
ADDED_KEYS = {'train.async_checkpoint': True, 'train.profile_steps': '', 'train.opt_dtype': 'float32', 'model.param_dtype': 'float32', 'train.init_from': '', 'data.tokenizer_path': '',
              'data.arith_fraction': 0.0,
              'data.arith_digits': 4, 'train.eval_tasks': '', 'train.eval_tasks_every': 0,
              'train.eval_task_examples': 100, 'train.eval_shots': 3, 'mesh.cpu_devices': 1,
              'data.hf_dataset': '', 'data.hf_config': '', 'data.hf_split': 'train',
              'data.hf_streaming': False, 'data.workers': 0, 'data.max_chunk_bytes': 16 << 20,
              'data.sources': [], 'finetune.replay_fraction': 0.0,
              'dpo.loss': 'dpo', 'dpo.simpo_beta': 2.0, 'dpo.simpo_gamma': 1.0,
              'dpo.replay_fraction': 0.0, 'lora.rank': 0, 'lora.alpha': 16.0,
              'lora.targets': 'q,k,v,o,up,down', 'model.qk_norm': False,
              'train.optimizer': 'adamw', 'train.z_loss': 0.0, 'model.parametrization': 'sp',
              'model.mup_base_width': 0, 'model.mup_base_head_dim': 0,
              'grpo.scale_rewards': 'group', 'grpo.loss_norm': 'response'}

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
  # The learning rate a step's row records (default: train's schedule at the step).
  learning_rate: Callable[[int], Any] | None = None
  # Packed runs (lm/scaling/packed.py): K runs of one shape trained as one stacked state, whose
  # step metrics carry a leading [K] axis and whose evaluate and task_eval give a list of K rows.
  # Each member keeps its own folder (config.json, manifest, tokenizer, metrics, its final
  # checkpoint from member_state(state, k), summary.json); the stacked checkpoints live in the
  # workdir given to `run`, which is removed once every member's folder is complete.
  members: tuple = ()
  member_state: Callable[[Any, int], Any] | None = None


@dataclasses.dataclass
class Member:
  """One run of a packed stage: its folder, its config, and how messages name it."""
  workdir: str
  config: dict
  label: str


def new_state(params, optimizer, step: int = 0) -> dict:
  """The train state every stage checkpoints: {'params', 'opt_state' (fresh), 'step'}."""
  return {'params': params, 'opt_state': optimizer.init(params),
          'step': jnp.asarray(step, jnp.int32)}


def flatten(d, prefix=''):
  out = {}
  for k, v in d.items():
    if isinstance(v, dict):
      out.update(flatten(v, f'{prefix}{k}.'))
    else:
      out[f'{prefix}{k}'] = list(v) if isinstance(v, tuple) else v   # JSON reads tuples as lists
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
  stage = next((k for k in ('finetune', 'reward', 'dpo', 'ppo', 'grpo') if k in cfg), None)
  if stage and (cfg.get('train') or {}).get('init_from'):
    raise UserError(f'train.init_from is for continued pretraining; a {stage} run starts from '
                    f'{stage}.init_from, so leave train.init_from empty.')


def check_config(workdir: str, new_cfg: dict, allowed=RESUMABLE_CHANGES) -> None:
  """Before anything is built: a workdir's existing config.json must match (see above)."""
  check_stage_start(new_cfg)
  path = os.path.join(workdir, 'config.json')
  if os.path.exists(path):
    old = metrics_lib.read_json_object(path, 'the workdir holds a damaged run; use a new '
                                       '--workdir, or delete this one to start over')
    check_resumable(old, new_cfg, allowed)


class _Diverged(Exception):
  """A non-finite loss or gradient norm at `step` (run() turns it into the user's sentence, which
  needs the checkpoints)."""

  def __init__(self, step: int, what: str, value: float, label: str):
    super().__init__(f'{what} became {value} at step {step}')
    self.step, self.what, self.value, self.label = step, what, value, label


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


class _Books:
  """The records of one run, or of each member of a packed run: config, manifest, tokenizer,
  metrics rows, progress and summaries. Rows of a packed run come from [K]-shaped metrics."""

  def __init__(self, stage: Stage, workdir: str, is_main: bool):
    self.stage, self.workdir, self.is_main = stage, workdir, is_main
    self.stacked = bool(stage.members)
    self.members = stage.members or (Member(workdir, stage.config, ''),)
    self.K = len(self.members)
    self.summary_paths = [os.path.join(m.workdir, 'summary.json') for m in self.members]
    self.schedule = stage.learning_rate or learning_rate_schedule(stage.train)
    self.fpt = stage.flops_per_token
    self.last_rows = [None] * self.K
    self.last_eval = [{} for _ in range(self.K)]

  def check(self) -> None:
    for m in self.members:
      check_config(m.workdir, m.config, self.stage.resumable_changes)

  def finished(self) -> list[dict] | None:
    """Every member's summary when all are written (a packed run that already finished)."""
    if self.stacked and all(os.path.exists(p) for p in self.summary_paths):
      return [_read_json(p) for p in self.summary_paths]
    return None

  def open(self, start: int) -> None:
    stage = self.stage
    if self.is_main:
      manifest = stage.manifest()
      for k, m in enumerate(self.members):
        os.makedirs(m.workdir, exist_ok=True)
        metrics_lib.write_json_atomic(os.path.join(m.workdir, 'config.json'), m.config)
        if self.stacked:
          manifest = dict(manifest, packed={'members': self.K, 'index': k,
                                            'pack_dir': os.path.abspath(self.workdir)})
        metrics_lib.write_json_atomic(os.path.join(m.workdir, 'manifest.json'), manifest)
        stage.tokenizer.save(os.path.join(m.workdir, 'tokenizer'))
    manifest = stage.manifest() if self.is_main and stage.train.wandb else {}
    self.writers = [metrics_lib.MetricsWriter(
        m.workdir, start, enabled=self.is_main,
        tracker=tracking.maybe_tracker(stage.train, m.workdir, m.config, manifest, self.is_main))
        for m in self.members]
    tc = stage.train
    self.progress = metrics_lib.Progress(tc.steps, start, tc.progress, enabled=self.is_main)
    if start:
      self.progress.message(f'resuming{f" the pack of {self.K}" if self.stacked else ""} '
                            f'from step {start}')
    dev = jax.devices()[0]
    self.peak = flops_lib.peak_flops(dev.device_kind, stage.dtype, tc.peak_flops)
    note = None if self.peak else flops_lib.unknown_device_note(dev.device_kind, dev.platform)
    if note:
      self.progress.message(note)
    self.since = {'time': time.time(), 'step': start, 'losses': []}   # since the last row

  def _value(self, x, k: int) -> float:
    x = np.asarray(x)
    return float(x[k] if self.stacked else x)

  def finish_rows(self, step: int, m, saving: bool = False) -> list[dict]:
    """Host-side rows of one step (one per member); averages cover the steps since the last
    written row. A non-finite loss stops the run, naming the member; so does a non-finite
    gradient norm at a step whose state is about to be saved (its update ruined the state even
    where the loss, computed before it, was finite)."""
    m = jax.device_get(m)
    loss = np.asarray(m['loss'], np.float64)
    checks = [('loss', loss)]
    if saving:
      checks.append(('gradient norm', np.asarray(m['grad_norm'], np.float64)))
    for what, x in checks:
      bad = np.flatnonzero(~np.isfinite(np.atleast_1d(x)))
      if bad.size:
        k = int(bad[0])
        raise _Diverged(step, what, float(np.atleast_1d(x)[k]), self.members[k].label)
    self.since['losses'].append(loss)
    avg = np.mean(np.stack(self.since['losses']), axis=0)
    tokens = step * self.stage.tokens_per_step
    lr = self.schedule(step - 1)
    rows = []
    for k in range(self.K):
      row = {'step': step, 'loss': self._value(loss, k), 'loss_avg': self._value(avg, k),
             'grad_norm': self._value(m['grad_norm'], k), 'lr': self._value(lr, k),
             'tokens': tokens, 'flops': tokens * self.fpt['chinchilla'],
             'flops_6nd': tokens * self.fpt['6n']}
      row.update({key: self._value(v, k) for key, v in m.items() if key not in row})
      rows.append(row)
    return rows

  def add_eval(self, rows: list[dict], evals: list[dict]) -> None:
    self.last_eval = evals
    for row, e in zip(rows, evals):
      row.update(e)

  def write(self, rows: list[dict]) -> None:
    now = time.time()
    since = self.since
    tps = (rows[0]['step'] - since['step']) * self.stage.tokens_per_step / max(
        now - since['time'], 1e-9)
    for row in rows:
      row.update(tokens_per_s=tps, time=now)
      if self.stacked:
        row['pack_tokens_per_s'] = tps * self.K
      if self.peak:   # model FLOPs (PaLM's definition, causal attention) and the App. F count
        per_s = tps * self.K / (self.peak * jax.device_count())
        row['mfu'] = per_s * self.fpt.get('model', self.fpt['chinchilla'])
        row['mfu_appf'] = per_s * self.fpt['chinchilla']
    for w, row in zip(self.writers, rows):
      w.write(row)
    shown = rows[0] if not self.stacked else {
        'loss_avg': float(np.mean([r['loss_avg'] for r in rows])),
        'tokens_per_s': rows[0]['pack_tokens_per_s']}
    self.progress.update(rows[0]['step'], shown)
    since.update(time=now, step=rows[0]['step'], losses=[])
    self.last_rows = rows

  def recover(self, start: int) -> None:
    """The run died after its final checkpoint but before its summary: the last rows come from
    the logged metrics."""
    for k, m in enumerate(self.members):
      logged = [r for r in metrics_lib.read_jsonl(os.path.join(m.workdir, 'metrics.jsonl'))
                if isinstance(r.get('loss_avg'), float) and r.get('step', 0) <= start]
      self.last_rows[k] = logged[-1] if logged else None
    self.progress.message(f'step {start} was already trained; evaluated its checkpoint for the '
                          'summary')

  def close(self) -> None:
    self.progress.close()
    for w in self.writers:
      w.close()

  def summaries(self, step: int, stopped: bool) -> list[dict]:
    stage, tokens = self.stage, step * self.stage.tokens_per_step
    out = []
    for k in range(self.K):
      row, last_eval = self.last_rows[k], self.last_eval[k]
      # final_loss: the mean train loss over the last logging interval (one batch is noisy).
      summary = {'steps': step, 'final_loss': row['loss_avg'] if row else None,
                 'eval_loss': last_eval.get('eval_loss'), 'tokens': tokens,
                 'flops': tokens * self.fpt['chinchilla'], 'flops_6nd': tokens * self.fpt['6n'],
                 'params': stage.n_params['total'],
                 'params_nonembed': stage.n_params['nonembed'], 'finished': not stopped}
      if self.stacked:
        summary['packed'] = self.K
      if not stopped and stage.summary is not None:
        summary.update(stage.summary(last_eval))
      out.append(summary)
    return out


def _read_json(path: str):
  """A finished run's summary.json (a damaged one is refused, naming the way to rebuild it)."""
  return metrics_lib.read_json_object(path, 'delete it and rerun the same command to rebuild it '
                                      'from the final checkpoint')


def _evaluate(stage: Stage, params, step: int) -> list[dict]:
  """One evaluation row per member: the stage's evaluation and its task metrics."""
  evals = stage.evaluate(params, stage.frozen)
  evals = list(evals) if stage.members else [evals]
  if stage.task_eval is not None:
    tasks = stage.task_eval(params, step)
    for e, t in zip(evals, tasks if stage.members else [tasks]):
      e.update(t)
  return evals


def _should_stop(flag: _StopFlag, step: int, log_every: int) -> bool:
  """SIGTERM seen; on several hosts, agreed by all at a logging step (a host that stopped alone
  would leave the others waiting forever in the next step)."""
  if jax.process_count() == 1:
    return flag.stop
  if step % log_every:
    return False
  return bool(multihost_utils.process_allgather(np.int32(flag.stop)).max())


class _Profile:
  """A profiler trace of train.profile_steps (main process only), if asked for."""

  def __init__(self, tc: TrainConfig, workdir: str, is_main: bool, progress):
    self.range = tc.profile_range() if tc.profile_steps and is_main else None
    self.dir, self.progress, self.tracing = os.path.join(workdir, 'profile'), progress, False

  def step(self, step: int, train_step, state, frozen, batch):
    if self.range and step == self.range[0]:
      jax.profiler.start_trace(self.dir)
      self.tracing = True
    if not self.tracing:
      return train_step(state, frozen, batch)
    with jax.profiler.StepTraceAnnotation('train', step_num=step + 1):   # numbered steps
      out = train_step(state, frozen, batch)
    if step + 1 == self.range[1]:
      jax.block_until_ready(out)
      self.stop()
      self.progress.message(f'wrote a profiler trace of steps {self.range[0] + 1}-'
                            f'{self.range[1]} to {self.dir}')
    return out

  def stop(self):
    if self.tracing:
      jax.profiler.stop_trace()
      self.tracing = False


def _train(stage: Stage, books: _Books, ckpts, state, start: int, stop_at: int | None):
  """The steps from `start` to train.steps, or to a stop; returns (state, step, stopped)."""
  tc = stage.train
  pending = None   # (step, metrics on device): pulled one step later, so the host never waits
  profile = _Profile(tc, books.workdir, books.is_main, books.progress)
  step, stopped = start, False
  with _StopFlag() as flag:
    try:
      while step < tc.steps:
        state, m = profile.step(step, stage.train_step, state, stage.frozen, stage.batch(step))
        step += 1
        ckpts.poll()   # a background save that failed stops the run here, not at the next save
        if pending is not None:
          rows = books.finish_rows(*pending)
          if pending[0] % tc.log_every == 0:
            books.write(rows)
        pending = (step, m)
        is_eval = step % tc.eval_every == 0 or step == tc.steps
        # A SIGTERM during the last step lets the run finish: only the summary is left to write.
        stop = _should_stop(flag, step, tc.log_every) and step < tc.steps
        # Checkpoints keep their own cadence (evaluations do not force one); the last step, a
        # stop and stop_at always save. With async saving the files are written while the next
        # steps train; closing the manager waits for the last one, so summary.json is only
        # written once the final checkpoint is complete on disk.
        save = step % tc.checkpoint_every == 0 or step == tc.steps or stop or step == stop_at
        if save or is_eval or not stage.defer_metrics:
          rows = books.finish_rows(*pending, saving=save)   # the state is finite before saving
          pending = None
          if is_eval:
            t0 = time.time()
            books.add_eval(rows, _evaluate(stage, state['params'], step))
            books.since['time'] += time.time() - t0   # evaluation is not training throughput
          if is_eval or step % tc.log_every == 0:
            books.write(rows)
        if save:
          ckpts.save(step, state)
          if stop or step == stop_at:
            ckpts.wait()   # on disk before the message says so (the process may be killed next)
            stopped = True
            if stop:
              record_signal_stop(books.workdir)
            books.progress.message(f'stopped at step {step}; checkpoint saved, rerun to resume.')
            break
    finally:
      profile.stop()
  return state, step, stopped


def _finish_members(stage: Stage, books: _Books, state, step: int) -> None:
  """Each member of a packed run gets its final state in its own folder, as if trained alone."""
  if not books.stacked:
    return
  for k, m in enumerate(books.members):
    own = ckpt_lib.Checkpoints(os.path.join(m.workdir, 'checkpoints'),
                               stage.train.keep_checkpoints)
    if step not in own.steps():
      own.save(step, stage.member_state(state, k))
    own.close()


def run(stage: Stage, workdir: str, stop_at: int | None = None):
  """Trains (or resumes) the stage in workdir; returns the summary (a packed stage: the list of
  its members' summaries). `stop_at` simulates a kill.

  The main process holds the lock of workdir (and of each member's folder) throughout: a second
  writer is refused in one sentence (lm/lock.py)."""
  is_main = jax.process_index() == 0
  books = _Books(stage, workdir, is_main)
  with contextlib.ExitStack() as held:
    for m in stage.members:
      held.enter_context(lock_lib.hold(m.workdir, enabled=is_main))
    books.check()
    done = books.finished()
    if done is not None:
      return done
    held.enter_context(lock_lib.hold(workdir, enabled=is_main))
    return _run(stage, books, workdir, stop_at)


def _diverged(d: _Diverged, stage: Stage, ckpts) -> str:
  """What a divergence leaves and what a rerun does: it resumes from the newest checkpoint with
  the same settings (the same batches), and a changed learning rate is a config change the
  folder refuses unless the stage allows it."""
  ckpts.wait()
  before = [s for s in ckpts.steps() if s < d.step]
  where = f'step {before[-1]}' if before else 'step 0'
  kept = (f'the checkpoint of step {before[-1]} (saved before it) is in {ckpts.directory}'
          if before else 'no checkpoint was saved before it')
  if 'train.lr' in stage.resumable_changes:
    fix = f'lower train.lr and rerun the same command to resume from {where}'
  else:
    fix = (f'a rerun with the same settings starts again from {where} on the same batches and '
           'will likely diverge again, and this folder refuses a changed train.lr or '
           'train.warmup_steps as a different config, so start a new --workdir with a lower '
           'train.lr or more train.warmup_steps')
  return (f'The {d.what}{" of " + d.label if d.label else ""} became {d.value} at step {d.step}; '
          f'{kept}; {fix}.')


# A write of the run's records that fails for one of these reasons stops the run in one sentence.
_DISK_ERRORS = (errno.ENOSPC, errno.EDQUOT, errno.EFBIG, errno.EROFS, errno.EACCES, errno.EPERM,
                errno.EIO)


def _write_failed(e: OSError, ckpts, workdir: str) -> str:
  try:
    ckpts.wait()
    steps = ckpts.steps()
  except Exception:  # the checkpoints may be on the same full disk
    steps = []
  kept = (f'the checkpoint of step {steps[-1]} is intact and a rerun resumes from it'
          if steps else 'no checkpoint was saved yet, so a rerun starts from step 0')
  return (f'writing into {e.filename or workdir} failed ({os.strerror(e.errno)}), so the run '
          f'stopped; {kept} once the disk has space (or the folder is writable again).')


def _run(stage: Stage, books: _Books, workdir: str, stop_at: int | None):
  tc = stage.train
  ckpts = ckpt_lib.Checkpoints(os.path.join(workdir, 'checkpoints'), tc.keep_checkpoints,
                               async_save=tc.async_checkpoint)
  try:
    return _run_steps(stage, books, workdir, stop_at, ckpts)
  except OSError as e:
    if e.errno not in _DISK_ERRORS:
      raise
    raise UserError(_write_failed(e, ckpts, workdir)) from None


def _run_steps(stage: Stage, books: _Books, workdir: str, stop_at: int | None, ckpts):
  tc = stage.train
  opened = closed = False
  try:
    state, start = ckpts.restore_latest(stage.abstract_state)
    if state is None:
      state, start = stage.init_state(), 0
    if not books.stacked and start >= tc.steps and os.path.exists(books.summary_paths[0]):
      ckpts.close()
      closed = True
      return _read_json(books.summary_paths[0])
    books.open(start)
    opened = True
    try:
      state, step, stopped = _train(stage, books, ckpts, state, start, stop_at)
    except _Diverged as d:
      raise UserError(_diverged(d, stage, ckpts)) from None
    if not stopped and start >= tc.steps:
      # Resumed at the last step: the run died after its final checkpoint but before its
      # summary, which is completed from that checkpoint (a fresh evaluation) and the logged
      # rows.
      books.last_eval = _evaluate(stage, state['params'], start)
      books.recover(start)
    books.close()
    opened = False
    ckpts.close()   # waits for the final save: a failed one raises here, before any summary
    closed = True
  finally:
    # On the way out of an exception: the metrics files closed and the save in flight finished
    # (or abandoned) quietly, so the first error is the one reported.
    if opened:
      with contextlib.suppress(Exception):
        books.close()
    if not closed:
      with contextlib.suppress(Exception):
        ckpts.close()
  summaries = books.summaries(step, stopped)
  if not stopped and books.is_main:
    _finish_members(stage, books, state, step)
    for path, summary in zip(books.summary_paths, summaries):
      metrics_lib.write_json_atomic(path, summary)
    if books.stacked:   # the members' folders are complete: the stacked checkpoints go
      shutil.rmtree(workdir, ignore_errors=True)
  return summaries if books.stacked else summaries[0]
