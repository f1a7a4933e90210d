"""The plan of a scaling sweep: the runs a sweep config describes (a model-size ladder; IsoFLOP
budgets or an N x D grid), each as a RunSpec and its full resolved config, and the checks that
a sweep folder's runs belong to this plan (check_run_identity).

Rules (documented in docs/scaling.md, set in the sweep config):
  shape:   for a target N (all parameters, embeddings included) pick n_layers and d_model so that
           d_model / n_layers stays near `sweep.aspect`, with d_model a multiple of the fixed
           `sweep.head_dim` (n_heads = d_model / head_dim); N is counted exactly from the shapes.
  IsoFLOP: per budget C the predicted optimum is N* = sqrt(C / (k * tokens_per_param)) with
           k = FLOPs-per-token / N of the shape at N* (Chinchilla App. F, the count that spends
           the budget: 7-13 at these sizes, not 6); sizes span N* / span .. N* * span evenly in log N; D = C / FLOPs-per-token of
           the chosen shape (Chinchilla App. F count, so C is the compute the run really spends).
  shape:   at least `sweep.min_layers` layers, d_model / n_layers within a factor
           `sweep.aspect_band` of `sweep.aspect`. With aspect_band = 1 (isoflop_wsd) every shape
           has d_model = aspect · n_layers and each budget takes all such shapes from N*/span to
           N*·span: a ladder of one aspect (docs/results/exponent_aspect: at 1e4-1e6 parameters
           the aspect moves the loss by a few percent at one size).
  batch:   the largest of `sweep.batch_sizes` that leaves the run `sweep.min_steps` steps or more
           (without sweep.batch_sizes: the base config's batch, fixed per sweep).
  steps:   D / (batch_size * seq_len), rounded.
  eval:    every run of a sweep is scored on the same `sweep.eval_rows` validation windows
           (train.eval_batches = eval_rows / batch), whatever its batch; 0 (or absent): the base
           config's eval_batches x batch_size windows.
  lr:      sweep.lr * (sweep.lr_ref_width / d_model) ** sweep.lr_width_power (wider -> smaller).
           With sweep.parametrization = 'mup' every run is μP with model.mup_base_width =
           sweep.lr_ref_width and takes sweep.lr itself (lr_width_power must be 0): μP scales the
           hidden layers' rates inside the optimizer (lm/model/parametrization.py), so one scan
           at the base width sets the rate of every size.
  seeds:   every run with sweep.seeds seeds; the smallest IsoFLOP budget (the
           sweep.seeds_smallest_budgets smallest, default 1) with sweep.seeds_smallest (if more), so
           that run-to-run noise is measured (numerics.seed_noise) and carried into the Approach 3
           intervals. Raising either extends a finished folder: the runs already there are
           skipped, but in mode isoflop_wsd an extra-seed run that now branches from a longer
           trunk of its seed takes that trunk's warmup, and where that differs the sweep refuses
           the folder and names the run (move it aside and it is trained again).
  warmup:  min(sweep.warmup_max, sweep.warmup_fraction * steps); cosine to 10% over each run.
  pack:    sweep.pack = K > 1 trains runs that differ only in seed (or lr) K at a time as one
           vmapped program (lm/scaling/packed.py), for accelerators that one small model cannot
           fill; each still gets its own folder and row. 1 (the default): every run alone.
  only:    sweep.only = a regular expression: the plan keeps the runs whose names it matches
           (re.search) and the trunks they branch from, to train part of a plan (a changed shape,
           one budget) in its own folder; '' (the default) keeps every run.
"""
import copy
import dataclasses
import functools
import json
import math
import os
import re

import numpy as np

from lm.config import ModelConfig, read_section
from lm.errors import UserError
from lm.model import flops as flops_lib
from lm.training import loop


@dataclasses.dataclass(frozen=True)
class RunSpec:
  name: str
  n_layers: int
  d_model: int
  n_heads: int
  steps: int
  lr: float
  warmup_steps: int
  seed: int
  budget: float | None
  params: int
  flops_per_token: float
  cooldown: float = 0.0   # wsd mode: the share of steps spent decaying (0: cosine)
  trunk: str = ''         # wsd mode: the run this one branches from ('' for the trunk itself)
  branch_step: int = 0    # wsd mode: the trunk step where this run's cooldown starts
  batch_size: int = 0     # sequences per step (the batch rule; 0: the base train.batch_size)


MODES = ('isoflop', 'grid', 'wsd', 'isoflop_wsd')
ISOFLOP_MODES = ('isoflop', 'isoflop_wsd')   # runs planned per FLOP budget
WSD_MODES = ('wsd', 'isoflop_wsd')           # runs as warmup-stable-decay branches of trunks


def _model_cfg(base_model, vocab: int, n_layers: int, d_model: int, head_dim: int) -> ModelConfig:
  return ModelConfig.from_config(dict(base_model, n_layers=n_layers, d_model=d_model,
                                      n_heads=d_model // head_dim, n_kv_heads=0, d_ff=0), vocab)


def shape_for(target_n: float, base_model, vocab: int, head_dim: int, aspect: float,
              max_layers: int = 48, min_layers: int = 1, band: float = 4.0):
  """(n_layers, d_model, N) with total N nearest target_n in log, at least `min_layers` layers
  and d_model / n_layers within a factor `band` of `aspect` (the depth-to-width ratio matters
  little within such a band: Kaplan et al. 2020, Fig. 5); ties go to the shape nearest `aspect`.
  Memoised (a pure function of its arguments; planning many candidate sweeps asks again and
  again, lm/scaling/budget.py)."""
  model = base_model.to_dict() if hasattr(base_model, 'to_dict') else dict(base_model)
  return _shape_for(round(target_n), json.dumps(model, sort_keys=True, default=str), vocab,
                    head_dim, aspect, max_layers, min_layers, band)


@functools.lru_cache(maxsize=8192)
def _shape_for(target_n: int, model_json: str, vocab: int, head_dim: int, aspect: float,
               max_layers: int, min_layers: int, band: float):
  base_model = json.loads(model_json)
  best = None
  for L in range(min_layers, max_layers + 1):
    for d in range(head_dim, 256 * head_dim + 1, head_dim):
      ratio = d / L
      if ratio > band * aspect:
        break
      if ratio < aspect / band:
        continue
      n = flops_lib.param_counts_from_config(_model_cfg(base_model, vocab, L, d, head_dim))['total']
      key = (round(abs(math.log(n / target_n)), 3), abs(math.log(ratio / aspect)))
      if best is None or key < best[0]:
        best = (key, L, d, n)
      if n > 4 * target_n:   # wider only moves further away
        break
  if best is None:
    raise UserError(f'No model shape with head_dim={head_dim}, at least {min_layers} layers and '
                    f'd_model/n_layers within {band}x of sweep.aspect={aspect} exists; lower '
                    'sweep.head_dim or sweep.min_layers, or widen sweep.aspect_band.')
  return best[1], best[2], best[3]


def _exact(x: float, digits: int) -> str:
  """x in scientific notation with as many digits as it takes to read back exactly (at least
  `digits` after the point), without the '+': 1e13 -> '1e13', 1.5e13 -> '1.5e13'. Run names
  built from it are distinct for distinct budgets."""
  for p in range(digits, 17):
    text = f'{x:.{p}e}'
    if float(text) == x:
      break
  return text.replace('+', '')


def _positive_numbers(s, key: str, integer: bool = False) -> None:
  v = s.get(key)
  values = v if isinstance(v, (tuple, list)) else (v,)
  ok = len(values) > 0
  for x in values:
    if isinstance(x, bool) or not isinstance(x, (int, float)) or not math.isfinite(x) or x <= 0:
      ok = False
    elif integer and int(x) != x:
      ok = False
  if not ok:
    kind = 'a positive integer' if integer else 'a positive number'
    what = 'a non-empty tuple of positive numbers, e.g. (1e12, 3e12)' if isinstance(
        v, (tuple, list)) else kind
    raise UserError(f'sweep.{key}={v!r} must be {what}.')


@dataclasses.dataclass(frozen=True)
class SweepKeys:
  """The keys a `sweep` section may hold and their types (meanings: configs/sweep_smoke.py). The
  section is read through lm.config.read_section, so a misspelt or unknown key, or a value of
  the wrong type, is refused by name before anything runs; keys with a default may be left out."""
  mode: str
  budgets: tuple
  sizes_per_budget: int
  span: float
  tokens_per_param: float
  grid_params: tuple
  grid_tokens: tuple
  head_dim: int
  aspect: float
  lr: float
  lr_ref_width: int
  lr_width_power: float
  warmup_fraction: float
  warmup_max: int
  seeds: int
  evals_per_run: int
  checkpoints_per_run: int
  max_attempts: int
  bootstrap: int
  cooldown: float = 0.2
  seeds_smallest: int = 0
  seeds_smallest_budgets: int = 1
  only: str = ''
  eval_rows: int = 0
  parallel: int = 1
  pack: int = 1
  min_layers: int = 1
  aspect_band: float = 4.0
  batch_sizes: tuple = ()
  min_steps: int = 0
  backend: str = 'local'      # where runs train: local | ray | slurm (lm/scaling/cluster.py)
  max_in_flight: int = 0      # ray/slurm: runs at once at most (0: as many as the cluster takes)
  ray_address: str = ''       # '' this machine's cluster or a new local one; 'auto'; 'HOST:PORT'
  ray_num_cpus: float = 1.0   # what each run's Ray task asks for
  ray_num_gpus: float = 0.0
  ray_resources: str = ''     # custom Ray resources per run, 'name:amount,...' (a TPU slice)
  slurm_executor: str = 'auto'   # slurm | local (submitit's, on this machine) | auto
  slurm_partition: str = ''
  slurm_time_min: int = 240   # each job's time limit; a run past it resumes in its next job
  slurm_cpus: int = 4
  slurm_gpus: int = 0
  harness: str = ''           # lm-evaluation-harness tasks every finished run is scored on
  harness_limit: int = 0      # examples per task (0: all)
  harness_include: str = ''   # folders of task YAML files (local data)
  parametrization: str = 'sp'   # sp | mup: every run under μP, base width sweep.lr_ref_width


def validate(s) -> None:
  """Every sweep key checked before anything is planned or written: one sentence per problem."""
  read_section(SweepKeys, s, 'sweep')
  if s.mode not in MODES:
    raise UserError(f"sweep.mode={s.mode!r} is not known; use one of {', '.join(MODES)}.")
  keys = ['span', 'tokens_per_param', 'aspect', 'lr', 'lr_ref_width']
  keys += ['budgets'] if s.mode in ISOFLOP_MODES else ['grid_params', 'grid_tokens']
  if s.mode in WSD_MODES:
    if not 0 < s.get('cooldown', 0.2) < 1:
      raise UserError(f"sweep.cooldown={s.get('cooldown')} must be in (0, 1) (the share of "
                      'each run spent decaying).')
    if int(s.get('pack', 1)) > 1:
      raise UserError(f'sweep.mode={s.mode} branches its runs from trunks and cannot pack them; '
                      'set sweep.pack=1.')
  for key in keys:
    _positive_numbers(s, key)
  if 'batch_sizes' in s:
    _positive_numbers(s, 'batch_sizes', integer=True)
  rows = s.get('eval_rows', 0)
  if isinstance(rows, bool) or not isinstance(rows, int) or rows < 0:
    raise UserError(f'sweep.eval_rows={rows!r} must be a non-negative integer (validation windows '
                    "every run is scored on; 0: the base config's eval_batches x batch_size).")
  par = s.get('parallel', 1)
  if isinstance(par, bool) or not isinstance(par, int) or par < 0:
    raise UserError(f'sweep.parallel={par!r} must be 0 (as many runs at once as the machine '
                    'has CPU cores or GPUs) or a positive integer (1: runs one after another).')
  if 'aspect_band' in s and not s.aspect_band >= 1:
    raise UserError(f'sweep.aspect_band={s.aspect_band} must be at least 1 (d_model/n_layers '
                    'within that factor of sweep.aspect).')
  for key in ('sizes_per_budget', 'head_dim', 'seeds', 'evals_per_run', 'checkpoints_per_run',
              'max_attempts', 'min_layers', 'min_steps', 'seeds_smallest',
              'seeds_smallest_budgets', 'pack'):
    if key in s:
      _positive_numbers(s, key, integer=True)
  if int(s.get('pack', 1)) > 1 and int(s.get('parallel', 1)) > 1:
    raise UserError(f'sweep.pack={s.pack} trains its packs in the sweep\'s own process; set '
                    'sweep.parallel=1 (or 0), or sweep.pack=1 for runs in parallel processes.')
  _check_backend(s)
  param = s.get('parametrization', 'sp')
  if param not in ('sp', 'mup'):
    raise UserError(f"sweep.parametrization={param!r} is not known; use sp or mup.")
  if param == 'mup' and s.lr_width_power != 0:
    raise UserError(f'sweep.lr_width_power={s.lr_width_power} would scale the rate by width on '
                    "top of μP's own per-layer rates; with sweep.parametrization='mup' set it to 0.")
  if s.span < 1:
    raise UserError(f'sweep.span={s.span} must be at least 1 (sizes run from N*/span to N*·span).')
  if not 0 <= s.warmup_fraction < 1:
    raise UserError(f'sweep.warmup_fraction={s.warmup_fraction} must be in [0, 1).')
  if s.warmup_max < 0:
    raise UserError(f'sweep.warmup_max={s.warmup_max} must be >= 0.')
  if s.bootstrap < 0:
    raise UserError(f'sweep.bootstrap={s.bootstrap} must be >= 0 (0: no intervals).')
  only = s.get('only', '')
  if not isinstance(only, str):
    raise UserError(f'sweep.only={only!r} must be a regular expression (a string) over run names.')
  try:
    re.compile(only)
  except re.error as e:
    raise UserError(f'sweep.only={only!r} is not a valid regular expression ({e}); '
                    "write one that matches run names such as 'C1e12_L4_d32_s0', or ''.") from None


BACKENDS = ('local', 'ray', 'slurm')


def _check_backend(s) -> None:
  backend = s.get('backend', 'local')
  if backend not in BACKENDS:
    raise UserError(f"sweep.backend={backend!r} is not known; use one of {', '.join(BACKENDS)}.")
  if backend != 'local' and int(s.get('pack', 1)) > 1:
    raise UserError(f'sweep.pack={s.pack} trains packs in the sweep\'s own process, and '
                    f'sweep.backend={backend} trains every run on a cluster node; set '
                    'sweep.pack=1.')
  for key in ('max_in_flight', 'slurm_time_min', 'slurm_cpus', 'slurm_gpus'):
    v = s.get(key, 0)
    if isinstance(v, bool) or not isinstance(v, int) or v < 0:
      raise UserError(f'sweep.{key}={v!r} must be a non-negative integer.')
  for key in ('ray_num_cpus', 'ray_num_gpus'):
    v = s.get(key, 0)
    if isinstance(v, bool) or not isinstance(v, (int, float)) or not math.isfinite(v) or v < 0:
      raise UserError(f'sweep.{key}={v!r} must be a non-negative number.')


class _Planner:
  """The model shape, the run and the predicted optimum for one sweep config (shapes cached by
  target N: the plan asks for the same targets again and again)."""

  def __init__(self, s, base_cfg, vocab: int):
    self.s, self.base_cfg, self.vocab = s, base_cfg, vocab
    self.t = base_cfg.train
    self.cache = {}

  def shape(self, target_n):
    s = self.s
    key = round(target_n)
    if key not in self.cache:
      self.cache[key] = shape_for(target_n, self.base_cfg.model, self.vocab, s.head_dim, s.aspect,
                                  min_layers=int(s.get('min_layers', 1)),
                                  band=float(s.get('aspect_band', 4.0)))
    return self.cache[key]

  def spec(self, target_n, budget, tokens, seed) -> RunSpec:
    s, t = self.s, self.t
    L, d, n = self.shape(target_n)
    mc = _model_cfg(self.base_cfg.model, self.vocab, L, d, s.head_dim)
    fpt = flops_lib.flops_per_token(mc, t.seq_len, n)['chinchilla']
    if tokens is None:
      tokens = budget / fpt
    batch = batch_for(tokens, t.seq_len, s, t.batch_size)
    steps = max(1, round(tokens / (batch * t.seq_len)))
    lr = s.lr * (s.lr_ref_width / d) ** s.lr_width_power
    warmup = int(min(s.warmup_max, s.warmup_fraction * steps))
    tag = f'C{_exact(budget, 0)}' if budget else f'D{_exact(tokens, 1)}'
    name = f'{tag}_L{L}_d{d}_s{seed}'
    return RunSpec(name, L, d, d // s.head_dim, steps, float(lr), warmup, seed,
                   float(budget) if budget else None, int(n), float(fpt), batch_size=batch)

  def optimum(self, C):
    """N* with D* = tokens_per_param N* and C = FLOPs-per-token(N*) D*: the same (App. F)
    count that spends the budget, per token of the shape nearest N* (a few fixed-point steps
    from the 6 N D guess; the count per parameter varies slowly with N)."""
    s = self.s
    n = math.sqrt(C / (6.0 * s.tokens_per_param))
    for _ in range(4):
      L, d, n_shape = self.shape(n)
      mc = _model_cfg(self.base_cfg.model, self.vocab, L, d, s.head_dim)
      k = flops_lib.flops_per_token(mc, self.t.seq_len, n_shape)['chinchilla'] / n_shape
      n = math.sqrt(C / (k * s.tokens_per_param))
    return n


def plan(sweep_cfg, base_cfg, vocab: int) -> list[RunSpec]:
  """The list of runs a sweep config describes (pure: same config, same plan)."""
  s = sweep_cfg
  validate(s)
  p = _Planner(s, base_cfg, vocab)
  extra = int(s.get('seeds_smallest', 0))   # the smallest budgets repeated with more seeds
  if s.mode in ISOFLOP_MODES:
    smallest = sorted(s.budgets)[:int(s.get('seeds_smallest_budgets', 1))]
  if s.mode == 'isoflop_wsd':
    sizes = _isoflop_wsd_sizes(p)
  specs = []
  for seed in range(max(s.seeds, extra if s.mode in ISOFLOP_MODES else 0)):
    if s.mode in ISOFLOP_MODES:
      budgets = s.budgets if seed < s.seeds else [C for C in s.budgets if C in smallest]
    if s.mode == 'isoflop':
      specs.extend(_isoflop_runs(p, budgets, seed))
    elif s.mode == 'isoflop_wsd':
      specs.extend(_isoflop_wsd_runs(p, budgets, seed, sizes, float(s.get('cooldown', 0.2))))
    elif s.mode == 'grid':
      for n in s.grid_params:
        for d_tokens in s.grid_tokens:
          specs.append(p.spec(n, None, d_tokens, seed))
    elif s.mode == 'wsd':
      for n in s.grid_params:
        specs.extend(_wsd_family([p.spec(n, None, d, seed) for d in sorted(s.grid_tokens)],
                                 float(s.get('cooldown', 0.2))))
  unique = {}
  for sp in specs:   # two targets can round to the same shape: run it once
    unique.setdefault(sp.name, sp)
  return _only(list(unique.values()), s.get('only', ''))


def _isoflop_runs(p: _Planner, budgets, seed: int) -> list[RunSpec]:
  """Mode isoflop: per budget, sizes_per_budget sizes evenly in log N from N*/span to N*·span."""
  s = p.s
  specs = []
  for C in budgets:
    n_star = p.optimum(C)
    for f in np.geomspace(1 / s.span, s.span, s.sizes_per_budget):
      specs.append(p.spec(n_star * f, C, None, seed))
  return specs


def _isoflop_wsd_sizes(p: _Planner):
  """Mode isoflop_wsd: the function N* -> the sizes a budget of predicted optimum N* takes.

  One ladder of sizes for every budget, so that a size recurs across budgets and its runs can
  share a trunk: n0 · step^j, with n0 the smallest budget's predicted optimum and the step that
  puts sizes_per_budget rungs from N*/span to N*·span. With sweep.aspect_band = 1 every shape
  has d_model = aspect · n_layers, and those shapes are the rungs: each budget takes all of them
  from N*/span to N*·span."""
  s = p.s
  n0 = p.optimum(min(s.budgets))
  step = s.span ** (2.0 / (s.sizes_per_budget - 1)) if s.sizes_per_budget > 1 else 1.0
  if float(s.get('aspect_band', 4.0)) == 1.0:
    rungs = one_aspect_sizes(p.base_cfg.model, p.vocab, s.head_dim, s.aspect,
                             int(s.get('min_layers', 1)))
    return lambda n_star: [r for r in rungs if n_star / s.span <= r <= n_star * s.span]
  return lambda n_star: ladder(n_star, n0, step, s.span)


def _isoflop_wsd_runs(p: _Planner, budgets, seed: int, sizes, cooldown: float) -> list[RunSpec]:
  """Mode isoflop_wsd: each budget's sizes (`sizes`: _isoflop_wsd_sizes), the runs of one shape
  as WSD branches of its longest (_isoflop_families)."""
  runs = {}
  for C in budgets:
    n_star = p.optimum(C)
    for n in sizes(n_star):
      sp = p.spec(n, C, None, seed)
      runs.setdefault(sp.name, sp)
  return _isoflop_families(list(runs.values()), cooldown)


def _only(specs: list[RunSpec], pattern: str) -> list[RunSpec]:
  """The runs whose names match `pattern` (all for ''), with the trunks they branch from."""
  if not pattern:
    return specs
  by_name = {sp.name: sp for sp in specs}
  keep = set()
  for sp in specs:
    if re.search(pattern, sp.name):
      while sp is not None and sp.name not in keep:
        keep.add(sp.name)
        sp = by_name.get(sp.trunk) if sp.trunk else None
  if not keep:
    raise UserError(f'sweep.only={pattern!r} matches none of the {len(specs)} planned runs (names '
                    f'such as {specs[0].name!r}); fix the pattern or set it to the empty string.')
  return [sp for sp in specs if sp.name in keep]


def one_aspect_sizes(base_model, vocab: int, head_dim: int, aspect: float, min_layers: int = 1,
                     max_layers: int = 48) -> list[int]:
  """Total parameters of every shape with d_model = aspect · n_layers exactly (a multiple of
  head_dim), from min_layers to max_layers layers: the rungs of a ladder of one aspect."""
  out = []
  for L in range(min_layers, max_layers + 1):
    d = aspect * L
    if abs(d - round(d)) < 1e-9 and round(d) % head_dim == 0:
      out.append(flops_lib.param_counts_from_config(
          _model_cfg(base_model, vocab, L, round(d), head_dim))['total'])
  if not out:
    raise UserError(f'sweep.aspect_band=1 asks for shapes with d_model = {aspect} x n_layers, a '
                    f'multiple of sweep.head_dim={head_dim}, and there are none: pick an aspect '
                    'and head_dim that allow it (aspect 10, head_dim 10) or widen the band.')
  return out


def ladder(n_star: float, n0: float, step: float, span: float) -> list[float]:
  """The rungs n0 · step^j (j any integer) from n_star / span to n_star · span."""
  if step <= 1.0:
    return [n_star]
  lo = math.ceil(math.log(n_star / span / n0, step) - 1e-6)
  hi = math.floor(math.log(n_star * span / n0, step) + 1e-6)
  return [n0 * step ** j for j in range(lo, hi + 1)]


def _isoflop_families(specs: list[RunSpec], cooldown: float) -> list[RunSpec]:
  """IsoFLOP runs as WSD branches: the runs of one shape (and seed) that the batch rule gives
  the same batch form one family, in order of tokens, and are branches of its longest run. Every
  run keeps its own budget, batch and steps; only the schedule (a trunk's constant rate, then
  its own cooldown) is shared. Families come out in plan order: budget by budget."""
  groups = {}
  for sp in sorted(specs, key=lambda x: x.steps):
    groups.setdefault((sp.n_layers, sp.d_model, sp.seed, sp.batch_size), []).append(sp)
  out = {}
  for family in groups.values():
    for sp in _wsd_family(family, cooldown):
      out[sp.name] = sp
  return [out[sp.name] for sp in specs]


def _wsd_family(specs: list[RunSpec], cooldown: float) -> list[RunSpec]:
  """One model size at several token counts as warmup-stable-decay branches of one trunk
  (Hägele et al. 2024): every run shares the trunk's warmup and constant learning rate, and run j
  leaves the trunk at the step where its own linear cooldown (the last `cooldown` share of its
  steps) begins. Until then it is the trunk, step for step, so it starts from the trunk's
  checkpoint there; the longest run is the trunk itself."""
  trunk = specs[-1]
  out = []
  for sp in specs:
    decay = min(max(1, round(cooldown * sp.steps)), sp.steps - trunk.warmup_steps)
    if decay < 1:
      raise UserError(f'run {sp.name} has {sp.steps} steps, no more than the trunk\'s '
                      f'{trunk.warmup_steps} warmup steps; raise the smallest of '
                      'sweep.grid_tokens or lower sweep.warmup_max.')
    out.append(dataclasses.replace(
        sp, warmup_steps=trunk.warmup_steps, cooldown=cooldown,
        trunk='' if sp is trunk else trunk.name, branch_step=sp.steps - decay))
  return out


def batch_for(tokens: float, seq_len: int, s, default: int) -> int:
  """The batch rule: the largest of sweep.batch_sizes that still gives the run at least
  sweep.min_steps steps (the smallest of them when none does); without sweep.batch_sizes the base
  config's train.batch_size. Large batches make the small models' points cheap on a CPU; the
  step floor keeps every run long enough to warm up, train and decay."""
  if 'batch_sizes' not in s:
    return default
  sizes = sorted(int(b) for b in s.batch_sizes)
  fits = [b for b in sizes if tokens / (b * seq_len) >= int(s.get('min_steps', 1))]
  return fits[-1] if fits else sizes[0]


def spec_batch(sp: RunSpec, base_cfg) -> int:
  return sp.batch_size or int(base_cfg.train.batch_size)


def eval_rows(s, base_cfg) -> int:
  """The number of validation windows every run of the sweep is scored on."""
  return int(s.get('eval_rows', 0)) or int(base_cfg.train.eval_batches) * int(
      base_cfg.train.batch_size)


def check_eval_rows(s, base_cfg, specs) -> None:
  """Each run reads eval_rows / batch evaluation batches of its own batch size, so that all runs
  score the same windows (lm/data.eval_batches spaces n x batch windows over the validation
  stream): eval_rows must be a multiple of every batch the plan uses."""
  rows = eval_rows(s, base_cfg)
  bad = sorted({spec_batch(sp, base_cfg) for sp in specs if rows % spec_batch(sp, base_cfg)})
  if bad:
    raise UserError(f'sweep.eval_rows={rows} is not a multiple of the batch size '
                    f'{bad[0]} that some runs use, so runs of different batches would be scored on '
                    f'different validation windows; set sweep.eval_rows to a multiple of '
                    f'{math.lcm(*{spec_batch(sp, base_cfg) for sp in specs})}.')


def mup_base_width(s) -> int:
  """The μP base width of a sweep's runs: sweep.lr_ref_width under sweep.parametrization='mup',
  0 (SP) otherwise."""
  return int(s.lr_ref_width) if s.get('parametrization', 'sp') == 'mup' else 0


def run_config(base_cfg, sp: RunSpec, evals: int = 4, checkpoints: int = 4, rows: int = 0,
               mup_width: int = 0):
  """The full config of one run. Its evaluations read `rows` validation windows (0: the base
  config's eval_batches x batch_size) in rows / batch batches: the same windows whatever the
  run's batch. mup_width > 0: a μP run with that base width (mup_base_width)."""
  cfg = copy.deepcopy(base_cfg)
  if mup_width:
    cfg.model.parametrization, cfg.model.mup_base_width = 'mup', mup_width
  cfg.seed = sp.seed
  cfg.model.n_layers, cfg.model.d_model, cfg.model.n_heads = sp.n_layers, sp.d_model, sp.n_heads
  cfg.model.n_kv_heads, cfg.model.d_ff = 0, 0
  cfg.train.steps, cfg.train.lr, cfg.train.warmup_steps = sp.steps, sp.lr, sp.warmup_steps
  cfg.train.batch_size = spec_batch(sp, base_cfg)
  rows = rows or int(base_cfg.train.eval_batches) * int(base_cfg.train.batch_size)
  cfg.train.eval_batches = max(1, rows // cfg.train.batch_size)
  cfg.train.eval_every = max(1, sp.steps // evals)
  cfg.train.checkpoint_every = max(1, sp.steps // checkpoints)
  cfg.train.log_every = max(1, min(cfg.train.log_every, sp.steps // 10))
  if sp.cooldown:
    cfg.train.schedule, cfg.train.decay_fraction = 'wsd', sp.cooldown
  return cfg


RUN_IDENTITY = 'run_config.json'   # a run's full resolved config, written before it trains


def check_run_identity(workdir: str, name: str, cfg) -> None:
  """A run folder belongs to the run whose full resolved config it was trained with: if the
  sweep's plan now resolves that run to a different config (another lr, batch, schedule, data
  ...), its losses are not this plan's, and the sweep refuses rather than mixing them in."""
  rdir = os.path.join(workdir, 'runs', name)
  for fname in (RUN_IDENTITY, 'config.json'):   # config.json: what the trainer itself wrote
    path = os.path.join(rdir, fname)
    if os.path.exists(path):
      break
  else:
    return
  with open(path) as f:
    old = json.load(f)
  new = json.loads(cfg.to_json())
  diff = loop.config_changes(old, new)
  if diff:
    shown = ', '.join(f'{k} {x!r} -> {y!r}' for k, x, y in diff[:4])
    more = f' and {len(diff) - 4} more' if len(diff) > 4 else ''
    raise UserError(f'{workdir} already holds run {name} trained with a different config '
                    f'({shown}{more}); use a new sweep folder for the changed plan, or restore '
                    'the settings that trained it.')


def trained_steps(sp: RunSpec) -> int:
  """The steps a run itself trains: a WSD branch only its cooldown (the rest is its trunk's)."""
  return sp.steps - sp.branch_step if sp.trunk else sp.steps


def trained_flops(sp: RunSpec, base_cfg) -> float:
  """The FLOPs a run trains itself (App. F count; a WSD branch: its cooldown alone)."""
  return trained_steps(sp) * spec_batch(sp, base_cfg) * base_cfg.train.seq_len * sp.flops_per_token
