"""Packed runs: K pretraining runs of one shape trained together in one program (`jax.vmap`).

On an accelerator one small sweep model cannot keep the device busy; stacking K runs that share
a shape, step count, batch and schedule along a new leading axis turns K small programs into one
K times larger. Each member keeps everything that makes it its own run: its initialisation and
data order (its seed), its peak learning rate, its optimizer state, its evaluations, and its own
run folder (config.json, metrics.jsonl, a final checkpoint, summary.json) exactly as a run
trained alone would leave it, so a sweep books packed and lone runs alike.

How the members differ: the optimizer is built once with a unit peak learning rate, and each
member's updates are multiplied by its own peak rate, a scalar kept in its optimizer state
(AdamW's update is linear in the rate: warmup, cosine and WSD schedules all scale with the peak).
Members may differ in `seed` and `train.lr` only; anything else (shape, steps, batch, schedule,
data) makes them different programs and is refused. Dropout must be 0 (sweeps train without it),
since a member's dropout stream would have to follow its seed.

Measured on a 2-core CPU, packing gave 1.0x or less of the throughput of the same runs one after
another (CPU cores are already busy with one small model), so sweeps pack only when asked
(`sweep.pack`); the program runs on one device.
"""
import json
import os
import shutil
import time

import jax
import jax.numpy as jnp
import numpy as np
import optax

from lm.training import checkpoint as ckpt_lib
from lm.training import loop
from lm import metrics as metrics_lib
from lm.model import transformer as model_lib
from lm.training import optim
from lm.errors import UserError

PACKABLE = ('seed', 'train.lr')   # the config keys in which members may differ


def check_members(cfgs) -> None:
  """Members of one pack: the same config but for seed and train.lr, and no dropout."""
  if len(cfgs) < 1:
    raise ValueError('a pack needs at least one run')
  first = loop.flatten(json.loads(cfgs[0].to_json()))
  for cfg in cfgs[1:]:
    other = loop.flatten(json.loads(cfg.to_json()))
    diff = [k for k in sorted(set(first) | set(other))
            if first.get(k) != other.get(k) and k not in PACKABLE]
    if diff:
      raise UserError(f'runs packed together may differ only in seed and train.lr, not in '
                      f'{", ".join(diff[:4])}; pack runs of one shape, batch and schedule.')
  if float(cfgs[0].model.dropout) != 0:
    raise UserError(f'model.dropout={cfgs[0].model.dropout}: packed runs train without '
                    'dropout; set it to 0 or turn packing off (sweep.pack=1).')
  if cfgs[0].train.get('init_from'):
    raise UserError('train.init_from cannot be packed: packed runs train from scratch.')


def _scale_by_member_lr() -> optax.GradientTransformation:
  """Multiplies updates by a per-member peak learning rate held in the state (set after init)."""
  return optax.GradientTransformation(
      lambda params: jnp.ones((), jnp.float32),
      lambda updates, lr, params=None: (jax.tree.map(lambda u: u * lr.astype(u.dtype), updates),
                                        lr))


class Pack:
  """The jitted, vmapped programs of K members (built from the first member's config)."""

  def __init__(self, cfgs, run=None):
    """run: the first member's lm.stages.pretrain.build(...) when the caller has it (the benchmark
    builds one without data); otherwise built here."""
    from lm.stages import pretrain as train_lib
    check_members(cfgs)
    self.cfgs = cfgs
    self.K = len(cfgs)
    self.seeds = [int(c.seed) for c in cfgs]
    self.lrs = np.array([float(c.train.lr) for c in cfgs], np.float32)
    run = run or train_lib.build(cfgs[0])
    self.run = run
    mc, tc = run.model, run.train
    unit = optim.TrainConfig.from_config(dict(cfgs[0].train, lr=1.0))
    self.optimizer = optax.chain(optim.make_optimizer(unit, model_lib.param_shapes(mc)),
                                 _scale_by_member_lr())
    self.unit_schedule = optim.learning_rate_schedule(unit)

    def init_one(rng, lr):
      params = model_lib.init_params(mc, rng)
      opt_state = self.optimizer.init(params)
      opt_state = opt_state[:-1] + (lr,)
      return {'params': params, 'opt_state': opt_state, 'step': jnp.zeros((), jnp.int32)}
    self._init = jax.jit(jax.vmap(init_one))
    step = train_lib.make_train_step(mc, tc, self.optimizer, 0)   # no dropout: seed unused
    self.step = jax.jit(jax.vmap(step), donate_argnums=0)
    self.eval_step = jax.jit(jax.vmap(lambda p, b: train_lib.next_token_loss(mc, p, b),
                                      in_axes=(0, None)))
    keys = jnp.stack([jax.random.PRNGKey(s) for s in self.seeds])
    shapes = jax.eval_shape(self._init, keys, self.lrs)
    dev = jax.sharding.SingleDeviceSharding(jax.devices()[0])
    self.abstract_state = ckpt_lib.abstract(shapes, jax.tree.map(lambda _: dev, shapes))

  def init_state(self):
    return self._init(jnp.stack([jax.random.PRNGKey(s) for s in self.seeds]),
                      jnp.asarray(self.lrs))

  def batch(self, step: int):
    """[K, B, T+1]: member k's batch `step` in its own (seed's) data order."""
    tc, ds = self.run.train, self.run.dataset
    return jnp.asarray(np.stack([ds.batch('train', step, tc.batch_size, tc.seq_len, seed=s)
                                 for s in self.seeds]))

  def evaluate(self, params) -> np.ndarray:
    """[K] mean losses over the fixed validation batches (the same windows for every member)."""
    run = self.run
    if run.eval_data is None:
      tc = run.train
      run.eval_data = [jnp.asarray(r) for r in run.dataset.eval_batches(
          tc.eval_batches, tc.batch_size, tc.seq_len)]
    losses = [self.eval_step(params, b) for b in run.eval_data]
    return np.mean(np.stack(jax.device_get(losses)), axis=0)

  def member(self, state, k: int):
    """Member k's state as a run trained alone holds it (its optimizer state without the
    per-member learning rate, which a lone run's schedule carries instead)."""
    one = jax.tree.map(lambda x: x[k], state)
    return dict(one, opt_state=one['opt_state'][0])


def train_packed(cfgs, rdirs: list[str], pack_dir: str, stop_at: int | None = None
                 ) -> list[dict]:
  """Trains (or resumes) the packed members, each into its own run folder; returns their
  summaries in order. The stacked state is checkpointed in pack_dir (removed when the members'
  folders are complete); `stop_at` simulates a kill at that step."""
  if len(cfgs) != len(rdirs):
    raise ValueError('one run folder per member')
  for cfg, rdir in zip(cfgs, rdirs):
    loop.check_config(rdir, json.loads(cfg.to_json()))
  pack = Pack(cfgs)
  run, tc, K = pack.run, pack.run.train, pack.K
  done = [os.path.join(r, 'summary.json') for r in rdirs]
  if all(os.path.exists(p) for p in done):
    return [json.load(open(p)) for p in done]

  from lm.stages import pretrain as train_lib
  manifest = train_lib.manifest(run)
  writers = []
  ckpts = ckpt_lib.Checkpoints(os.path.join(pack_dir, 'checkpoints'), tc.keep_checkpoints,
                               async_save=tc.async_checkpoint)
  state, start = ckpts.restore_latest(pack.abstract_state)
  if state is None:
    state, start = pack.init_state(), 0
  for k, (cfg, rdir) in enumerate(zip(cfgs, rdirs)):
    os.makedirs(rdir, exist_ok=True)
    metrics_lib.write_json_atomic(os.path.join(rdir, 'config.json'), json.loads(cfg.to_json()))
    metrics_lib.write_json_atomic(os.path.join(rdir, 'manifest.json'), dict(
        manifest, packed={'members': K, 'index': k, 'pack_dir': os.path.abspath(pack_dir)}))
    run.dataset.tokenizer.save(os.path.join(rdir, 'tokenizer'))
    writers.append(metrics_lib.MetricsWriter(rdir, start))

  tokens_per_step = tc.batch_size * tc.seq_len
  fpt = run.flops_per_token
  progress = metrics_lib.Progress(tc.steps, start, tc.progress)
  if start:
    progress.message(f'resuming the pack of {K} from step {start}')
  since = {'time': time.time(), 'step': start, 'losses': []}
  last_rows, last_eval = [None] * K, None
  stopped = False

  def rows(step, m, evals=None):
    """The members' rows at `step`; loss_avg covers every step since the last row, as a lone
    run's does (each step's [K] losses were kept on the device until now)."""
    m = jax.device_get(m)
    every = np.asarray(jax.device_get(since['losses']), np.float64)   # [steps since, K]
    losses = every[-1]
    if not np.isfinite(every).all():
      i = int(np.flatnonzero(~np.isfinite(every).all(axis=1))[0])
      bad = int(np.flatnonzero(~np.isfinite(every[i]))[0])
      raise UserError(f'The loss of packed member {bad} (seed {pack.seeds[bad]}, lr '
                      f'{pack.lrs[bad]:.3g}) became {every[i, bad]} at step '
                      f'{step - len(every) + i + 1}; the last good checkpoint is kept. Lower its '
                      'train.lr or raise train.warmup_steps, then rerun to resume.')
    now = time.time()
    tps = (step - since['step']) * tokens_per_step / max(now - since['time'], 1e-9)
    avg = every.mean(axis=0)
    tokens = step * tokens_per_step
    out = []
    for k in range(K):
      row = {'step': step, 'loss': float(losses[k]), 'loss_avg': float(avg[k]),
             'grad_norm': float(m['grad_norm'][k]),
             'lr': float(pack.lrs[k] * pack.unit_schedule(step - 1)),
             'tokens': tokens, 'flops': tokens * fpt['chinchilla'],
             'flops_6nd': tokens * fpt['6n'], 'tokens_per_s': tps, 'pack_tokens_per_s': tps * K,
             'time': now}
      if evals is not None:
        row.update(evals[k])
      out.append(row)
    return out

  bpt = run.dataset.bytes_per_token('val')

  def member_eval(params):
    return [train_lib.eval_row(float(loss), bpt) for loss in pack.evaluate(params)]

  with loop._StopFlag() as flag:
    step = start
    while step < tc.steps:
      state, m = pack.step(state, pack.batch(step))
      since['losses'].append(m['loss'])
      step += 1
      is_eval = step % tc.eval_every == 0 or step == tc.steps
      save = step % tc.checkpoint_every == 0 or step == tc.steps or flag.stop or step == stop_at
      if is_eval or step % tc.log_every == 0 or save:
        evals = None
        if is_eval:
          t0 = time.time()
          evals = last_eval = member_eval(state['params'])
          since['time'] += time.time() - t0
        out = rows(step, m, evals)
        if is_eval or step % tc.log_every == 0:
          for w, row in zip(writers, out):
            w.write(row)
          progress.update(step, {'loss_avg': float(np.mean([r['loss_avg'] for r in out])),
                                 'tokens_per_s': out[0]['pack_tokens_per_s']})
          since.update(time=time.time(), step=step, losses=[])
          last_rows = out
      if save:
        ckpts.save(step, state)
        if flag.stop or step == stop_at:
          ckpts.wait()
          stopped = True
          progress.message(f'stopped at step {step}; checkpoint saved, rerun to resume.')
          break
  if not stopped and start >= tc.steps:   # died after the last checkpoint, before the summaries
    last_eval = member_eval(state['params'])
    for k, rdir in enumerate(rdirs):
      logged = [r for r in metrics_lib.read_jsonl(os.path.join(rdir, 'metrics.jsonl'))
                if isinstance(r.get('loss_avg'), float) and r.get('step', 0) <= start]
      last_rows[k] = logged[-1] if logged else None
  progress.close()
  for w in writers:
    w.close()
  ckpts.close()
  summaries = []
  for k, rdir in enumerate(rdirs):
    summary = {'steps': step, 'final_loss': last_rows[k]['loss_avg'] if last_rows[k] else None,
               'eval_loss': last_eval[k]['eval_loss'] if last_eval else None,
               'tokens': step * tokens_per_step, 'flops': step * tokens_per_step * fpt['chinchilla'],
               'flops_6nd': step * tokens_per_step * fpt['6n'], 'params': run.n_params['total'],
               'params_nonembed': run.n_params['nonembed'], 'finished': not stopped,
               'packed': K}
    summaries.append(summary)
  if stopped:
    return summaries
  # Each member's folder gets its final state, like a run trained alone, then its summary.
  for k, rdir in enumerate(rdirs):
    own = ckpt_lib.Checkpoints(os.path.join(rdir, 'checkpoints'), tc.keep_checkpoints)
    if step not in own.steps():
      own.save(step, pack.member(state, k))
    own.close()
  for path, summary in zip(done, summaries):
    metrics_lib.write_json_atomic(path, summary)
  shutil.rmtree(pack_dir, ignore_errors=True)
  return summaries
