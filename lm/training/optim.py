"""Optimisation settings: the `train` config section, learning-rate schedules and AdamW.

Shared by every training stage (pretraining, fine-tuning, and later objectives): each builds its
optimizer here over whatever tree it trains (all params, or LoRA adapters only).
"""
import dataclasses
import math
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import optax

from lm import tracking
from lm.config import ModelConfig, read_section
from lm.errors import UserError
from lm.host import host_cores
from lm.model import parametrization

SCHEDULES = ('cosine', 'wsd', 'constant')


# The `train` section in the parts that read it. Every stage reads the optimizer, the batch and
# the loop's parts; the pretraining part is pretraining's alone. TrainConfig is the whole section.

@dataclasses.dataclass(frozen=True)
class OptimizerConfig:
  """What make_optimizer and learning_rate_schedule read: AdamW and its schedule."""
  steps: int = 200
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
  opt_dtype: str = 'float32'  # AdamW moments stored as float32 or bfloat16 (half the bytes)
  optimizer: str = 'adamw'    # adamw | muon (make_optimizer)


@dataclasses.dataclass(frozen=True)
class BatchConfig:
  """What a stage's step reads: the batch and how it is split (loop.make_step, micro_batches)."""
  batch_size: int = 16
  seq_len: int = 128
  grad_accum: int = 1
  micro_batch_tokens: int = 512   # CPU only: tokens per micro-batch of a step (see micro_batches)


@dataclasses.dataclass(frozen=True)
class LoopConfig:
  """What the training loop reads (lm/training/loop.py): evaluation, logging and checkpoint
  cadence, progress, profiling; eval_batches is the text stages' held-out batches."""
  eval_every: int = 100
  eval_batches: int = 8
  log_every: int = 10
  checkpoint_every: int = 100
  keep_checkpoints: int = 2
  peak_flops: float = 0.0
  progress: str = 'auto'
  profile_steps: str = ''   # 'A:B': a jax.profiler trace of steps A+1..B in workdir/profile
  async_checkpoint: bool = True   # write checkpoints in the background (lm/training/checkpoint.py)
  wandb: bool = False       # log metrics rows, config and manifest to Weights & Biases (lm/tracking.py)
  wandb_project: str = 'lm'
  wandb_group: str = ''
  wandb_tags: str = ''      # comma-separated


@dataclasses.dataclass(frozen=True)
class PretrainConfig:
  """What pretraining alone reads: its starting weights and the task suites scored during it."""
  init_from: str = ''       # start from this run's weights (lm/stages/pretrain.py)
  eval_tasks: str = ''      # task suites scored at evaluations (lm/eval/tasks.py)
  eval_tasks_every: int = 0  # ... every this many steps (0: at every evaluation)
  eval_harness: str = ''    # lm-evaluation-harness tasks scored at those evaluations too
  eval_harness_limit: int = 100   # ... on this many examples each (0: all)
  eval_harness_include: str = ''  # folders of task YAML files (local data)
  eval_task_examples: int = 100
  eval_shots: int = 3
  z_loss: float = 0.0       # + z_loss x mean(logsumexp(logits)^2) (pretrain.make_train_step)


# A stage refuses a key it would ignore when it is set to anything but its default. (init_from
# outside pretraining is refused by loop.check_stage_start: the later stages have their own.)
_TASKS = 'task suites are scored during pretraining only; score this run with run.py eval'
_ONLY_PRETRAIN = {f.name: _TASKS for f in dataclasses.fields(PretrainConfig)
                  if f.name != 'init_from'}
_ONLY_PRETRAIN['z_loss'] = 'z-loss is added to the pretraining loss only'
_NO_HELD_OUT = 'this stage evaluates on its own held-out pairs or prompts, not on text batches'
_NO_MICRO = 'PPO takes its steps in ppo.minibatch minibatches, not micro-batches'
UNUSED_KEYS = {
    'pretrain': {},
    'finetune': _ONLY_PRETRAIN,
    'reward': dict(_ONLY_PRETRAIN, eval_batches=_NO_HELD_OUT),
    'dpo': dict(_ONLY_PRETRAIN, eval_batches=_NO_HELD_OUT),
    'ppo': dict(_ONLY_PRETRAIN, eval_batches=_NO_HELD_OUT, grad_accum=_NO_MICRO,
                micro_batch_tokens=_NO_MICRO),
    'grpo': dict(_ONLY_PRETRAIN, eval_batches=_NO_HELD_OUT, grad_accum=_NO_MICRO,
                 micro_batch_tokens=_NO_MICRO),
}


@dataclasses.dataclass(frozen=True)
class TrainConfig(PretrainConfig, LoopConfig, BatchConfig, OptimizerConfig):
  """The whole `train` section (keys: configs/base.py), validated together; the parts above say
  who reads which key."""

  def __post_init__(self):
    p = 'train.'
    if self.wandb:
      tracking.require()   # refused before any work when it is not installed
    for key in ('steps', 'batch_size', 'seq_len', 'grad_accum', 'eval_every', 'eval_batches',
                'log_every', 'checkpoint_every', 'keep_checkpoints'):
      v = getattr(self, key)
      if not isinstance(v, int) or v < 1:
        raise UserError(f'{p}{key}={v} must be a positive integer.')
    if not self.lr > 0:
      raise UserError(f'{p}lr={self.lr} must be positive.')
    if self.optimizer not in OPTIMIZERS:
      raise UserError(f"{p}optimizer={self.optimizer!r} is not known; use one of "
                      f"{', '.join(OPTIMIZERS)}.")
    if self.optimizer == 'muon' and self.opt_dtype != 'float32':
      raise UserError(f"{p}opt_dtype={self.opt_dtype!r} is for AdamW's moments; with "
                      f"{p}optimizer='muon' leave it 'float32'.")
    if not 0 <= self.z_loss < 1:   # also catches NaN
      raise UserError(f'{p}z_loss={self.z_loss} must be in [0, 1) (PaLM used 1e-4; 0 is off).')
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
    if not isinstance(self.micro_batch_tokens, int) or self.micro_batch_tokens < 0:
      raise UserError(f'{p}micro_batch_tokens={self.micro_batch_tokens} must be an integer >= 0 '
                      '(0 turns CPU micro-batching off).')
    if self.batch_size % self.grad_accum:
      raise UserError(f'{p}grad_accum={self.grad_accum} does not divide '
                      f'{p}batch_size={self.batch_size}; pick a divisor.')
    for key in ('b1', 'b2'):
      if not 0 <= getattr(self, key) < 1:
        raise UserError(f'{p}{key}={getattr(self, key)} must be in [0, 1).')
    if self.weight_decay < 0 or self.grad_clip < 0 or self.eps <= 0:
      raise UserError(f'{p}weight_decay, {p}grad_clip must be >= 0 and {p}eps > 0.')
    if self.eval_tasks_every < 0 or self.eval_task_examples < 1 or self.eval_shots < 0:
      raise UserError(f'{p}eval_tasks_every must be >= 0, {p}eval_task_examples >= 1 and '
                      f'{p}eval_shots >= 0.')
    if self.profile_steps and self.profile_range() is None:
      raise UserError(f"{p}profile_steps={self.profile_steps!r} must be 'A:B' with "
                      f'0 <= A < B <= train.steps={self.steps}, e.g. 10:13.')
    if self.opt_dtype not in ('float32', 'bfloat16'):
      raise UserError(f"{p}opt_dtype={self.opt_dtype!r} must be 'float32' or 'bfloat16'.")
    if self.progress not in ('auto', 'bar', 'log', 'none'):
      raise UserError(f"{p}progress={self.progress!r} must be auto, bar, log or none.")

  def check_fits(self, max_len: int, what: str = 'model.max_len') -> None:
    """Refuses training windows longer than the model's positions (`what` names its max_len)."""
    if self.seq_len > max_len:
      raise UserError(f'train.seq_len={self.seq_len} is longer than {what}={max_len}; lower '
                      'train.seq_len.')

  def profile_range(self) -> tuple[int, int] | None:
    """(A, B) of train.profile_steps, or None when it is empty or malformed."""
    try:
      a, b = (int(x) for x in self.profile_steps.split(':'))
    except ValueError:
      return None
    return (a, b) if 0 <= a < b <= self.steps else None

  @classmethod
  def from_config(cls, train_cfg, stage: str = 'pretrain') -> 'TrainConfig':
    """The section as `stage` reads it; a key that stage would ignore is refused by name."""
    tc = cls(**read_section(cls, train_cfg, 'train'))
    for key, why in UNUSED_KEYS[stage].items():
      if getattr(tc, key) != getattr(cls, key):
        raise UserError(f'train.{key}={getattr(tc, key)!r} has no effect in a {stage} run ({why}); '
                        f'leave it at its default ({getattr(cls, key)!r}).')
    return tc


def micro_batches(tc: BatchConfig, rows: int, shards: int = 1, platform: str = 'cpu') -> int:
  """How many micro-batches a step over `rows` rows is computed in, their gradients summed.

  train.grad_accum on accelerators (and with train.micro_batch_tokens=0). On a CPU, more where
  that fits: the fewest micro-batches (a multiple of grad_accum dividing rows, each split evenly
  over the `shards` batch shards) whose rows hold at most micro_batch_tokens tokens per shard,
  else one row per shard. A CPU step's forward and backward over 512 tokens at a time keep their
  activations in cache: 10-30% faster than the whole batch at once, the same gradient up to
  float rounding (benchmarks/README.md). Dropout masks are drawn per micro-batch.
  """
  A = tc.grad_accum
  if platform != 'cpu' or not tc.micro_batch_tokens:
    return A
  valid = [a for a in range(A, rows + 1, A) if rows % a == 0 and (rows // a) % shards == 0]
  if not valid:
    return A
  fits = [a for a in valid if rows // a // shards * tc.seq_len <= tc.micro_batch_tokens]
  return fits[0] if fits else valid[-1]


def side_by_side(micro: int, shards: int = 1, platform: str = 'cpu',
                 cores: int | None = None) -> int:
  """How many of a step's `micro` micro-batches are computed side by side, as independent
  chains of work in one loop iteration, so that XLA's CPU runtime runs them on different cores.

  A micro-batch's ops are too small to fill two cores one at a time (XLA:CPU runs its batched
  attention matmuls on one thread), so on a CPU with spare cores per batch shard the step takes
  the largest divisor of `micro` that is at most cores // shards (1 on one core, where chains
  side by side only lose cache). The gradients are still summed in micro-batch order, so the
  result is the same to float rounding (XLA fuses the two layouts differently). 1 on
  accelerators. Measured on two cores: 4-10% faster steps at the benchmark's shapes
  (benchmarks/README.md).
  """
  if platform != 'cpu' or micro <= 1:
    return 1
  spare = max(1, (cores or host_cores()) // max(shards, 1))
  return max(p for p in range(1, min(spare, micro) + 1) if micro % p == 0)


def learning_rate_schedule(tc: OptimizerConfig) -> optax.Schedule:
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
  """True for weight matrices and LoRA factors; norms, biases and (unless asked) embeddings are
  not decayed."""
  matrices = ('wq', 'wk', 'wv', 'wo', 'wi', 'wg', 'head')

  def keep(path, x):
    name = str(getattr(path[-1], 'key', path[-1]))
    if name in ('embed', 'pos_embed'):
      return decay_embeddings
    return name in matrices or name[:-2] in matrices and name[-2:] in ('_a', '_b')
  return jax.tree_util.tree_map_with_path(keep, params)


class _AdamState(NamedTuple):
  count: jax.Array
  mu: Any
  nu: Any


def scale_by_adam_stored_as(b1: float, b2: float, eps: float, dtype) -> optax.GradientTransformation:
  """Adam's scaling (bias-corrected mu / (sqrt(nu) + eps)) with both moments kept in `dtype`
  between steps: each update reads them as float32, computes in float32 and rounds them back.
  bfloat16 halves the optimizer state (it keeps float32's exponent range, so the squared
  gradients in nu do not underflow; it keeps 8 bits of mantissa)."""
  def init(params):
    zeros = lambda p: jnp.zeros(p.shape, dtype)
    return _AdamState(jnp.zeros((), jnp.int32), jax.tree.map(zeros, params),
                      jax.tree.map(zeros, params))

  def update(updates, state, params=None):
    del params
    f32 = lambda t: jax.tree.map(lambda x: x.astype(jnp.float32), t)
    mu = jax.tree.map(lambda m, g: b1 * m + (1 - b1) * g, f32(state.mu), f32(updates))
    nu = jax.tree.map(lambda v, g: b2 * v + (1 - b2) * g * g, f32(state.nu), f32(updates))
    count = state.count + 1
    c1, c2 = 1 - b1 ** count.astype(jnp.float32), 1 - b2 ** count.astype(jnp.float32)
    out = jax.tree.map(lambda m, v, g: ((m / c1) / (jnp.sqrt(v / c2) + eps)).astype(g.dtype),
                       mu, nu, updates)
    store = lambda t: jax.tree.map(lambda x: x.astype(dtype), t)
    return out, _AdamState(count, store(mu), store(nu))
  return optax.GradientTransformation(init, update)


OPTIMIZERS = ('adamw', 'muon')

# Muon's matrices: (module, name) -> (reduction axes, output axes) of the unstacked weight; any
# leading axes (scan_layers' layer axis) are batch axes, each slice orthogonalised alone.
MUON_MATRICES = {('attn', 'wq'): ((0,), (1, 2)), ('attn', 'wk'): ((0,), (1, 2)),
                 ('attn', 'wv'): ((0,), (1, 2)), ('attn', 'wo'): ((0, 1), (2,)),
                 ('mlp', 'wi'): ((0,), (1,)), ('mlp', 'wg'): ((0,), (1,)),
                 ('mlp', 'wo'): ((0,), (1,))}
MUON_UPDATE_RMS = 0.2   # Muon's updates scaled to AdamW's typical RMS, so both share train.lr



def muon_dims(params):
  """The tree of MuonDimensionNumbers for the hidden matrices, None for every other leaf."""
  from optax.contrib import MuonDimensionNumbers

  def dims(path, x):
    if isinstance(x, optax.MaskedNode):
      return x
    base = MUON_MATRICES.get(parametrization.path_names(path)[-2:])
    if base is None:
      return None
    reduction, output = base
    lead = x.ndim - len(reduction) - len(output)
    return MuonDimensionNumbers(tuple(a + lead for a in reduction),
                                tuple(a + lead for a in output))
  return jax.tree_util.tree_map_with_path(dims, params,
                                          is_leaf=lambda x: isinstance(x, optax.MaskedNode))


def muon_labels(params):
  """'muon' for the hidden matrices, 'adam' for embeddings, norms, biases, the head and any
  other leaf."""
  return jax.tree_util.tree_map_with_path(
      lambda path, _: 'muon' if parametrization.path_names(path)[-2:] in MUON_MATRICES else 'adam', params)


def _scale_to_rms(rms: float) -> optax.GradientTransformation:
  """An orthogonalised [fan_in, fan_out] update has RMS 1 / sqrt(max(fan_in, fan_out)); this
  scales it to `rms`."""
  def scale(path, u):
    if isinstance(u, optax.MaskedNode):
      return u
    reduction, output = MUON_MATRICES[parametrization.path_names(path)[-2:]]
    lead = u.ndim - len(reduction) - len(output)
    fans = (math.prod(u.shape[lead + a] for a in reduction),
            math.prod(u.shape[lead + a] for a in output))
    return u * (rms * math.sqrt(max(fans)))

  def update(updates, state, params=None):
    del params
    return jax.tree_util.tree_map_with_path(
        scale, updates, is_leaf=lambda x: isinstance(x, optax.MaskedNode)), state
  return optax.GradientTransformation(lambda params: optax.EmptyState(), update)


def _muon(tc: OptimizerConfig, params, adamw) -> optax.GradientTransformation:
  """Muon (Jordan et al. 2024: momentum orthogonalised by Newton-Schulz iterations, Nesterov)
  on the attention and MLP matrices, with updates scaled to RMS MUON_UPDATE_RMS x
  sqrt(max dim) as Moonlight does (Liu et al. 2025) so that the matrices share train.lr and its
  schedule with AdamW, which trains the rest."""
  from optax import contrib
  muon = optax.chain(
      contrib.scale_by_muon(weight_dimension_numbers=muon_dims),
      _scale_to_rms(MUON_UPDATE_RMS),
      optax.add_decayed_weights(tc.weight_decay),
      optax.scale_by_learning_rate(learning_rate_schedule(tc)))
  return optax.partition({'muon': muon, 'adam': adamw}, muon_labels(params))


def make_optimizer(tc: OptimizerConfig, params, lora_b_lr_ratio: float = 1.0,
                   model: ModelConfig | None = None) -> optax.GradientTransformation:
  """AdamW with the decay mask, after global-norm clipping (clip 0 disables it); with
  train.optimizer='muon', Muon on the hidden matrices and AdamW on the rest (_muon).

  lora_b_lr_ratio != 1 gives the LoRA B factors (leaves named *_b) that multiple of the learning
  rate, as LoRA+ does (Hayou et al. 2024: B learns efficiently with a larger step than A).
  `model`: the config of the model whose weights `params` are (or wrap); a μP model's hidden
  matrices get its per-layer rates (lm/model/parametrization.py).
  """
  mup = model is not None and parametrization.is_mup(model)
  if mup and getattr(tc, 'optimizer', 'adamw') == 'muon':
    raise UserError("train.optimizer='muon' sets the hidden matrices' step sizes itself, and "
                    "model.parametrization='mup' sets them for AdamW; use one of the two.")
  all_f32 = all(jnp.dtype(x.dtype) == jnp.float32 for x in jax.tree.leaves(params))
  if tc.opt_dtype == 'float32' and all_f32:
    adamw = optax.adamw(learning_rate_schedule(tc), b1=tc.b1, b2=tc.b2, eps=tc.eps,
                        weight_decay=tc.weight_decay,
                        mask=lambda p: decay_mask(p, tc.decay_embeddings))
  else:   # optax.adamw's chain, with both moments stored in opt_dtype whatever the params'
    adamw = optax.chain(
        scale_by_adam_stored_as(tc.b1, tc.b2, tc.eps, jnp.dtype(tc.opt_dtype)),
        optax.add_decayed_weights(tc.weight_decay,
                                  lambda p: decay_mask(p, tc.decay_embeddings)),
        optax.scale_by_learning_rate(learning_rate_schedule(tc)))
  if lora_b_lr_ratio != 1.0 or mup:
    ratio = jax.tree_util.tree_map_with_path(
        lambda path, _: lora_b_lr_ratio if str(getattr(path[-1], 'key', '')).endswith('_b')
        else 1.0, params)
    if mup:
      ratio = jax.tree.map(lambda r, s: r * s, ratio, parametrization.lr_scales(model, params))
    adamw = optax.chain(adamw, optax.stateless(
        lambda updates, _: jax.tree.map(lambda u, r: u * r, updates, ratio)))
  if getattr(tc, 'optimizer', 'adamw') == 'muon':
    adamw = _muon(tc, params, adamw)
  if tc.grad_clip > 0:
    return optax.chain(optax.clip_by_global_norm(tc.grad_clip), adamw)
  return adamw
