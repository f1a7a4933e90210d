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

import jax
import jax.numpy as jnp
import numpy as np
import optax

from lm.errors import UserError
from lm.eval import evaluate as evaluate_lib
from lm.model import transformer as model_lib
from lm.stages import pretrain as train_lib
from lm.training import checkpoint as ckpt_lib
from lm.training import loop, optim

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
    check_members(cfgs)
    self.cfgs = cfgs
    self.K = len(cfgs)
    self.seeds = [int(c.seed) for c in cfgs]
    self.lrs = np.array([float(c.train.lr) for c in cfgs], np.float32)
    run = run or train_lib.build(cfgs[0])
    self.run = run
    mc, tc = run.model, run.train
    unit = optim.TrainConfig.from_config(dict(cfgs[0].train, lr=1.0))
    self.optimizer = optax.chain(optim.make_optimizer(unit, model_lib.param_shapes(mc), model=mc),
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
    self.abstract_state = ckpt_lib.on_one_device(shapes)

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


def stage(pack: Pack, rdirs: list[str]) -> loop.Stage:
  """The pack as one stage of the training loop (lm/training/loop.py), each member recorded in
  its own run folder."""
  run, tc = pack.run, pack.run.train
  if len(rdirs) != pack.K:
    raise ValueError('one run folder per member')
  bpt = run.dataset.bytes_per_token('val')
  members = tuple(loop.Member(rdir, json.loads(cfg.to_json()),
                              f'packed member {k} (seed {pack.seeds[k]}, lr {pack.lrs[k]:.3g})')
                  for k, (cfg, rdir) in enumerate(zip(pack.cfgs, rdirs)))
  tasks = [evaluate_lib.loop_tasks(tc, run.model, run.dataset.tokenizer, s) for s in pack.seeds]

  def task_eval(params, step):
    return [t(jax.tree.map(lambda x: x[k], params), step) for k, t in enumerate(tasks)]
  return loop.Stage(
      config=members[0].config, train=tc, dtype=run.model.dtype,
      manifest=lambda: train_lib.manifest(run), tokenizer=run.dataset.tokenizer,
      abstract_state=pack.abstract_state, init_state=pack.init_state, frozen=None,
      train_step=lambda state, _, batch: pack.step(state, batch), batch=pack.batch,
      evaluate=lambda params, _: [train_lib.eval_row(float(x), bpt)
                                  for x in pack.evaluate(params)],
      tokens_per_step=tc.batch_size * tc.seq_len, flops_per_token=run.flops_per_token,
      n_params=run.n_params, task_eval=task_eval if tasks[0] is not None else None,
      learning_rate=lambda step: pack.lrs * pack.unit_schedule(step),
      members=members, member_state=pack.member)


def train(cfgs, rdirs: list[str], pack_dir: str, stop_at: int | None = None) -> list[dict]:
  """Trains (or resumes) the packed members, each into its own run folder; returns their
  summaries in order. The stacked state is checkpointed in pack_dir (removed when the members'
  folders are complete); `stop_at` simulates a kill at that step."""
  for cfg, rdir in zip(cfgs, rdirs):
    loop.check_config(rdir, json.loads(cfg.to_json()))   # refuse before preparing any data
  return loop.run(stage(Pack(cfgs), rdirs), pack_dir, stop_at)
