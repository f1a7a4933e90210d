"""Scaling sweeps: plan the runs (a model-size ladder; IsoFLOP budgets or an N x D grid), run them
in their own folders (one after another, or sweep.parallel at once on separate devices or CPU
cores), keep results.csv current, then fit and plot.

Rules (documented in the README, set in the sweep config):
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
  seeds:   every run with sweep.seeds seeds; the smallest IsoFLOP budget (the
           sweep.seeds_smallest_budgets smallest, default 1) with sweep.seeds_smallest (if more), so
           that run-to-run noise is measured (fit.seed_noise) and carried into the Approach 3
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
A run is finished when its summary.json exists; re-running skips it. A run's identity is its full
resolved config (runs/NAME/run_config.json): a sweep folder whose runs were trained under another
plan (lr, batch, schedule, data, ...) is refused before anything trains, naming the changed keys. An interrupted run resumes
from its checkpoint; a failed run is retried up to sweep.max_attempts times, each failure
recorded in DIR/failures.jsonl. results.csv is rewritten atomically after every run.
"""
import copy
import csv
import dataclasses
import json
import math
import os
import re
import time
import traceback

import numpy as np

from lm.model import flops as flops_lib
from lm import host
from lm.config import ModelConfig
from lm.errors import UserError
from lm.metrics import read_jsonl, write_json_atomic

RESULT_COLUMNS = ('run', 'budget', 'params', 'params_nonembed', 'tokens', 'flops', 'flops_6nd',
                  'flops_6nd_nonembed', 'final_loss', 'eval_loss', 'loss', 'n_layers', 'd_model', 'n_heads', 'd_ff',
                  'steps', 'batch_size', 'seq_len', 'lr', 'seed', 'wall_s')


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
  little within such a band: Kaplan et al. 2020, Fig. 5); ties go to the shape nearest `aspect`."""
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


def validate(s) -> None:
  """Every sweep key checked before anything is planned or written: one sentence per problem."""
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


def plan(sweep_cfg, base_cfg, vocab: int) -> list[RunSpec]:
  """The list of runs a sweep config describes (pure: same config, same plan)."""
  s = sweep_cfg
  validate(s)
  t = base_cfg.train
  specs = []
  cache = {}

  def shape(target_n):
    key = round(target_n)
    if key not in cache:
      cache[key] = shape_for(target_n, base_cfg.model, vocab, s.head_dim, s.aspect,
                             min_layers=int(s.get('min_layers', 1)),
                             band=float(s.get('aspect_band', 4.0)))
    return cache[key]

  def spec(target_n, budget, tokens, seed):
    L, d, n = shape(target_n)
    mc = _model_cfg(base_cfg.model, vocab, L, d, s.head_dim)
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

  def optimum(C):
    """N* with D* = tokens_per_param N* and C = FLOPs-per-token(N*) D*: the same (App. F)
    count that spends the budget, per token of the shape nearest N* (a few fixed-point steps
    from the 6 N D guess; the count per parameter varies slowly with N)."""
    n = math.sqrt(C / (6.0 * s.tokens_per_param))
    for _ in range(4):
      L, d, n_shape = shape(n)
      mc = _model_cfg(base_cfg.model, vocab, L, d, s.head_dim)
      k = flops_lib.flops_per_token(mc, t.seq_len, n_shape)['chinchilla'] / n_shape
      n = math.sqrt(C / (k * s.tokens_per_param))
    return n

  extra = int(s.get('seeds_smallest', 0))   # the smallest budgets repeated with more seeds
  if s.mode in ISOFLOP_MODES:
    smallest = sorted(s.budgets)[:int(s.get('seeds_smallest_budgets', 1))]
  if s.mode == 'isoflop_wsd':
    # One ladder of sizes for every budget, so that a size recurs across budgets and its runs
    # can share a trunk: n0 · step^j, with n0 the smallest budget's predicted optimum and the
    # step that puts sizes_per_budget rungs from N*/span to N*·span.
    n0 = optimum(min(s.budgets))
    step = s.span ** (2.0 / (s.sizes_per_budget - 1)) if s.sizes_per_budget > 1 else 1.0
    # With sweep.aspect_band = 1 every shape has d_model = aspect · n_layers, and those shapes
    # are the rungs: each budget takes all of them from N*/span to N*·span.
    one_aspect = float(s.get('aspect_band', 4.0)) == 1.0
    if one_aspect:
      rungs = one_aspect_sizes(base_cfg.model, vocab, s.head_dim, s.aspect,
                               int(s.get('min_layers', 1)))
  for seed in range(max(s.seeds, extra if s.mode in ISOFLOP_MODES else 0)):
    if s.mode == 'isoflop':
      for C in (s.budgets if seed < s.seeds else [C for C in s.budgets if C in smallest]):
        n_star = optimum(C)
        for f in np.geomspace(1 / s.span, s.span, s.sizes_per_budget):
          specs.append(spec(n_star * f, C, None, seed))
    elif s.mode == 'isoflop_wsd':
      runs = {}
      for C in (s.budgets if seed < s.seeds else [C for C in s.budgets if C in smallest]):
        n_star = optimum(C)
        for n in ([r for r in rungs if n_star / s.span <= r <= n_star * s.span] if one_aspect
                  else ladder(n_star, n0, step, s.span)):
          sp = spec(n, C, None, seed)
          runs.setdefault(sp.name, sp)
      specs.extend(_isoflop_families(list(runs.values()), float(s.get('cooldown', 0.2))))
    elif s.mode == 'grid':
      for n in s.grid_params:
        for d_tokens in s.grid_tokens:
          specs.append(spec(n, None, d_tokens, seed))
    elif s.mode == 'wsd':
      for n in s.grid_params:
        specs.extend(_wsd_family([spec(n, None, d, seed) for d in sorted(s.grid_tokens)],
                                 float(s.get('cooldown', 0.2))))
  unique = {}
  for sp in specs:   # two targets can round to the same shape: run it once
    unique.setdefault(sp.name, sp)
  return _only(list(unique.values()), s.get('only', ''))


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


def auto_parallel(n_jobs: int) -> int:
  """sweep.parallel = 0: one run per CPU core on a CPU (small models use several cores poorly,
  benchmarks/parallel_runs.py), one per GPU on GPUs, one at a time on TPUs."""
  from lm.scaling import parallel as parallel_lib
  platform, count = parallel_lib.probe_devices()
  if platform == 'cpu':
    return max(1, min(host.host_cores(), n_jobs))
  return max(1, min(count, n_jobs)) if platform in ('gpu', 'cuda', 'rocm') else 1


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


def run_config(base_cfg, sp: RunSpec, evals: int = 4, checkpoints: int = 4, rows: int = 0):
  """The full config of one run. Its evaluations read `rows` validation windows (0: the base
  config's eval_batches x batch_size) in rows / batch batches: the same windows whatever the
  run's batch."""
  cfg = copy.deepcopy(base_cfg)
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


def _result_row(sp: RunSpec, cfg, summary: dict) -> dict:
  return {'run': sp.name, 'budget': sp.budget or '', 'params': summary['params'],
          'params_nonembed': summary['params_nonembed'], 'tokens': summary['tokens'],
          'flops': summary['flops'], 'flops_6nd': summary['flops_6nd'],
          'flops_6nd_nonembed': 6.0 * summary['params_nonembed'] * summary['tokens'],
          'final_loss': summary['final_loss'], 'eval_loss': summary['eval_loss'],
          'loss': summary['eval_loss'], 'n_layers': sp.n_layers, 'd_model': sp.d_model,
          'n_heads': sp.n_heads, 'd_ff': summary.get('d_ff', ''), 'steps': sp.steps,
          'batch_size': cfg.train.batch_size, 'seq_len': cfg.train.seq_len, 'lr': sp.lr,
          'seed': sp.seed, 'wall_s': summary.get('wall_s', '')}


def write_results(path: str, rows: list[dict]) -> None:
  """results.csv through a temporary file and a rename: a reader never sees half a row."""
  tmp = f'{path}.tmp{os.getpid()}'
  with open(tmp, 'w', newline='') as f:
    w = csv.DictWriter(f, fieldnames=RESULT_COLUMNS)
    w.writeheader()
    for r in rows:
      w.writerow({k: r.get(k, '') for k in RESULT_COLUMNS})
    f.flush()
    os.fsync(f.fileno())
  os.replace(tmp, path)


def _curves(workdir: str, runs: list[tuple[str, int]]) -> dict:
  """Per-run training curves (flops, tokens, loss) from metrics.jsonl, for Approach 1."""
  out = {}
  for name, params in runs:
    rows = read_jsonl(os.path.join(workdir, 'runs', name, 'metrics.jsonl'))
    rows = [r for r in rows if isinstance(r.get('loss_avg'), float)]
    out[name] = {'params': params, 'curve_flops': [r['flops'] for r in rows],
                 'curve_tokens': [r['tokens'] for r in rows],
                 'curve_loss': [r['loss_avg'] for r in rows]}
  return out


def wsd_curves(finished: list[tuple[RunSpec, dict]]) -> dict:
  """Per model size, the curve through its WSD branches' final losses (flops, tokens, eval
  loss at the end of each cooldown): each point is what a run of that length reaches, unlike
  the middle of one long run, whose learning rate has not decayed there."""
  by_size = {}
  for sp, summary in finished:
    by_size.setdefault((sp.n_layers, sp.d_model, sp.seed), []).append(summary)
  out = {}
  for (L, d, seed), runs in sorted(by_size.items()):
    runs.sort(key=lambda r: r['tokens'])
    out[f'L{L}_d{d}_s{seed}'] = {'params': runs[0]['params'],
                                 'curve_flops': [r['flops'] for r in runs],
                                 'curve_tokens': [r['tokens'] for r in runs],
                                 'curve_loss': [r['eval_loss'] for r in runs]}
  return out


def usable_curves(curves: dict | None) -> dict | None:
  """The curves Approach 1 can use (two or more points each), or None when fewer than two
  remain: a WSD sweep of one budget has one point per size, and its fit goes without Approach 1
  rather than failing on it."""
  kept = {k: v for k, v in (curves or {}).items() if len(v.get('curve_flops') or []) >= 2}
  return kept if len(kept) >= 2 else None


def curves_beside(results_csv: str) -> dict | None:
  """The training curves of the runs in a sweep's results.csv, so that fitting a sweep's results
  mid-way still gets Approach 1: read from the sweep's run folders, else from a curves.json saved
  beside the CSV (a copied results folder); None when there are neither."""
  workdir = os.path.dirname(os.path.abspath(results_csv))
  wsd = False
  if os.path.exists(os.path.join(workdir, 'sweep.json')):
    with open(os.path.join(workdir, 'sweep.json')) as f:
      wsd = json.load(f).get('config', {}).get('sweep', {}).get('mode') in WSD_MODES
  if wsd or not os.path.isdir(os.path.join(workdir, 'runs')):   # WSD: the branches' finals
    saved = os.path.join(workdir, 'curves.json')
    if not os.path.exists(saved):
      return None
    from lm.scaling import fit as fit_lib   # scipy, which training workers do not need
    return usable_curves(fit_lib.read_curves(saved))
  with open(results_csv, newline='') as f:
    rows = [r for r in csv.DictReader(f) if r.get('run') and r.get('params')]
  return usable_curves(_curves(workdir, [(r['run'], int(float(r['params']))) for r in rows]))


RUN_IDENTITY = 'run_config.json'   # a run's full resolved config, written before it trains


def check_run_identity(workdir: str, name: str, cfg) -> None:
  """A run folder belongs to the run whose full resolved config it was trained with: if the
  sweep's plan now resolves that run to a different config (another lr, batch, schedule, data
  ...), its losses are not this plan's, and the sweep refuses rather than mixing them in."""
  from lm.training import loop
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


def _attempts(path: str) -> int:
  try:
    with open(path) as f:
      return json.load(f)['attempts']
  except (OSError, ValueError, KeyError):
    return 0


def _priority(specs: list[RunSpec], sp: RunSpec) -> tuple:
  """Run order: budget by budget (smallest first), and within a budget the sizes nearest its
  middle (the predicted optimum) first, then outwards, so that a sweep stopped part-way through
  a budget has already bracketed that budget's minimum. Grid sweeps keep the plan's order.
  Runs in parallel go longest first instead (run_sweep)."""
  if sp.budget is None:
    return (0, specs.index(sp))
  same = [x for x in specs if x.budget == sp.budget and x.seed == sp.seed]
  centre = (len(same) - 1) / 2
  budgets = sorted({x.budget for x in specs if x.budget is not None})
  return (sp.seed, budgets.index(sp.budget), abs(same.index(sp) - centre), same.index(sp))


def _trained_steps(sp: RunSpec) -> int:
  """The steps a run itself trains: a WSD branch only its cooldown (the rest is its trunk's)."""
  return sp.steps - sp.branch_step if sp.trunk else sp.steps


def trained_flops(sp: RunSpec, base_cfg) -> float:
  """The FLOPs a run trains itself (App. F count; a WSD branch: its cooldown alone)."""
  return _trained_steps(sp) * spec_batch(sp, base_cfg) * base_cfg.train.seq_len * sp.flops_per_token


def branch_from_trunk(sp: RunSpec, rdir: str, trunk: RunSpec, trunk_cfg, workdir: str,
                      train_fn) -> bool:
  """Starts WSD branch `sp` from its trunk's checkpoint at sp.branch_step: the trunk is trained
  up to that step if it is not there yet (and stops with a checkpoint), then the checkpoint and
  the trunk's metrics rows up to it are copied into the branch, which resumes from them as from
  its own. A branch that already has a checkpoint just resumes. False when the trunk was stopped
  (SIGTERM) before it got there: nothing is copied, and a rerun carries on."""
  import shutil
  mine = os.path.join(rdir, 'checkpoints')
  if os.path.isdir(mine) and any(d.isdigit() for d in os.listdir(mine)):
    return True
  tdir = os.path.join(workdir, 'runs', trunk.name)
  step = sp.branch_step
  at = os.path.join(tdir, 'checkpoints', str(step))
  if not os.path.isdir(at):
    tckpt = os.path.join(tdir, 'checkpoints')
    done = sorted(int(d) for d in os.listdir(tckpt) if d.isdigit()) if os.path.isdir(tckpt) else []
    if done and done[-1] > step:
      raise UserError(f'trunk {trunk.name} is past step {step} without a checkpoint there, so '
                      f'branch {sp.name} cannot start from it; delete {tdir} to retrain the trunk.')
    os.makedirs(tdir, exist_ok=True)
    write_json_atomic(os.path.join(tdir, RUN_IDENTITY), json.loads(trunk_cfg.to_json()))
    print(f'    trunk {trunk.name}: training to step {step} for branch {sp.name}', flush=True)
    train_fn(trunk_cfg, tdir, stop_at=step)
    if not os.path.isdir(at):
      return False
  os.makedirs(mine, exist_ok=True)
  shutil.copytree(at, os.path.join(mine, str(step)))
  rows = [r for r in read_jsonl(os.path.join(tdir, 'metrics.jsonl')) if r.get('step', 0) <= step]
  tmp = os.path.join(rdir, 'metrics.jsonl.tmp')
  with open(tmp, 'w') as f:
    for r in rows:
      f.write(json.dumps(r) + '\n')
  os.replace(tmp, os.path.join(rdir, 'metrics.jsonl'))
  return True


BRANCH = 'branch.json'   # a WSD branch's trunk, for a worker process (lm.worker)


def write_branch(rdir: str, sp: RunSpec, trunk: RunSpec, trunk_cfg, workdir: str) -> None:
  write_json_atomic(os.path.join(rdir, BRANCH), {
      'spec': dataclasses.asdict(sp), 'trunk': dataclasses.asdict(trunk),
      'trunk_config': json.loads(trunk_cfg.to_json()), 'workdir': os.path.abspath(workdir)})


def branch_in_worker(rdir: str, train_fn) -> bool:
  """A worker's side of branch_from_trunk, from the branch.json the sweep wrote (True if
  there is none: not a branch)."""
  path = os.path.join(rdir, BRANCH)
  if not os.path.exists(path):
    return True
  import ml_collections
  with open(path) as f:
    b = json.load(f)
  return branch_from_trunk(RunSpec(**b['spec']), rdir, RunSpec(**b['trunk']),
                           ml_collections.ConfigDict(b['trunk_config']), b['workdir'], train_fn)


def family(sp: RunSpec) -> str:
  """The trunk a run belongs to (its own name if it is none's branch): one family's runs
  train one at a time, shortest first, since each branch needs the trunk at its step."""
  return sp.trunk or sp.name


def progress_line(done_runs: int, runs: int, done_flops: float, total_flops: float,
                  session_flops: float, session_s: float) -> str:
  """'sweep: 4/10 runs, 1.1e13 of 2.6e13 FLOPs (42%), 3.2e10 FLOP/s, eta 8 min': the FLOP
  rate is this invocation's (runs finished earlier are not counted as fast work)."""
  rate = session_flops / session_s if session_s > 0 and session_flops > 0 else 0.0
  left = max(total_flops - done_flops, 0.0)
  eta = f'eta {left / rate / 60:.0f} min' if rate else 'eta unknown'
  return (f'sweep: {done_runs}/{runs} runs, {done_flops:.2g} of {total_flops:.2g} FLOPs '
          f'({done_flops / total_flops:.0%}), {rate:.2g} FLOP/s, {eta}')


def train_and_record(train_fn, cfg, rdir: str) -> dict:
  """Trains one run (in this process) and, when it finished, stores its wall time in summary.json."""
  t0 = time.time()
  summary = train_fn(cfg, rdir)
  if summary.get('finished'):
    summary['wall_s'] = time.time() - t0
    write_json_atomic(os.path.join(rdir, 'summary.json'), summary)
  return summary


def record_failure(workdir: str, name: str, attempt: int, error: str, tb: str = '') -> None:
  with open(os.path.join(workdir, 'failures.jsonl'), 'a') as f:
    f.write(json.dumps({'run': name, 'attempt': attempt, 'time': time.time(), 'error': error,
                        'traceback': tb}) + '\n')


@dataclasses.dataclass
class Job:
  """One run the sweep still has to train."""
  index: int
  spec: RunSpec
  cfg: object
  rdir: str
  attempt: int   # this try's number, 1-based


def run_sweep(sweep_file_cfg, workdir: str, train_fn=None, fit: bool = True) -> dict:
  """Runs every planned run not yet finished, then fits and plots. Returns a short summary.

  sweep.parallel > 1 trains that many runs at once, each in its own process on its own share of
  the devices (lm.scaling.parallel); otherwise runs go one after another in this process."""
  from lm.data import tokens as data_lib
  from lm.stages import pretrain as train_lib
  s, base_cfg = sweep_file_cfg.sweep, sweep_file_cfg.base
  validate(s)   # before the corpus is prepared or anything is written
  parallel = s.get('parallel', 1)
  auto = parallel == 0
  pack = int(s.get('pack', 1))
  if auto and (train_fn is not None or pack > 1):
    parallel, auto = 1, False
  if pack > 1 and train_fn is not None:
    raise ValueError('train_fn applies to unpacked runs only (sweep.pack=1).')
  if parallel > 1 and train_fn is not None:
    raise ValueError('train_fn applies to in-process runs only (sweep.parallel=1).')
  train_fn = train_fn or train_lib.train
  if base_cfg.train.get('init_from'):
    raise UserError('base.train.init_from would start every run of the sweep from the same '
                    'weights; a sweep trains each size from scratch, so leave it empty.')
  dataset = data_lib.prepare(data_lib.DataConfig.from_config(base_cfg.data))
  vocab = dataset.tokenizer.vocab_size
  specs = plan(s, base_cfg, vocab)
  check_eval_rows(s, base_cfg, specs)
  rows = eval_rows(s, base_cfg)
  cfgs = [run_config(base_cfg, sp, s.evals_per_run, s.checkpoints_per_run, rows) for sp in specs]
  # Before anything is written or trained: no run may hold another plan's work (the folder's
  # sweep.json still describes the plan that trained it).
  for sp, cfg in zip(specs, cfgs):
    check_run_identity(workdir, sp.name, cfg)
  os.makedirs(os.path.join(workdir, 'runs'), exist_ok=True)
  total_flops = sum(trained_flops(sp, base_cfg) for sp in specs)
  write_json_atomic(os.path.join(workdir, 'sweep.json'), {
      'config': json.loads(sweep_file_cfg.to_json()), 'planned_flops': total_flops,
      'runs': [dataclasses.asdict(sp) for sp in specs]})
  print(f'sweep: {len(specs)} runs, {total_flops:.3g} FLOPs planned (Chinchilla App. F count); '
        f'outputs in {workdir}', flush=True)

  finished, failed, jobs = {}, [], []
  results_path = os.path.join(workdir, 'results.csv')
  t_sweep = time.time()
  n = len(specs)
  for i, (sp, cfg) in enumerate(zip(specs, cfgs)):
    rdir = os.path.join(workdir, 'runs', sp.name)
    summary_path = os.path.join(rdir, 'summary.json')
    if os.path.exists(summary_path):
      with open(summary_path) as f:
        finished[sp.name] = (sp, cfg, json.load(f))
      print(f'[{i + 1}/{n}] {sp.name}: finished earlier, skipped', flush=True)
      continue
    attempts_path = os.path.join(rdir, 'attempts.json')
    attempts = _attempts(attempts_path)
    if attempts >= s.max_attempts:
      print(f'[{i + 1}/{n}] {sp.name}: failed {attempts} times, not retried '
            f'(see failures.jsonl; delete {attempts_path} to try again)', flush=True)
      failed.append(sp.name)
      continue
    jobs.append(Job(i, sp, cfg, rdir, attempts + 1))
  jobs.sort(key=lambda j: _priority(specs, j.spec))

  def start(job: Job, where: str = '') -> None:
    sp = job.spec
    print(f'[{job.index + 1}/{n}] {sp.name}: N={sp.params:,} steps={sp.steps} lr={sp.lr:.2g}'
          + (f' on {where}' if where else ''), flush=True)
    os.makedirs(job.rdir, exist_ok=True)
    write_json_atomic(os.path.join(job.rdir, RUN_IDENTITY), json.loads(job.cfg.to_json()))
    write_json_atomic(os.path.join(job.rdir, 'attempts.json'), {'attempts': job.attempt})
    if sp.trunk:   # for a worker process; the sweep's own process branches directly
      write_branch(job.rdir, sp, *by_name[sp.trunk], workdir)

  def done(job: Job, summary: dict | None, error: str | None = None, tb: str = '') -> None:
    """Books one run's outcome; results.csv is rewritten (atomically) after every success."""
    if summary is None:
      record_failure(workdir, job.spec.name, job.attempt, error, tb)
      print(f'    {job.spec.name} failed ({error}); recorded in failures.jsonl', flush=True)
      failed.append(job.spec.name)
      return
    print(f"    {job.spec.name} done in {summary.get('wall_s', 0):.0f} s: eval loss "
          f"{summary['eval_loss']:.4f}, {summary['flops']:.3g} FLOPs", flush=True)
    finished[job.spec.name] = (job.spec, job.cfg, summary)
    write_results(results_path, _rows(specs, finished))
    # The FLOPs this run trained itself (a WSD branch: its cooldown; the trunk's steps up to it
    # are counted when the trunk finishes).
    this_session['flops'] += trained_flops(job.spec, base_cfg)
    print('    ' + progress_line(len(finished), n, planned_flops(finished), total_flops,
                                 this_session['flops'], time.time() - t_sweep), flush=True)

  this_session = {'flops': 0.0}
  planned_flops = lambda fin: sum(trained_flops(sp, base_cfg) for sp, _, _ in fin.values())
  by_name = {sp.name: (sp, cfg) for sp, cfg in zip(specs, cfgs)}
  if auto and jobs:
    parallel = auto_parallel(len(jobs))
    print(f'sweep.parallel=0: {parallel} run(s) at once', flush=True)
  if parallel > 1:
    # Longest first (Graham's LPT rule): the last runs to start are the short ones, so no
    # long run is left training alone on one slot while the others sit idle at the end. A WSD
    # family counts as one job: its runs go shortest first, one at a time.
    cost = {}
    for j in jobs:
      cost[family(j.spec)] = cost.get(family(j.spec), 0.0) + trained_flops(j.spec, base_cfg)
    jobs.sort(key=lambda j: (-cost[family(j.spec)], family(j.spec), j.spec.steps))
    from lm.scaling import parallel as parallel_lib
    stopped = parallel_lib.run_jobs(
        jobs, parallel, start, done,
        ready=lambda job, running: all(family(r.spec) != family(job.spec) for r in running))
  else:
    stopped = False
    for group in packs(jobs, pack):
      if len(group) > 1:
        if not train_pack(group, workdir, start, done):
          stopped = True
          break
        continue
      job = group[0]
      start(job)
      try:
        if job.spec.trunk and not branch_from_trunk(job.spec, job.rdir, *by_name[job.spec.trunk],
                                                    workdir, train_fn):
          stopped = True
          break
        summary = train_and_record(train_fn, job.cfg, job.rdir)
      except KeyboardInterrupt:
        raise
      except Exception as e:  # recorded and retried on the next invocation
        done(job, None, f'{type(e).__name__}: {e}', traceback.format_exc(limit=5))
        continue
      if not summary.get('finished'):
        stopped = True
        break
      done(job, summary)
  if stopped:
    print('sweep stopped (SIGTERM); rerun the same command to resume.', flush=True)
    return {'stopped': True}
  write_results(results_path, _rows(specs, finished))
  finished = [finished[sp.name] for sp in specs if sp.name in finished]
  out = {'finished': len(finished), 'failed': failed, 'results': results_path,
         'wall_s': time.time() - t_sweep}
  if fit and len(finished) < 5:
    print(f'fit skipped: Approach 3 needs at least 5 finished runs, {len(finished)} are done.')
  elif fit:
    out['fit'] = fit_sweep(s, workdir, finished, dataset.entropy_rate)
  return out


def fit_sweep(s, workdir: str, finished: list, entropy_rate: float | None = None) -> dict:
  """The fit at the end of a sweep, on its results.csv and the finished runs' curves
  (finished: (spec, config, summary) per run): fit.json, the plots and report.md."""
  from lm.scaling import report as report_lib   # scipy and matplotlib: training workers skip them
  if s.mode in WSD_MODES:   # Approach 1 from the branches' finals: one honest point per length
    curves = wsd_curves([(a, c) for a, b, c in finished])
  else:
    curves = _curves(workdir, [(a.name, c['params']) for a, b, c in finished])
  write_json_atomic(os.path.join(workdir, 'curves.json'), curves)
  if usable_curves(curves) is None:
    print('Approach 1 skipped: it needs two or more runs with two or more points on their '
          'curves (a WSD sweep of one budget has one point per size).', flush=True)
  result = report_lib.run_fit(os.path.join(workdir, 'results.csv'), workdir, loss_key='eval_loss',
                              bootstrap=s.bootstrap, curves=usable_curves(curves))
  if entropy_rate is not None:
    _append_truth(workdir, result, entropy_rate)
  return result


def packs(jobs: list[Job], size: int) -> list[list[Job]]:
  """The jobs in groups of up to `size` that can train as one packed program (their configs
  differ only in seed and lr: lm/scaling/packed.py), in the order of each group's first job.
  size 1 (the default): every job alone."""
  if size <= 1:
    return [[j] for j in jobs]
  from lm.training import loop
  from lm.scaling import packed as packed_lib
  groups = {}
  for j in jobs:
    flat = loop.flatten(json.loads(j.cfg.to_json()))
    key = json.dumps({k: v for k, v in flat.items() if k not in packed_lib.PACKABLE},
                     sort_keys=True)
    groups.setdefault(key, []).append(j)
  out = []
  for group in groups.values():
    out += [group[i:i + size] for i in range(0, len(group), size)]
  first = {id(j): i for i, j in enumerate(jobs)}
  return sorted(out, key=lambda g: first[id(g[0])])


def train_pack(group: list[Job], workdir: str, start, done) -> bool:
  """Trains one pack (lm/scaling/packed.py) and books each member like a lone run (wall_s:
  the pack's). False when it was stopped (SIGTERM) before the end."""
  import hashlib
  from lm.scaling import packed as packed_lib
  for job in group:
    start(job)
  names = '+'.join(j.spec.name for j in group)
  pack_dir = os.path.join(workdir, 'packs', hashlib.sha1(names.encode()).hexdigest()[:12])
  print(f'    packed: {names} in one program', flush=True)
  t0 = time.time()
  try:
    summaries = packed_lib.train_packed([j.cfg for j in group], [j.rdir for j in group],
                                        pack_dir)
  except KeyboardInterrupt:
    raise
  except Exception as e:  # every member failed with it; retried on the next invocation
    for job in group:
      done(job, None, f'{type(e).__name__}: {e}', traceback.format_exc(limit=5))
    return True
  if not all(x.get('finished') for x in summaries):
    return False
  wall = time.time() - t0
  for job, summary in zip(group, summaries):
    summary['wall_s'] = wall
    write_json_atomic(os.path.join(job.rdir, 'summary.json'), summary)
    done(job, summary)
  return True


def _rows(specs: list[RunSpec], finished: dict) -> list[dict]:
  """results.csv rows in plan order (runs that finish out of order still sort the same)."""
  return [_result_row(*finished[sp.name]) for sp in specs if sp.name in finished]


def _append_truth(workdir: str, fit: dict, entropy_rate: float) -> None:
  """On the synthetic corpus the irreducible loss is known: compare the fitted E with it."""
  a3 = fit['approach3']
  ci = (a3.get('ci') or {}).get('E')
  inside = ci is not None and ci[0] <= entropy_rate <= ci[1]
  text = (f'\n## Irreducible loss against the truth\n\nThe synthetic source has entropy rate '
          f'{entropy_rate:.4f} nats/token. Fitted E = {a3["E"]:.4f}'
          + (f' (95% interval {ci[0]:.4f} to {ci[1]:.4f}), which '
             + ('contains' if inside else 'misses') + ' the truth' if ci else '')
          + f'; difference {a3["E"] - entropy_rate:+.4f} nats/token.\n')
  best = min(r['loss_min'] for r in fit['approach2']['budgets']) if fit['approach2']['budgets'] \
      else None
  if not inside or (ci and ci[1] - ci[0] > 0.5 * entropy_rate):
    text += ('The runs stay far above the source\'s entropy'
             + (f' (the best IsoFLOP minimum is {best:.3f})' if best is not None else '')
             + ', so E is barely constrained: it absorbs curvature that the two power-law terms '
             'cannot express, and an interval this wide is no test of the truth. Larger budgets '
             '(runs that approach the floor) are what pin E down.\n')
  with open(os.path.join(workdir, 'report.md'), 'a') as f:
    f.write(text)
  fit_path = os.path.join(workdir, 'fit.json')
  with open(fit_path) as f:
    stored = json.load(f)
  stored['truth'] = {'entropy_rate': entropy_rate, 'E_minus_truth': a3['E'] - entropy_rate,
                     'inside_ci': inside}
  write_json_atomic(fit_path, stored)
