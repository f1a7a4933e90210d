"""A sweep sized to the hardware it finds: `run.py sweep --config=... --minutes=M`.

Instead of the config's FLOP budgets, the sweep measures what this machine trains per second on
the sweep's own shapes, and chooses the budgets (and the seeds of the smallest one) so that the
whole command is predicted to end within M minutes.

Measurement (`measure_in_subprocess`): a throwaway process (`python -m lm.scaling.budget REQUEST
OUT`, on the share of the machine one run of the sweep gets: lm.scaling.parallel.device_slots),
so that the sweep process never claims the accelerators its workers need. For each shape it
builds the run's real training step (lm.stages.pretrain.build with the run's own config: batch,
micro-batches, optimizer, sharding, data), times the compilation of its initialisation, step and
evaluation, 1.5 s of steady steps fed and read as the training loop does (the next batch from
the corpus, the previous step's loss read back) in three windows of which the fastest counts (a
moment of interference on a shared machine is not the device's rate), one evaluation and one checkpoint save
(`Measurer`). Shapes are measured one at a time, as the plan needs them: the middle size of the
cheapest admissible budget first, then whichever of the planned largest budget's largest and
smallest runs, the plan's smallest run and the largest budget's middle run no measured shape
covers (within a factor 1.5 in N), re-planning after each, until none is left or MEASURE_LIMIT_S
has passed (2-3 shapes, about 30 s with the start of the process, on 2 CPU cores).

Time model (`TimeModel`): a run takes
    FIXED_S [+ a worker process's start (the measuring process's own), when runs go to workers]
    + compile(N) + evaluations x eval(N) + checkpoints x save(N)
    + trained FLOPs (plan.trained_flops, Chinchilla App. F) / FLOP/s(N),
with FLOP/s interpolated in log N between the measured shapes (log-linear, flat beyond them:
small models use a device poorly, so the rate depends on size). The sweep takes the time already
spent (start-up, data, the measurement) + the runs spread over the slots that run at once
(sweep.parallel; 0: lm.scaling.runner.auto_parallel), a longest-first (LPT) makespan with each WSD
family on one slot, + the fit at the end (FIT_S).

Choice (`choose`): budgets on the grid 1, 1.8, 3.2, 5.6 x 10^k (10^(j/4) to two digits), so noise
in the measured rate moves a budget by a whole grid step or not at all. The smallest admissible
budget (the floor) is the smallest grid value whose runs all have at least sweep.min_steps steps
(MIN_STEPS when the config sets none) and whose IsoFLOP profile has at least 3 distinct sizes.
In order of preference:
  1. three budgets (where time allows; else two, at most a factor 3.2 apart);
  2. the widest span largest/smallest, up to SPAN_CAP_STEPS grid steps (10^1.5 = a factor 32,
     what the project's CPU sweeps needed to pin the exponent: docs/results/exponent_cpu);
     below the cap the smallest budget is the floor;
  3. at that span, the largest budgets (larger, less noisy models);
  4. the smallest budget with 2 seeds (the fit then measures seed noise), then a fourth budget
     (at span 32: budgets a factor 3.2 apart);
and the predicted time of the choice is at most M minutes. More minutes never narrow the span (in
grid steps) nor lower the largest budget.

DIR/minutes_plan.json records the plan, the measurements and the prediction; rerunning the same
command on the same folder reuses it without measuring again (the sweep's runs are then the same
runs: plan.check_run_identity), and another M, or another sweep config, on that folder is refused.
"""
import copy
import dataclasses
import json
import math
import os
import subprocess
import sys
import tempfile
import time

import ml_collections

from lm import host
from lm import lock as lock_lib
from lm.data import tokens as data_lib
from lm.errors import UserError
from lm.metrics import read_json_object, write_json_atomic
from lm.scaling import parallel as parallel_lib
from lm.scaling import plan as plan_lib

PLAN_FILE = 'minutes_plan.json'
MANTISSAS = (1.0, 1.8, 3.2, 5.6)   # the budget grid: 10^(j/4) to two digits
SPAN_CAP_STEPS = 6                 # 6 grid steps: a factor 10^1.5 (32 on the grid)
MIN_STEPS = 300                    # a run's steps at least, where sweep.min_steps is not set
MIN_SIZES = 3                      # distinct sizes per budget at least (an IsoFLOP parabola)
FIT_S = 20.0                       # the fit, plots and report (measured 11-18 s on 2 cores)
MEASURE_LIMIT_S = 20.0             # the measurement starts no new shape after this long
FIXED_S = 2.0                      # a run's cost beyond its steps, compiling, evaluations and
                                   # saves (its folder, manifest, data, files; measured 1.2 s
                                   # with a real 8-step run on 2 loaded cores)
NEAR = 1.5                         # a shape within this factor in N of a measured one is covered
MAX_GRID_INDEX = 4 * 30            # 1e30 FLOPs: no plan goes beyond
_IMPORTED_AT = time.time()


def grid_value(j: int) -> float:
  """The j-th budget of the grid: MANTISSAS[j % 4] x 10^(j // 4), read from its decimal text so
  that run names stay short (1.8e12, not 1.8000000000000003e12)."""
  return float(f'{MANTISSAS[j % 4]}e{j // 4}')


def _exact_grid_values(js) -> tuple:
  return tuple(grid_value(j) for j in js)


# ---------------------------------------------------------------------------------------------
# The time model


@dataclasses.dataclass
class TimeModel:
  """Predicted wall times of a sweep's runs from the measured shapes (see the module doc).

  points: one dict per measured shape with params, flops_per_s, compile_s, eval_s and
  checkpoint_s; fixed_s: what else a run costs (its folder, data, files); process_s: a worker
  process's start (added per run when the runs go to worker processes); slots: runs at once."""
  points: list
  fixed_s: float
  process_s: float = 0.0
  slots: int = 1
  workers: bool = False
  fit_s: float = FIT_S

  def __post_init__(self):
    if not self.points:
      raise ValueError('TimeModel needs at least one measured shape.')
    self.points = sorted(self.points, key=lambda p: p['params'])

  def _interp(self, key: str, n: float, log_value: bool = False) -> float:
    xs = [math.log(p['params']) for p in self.points]
    ys = [math.log(p[key]) if log_value else float(p[key]) for p in self.points]
    x = math.log(n)
    if x <= xs[0]:
      y = ys[0]
    elif x >= xs[-1]:
      y = ys[-1]
    else:
      k = next(i for i in range(1, len(xs)) if x <= xs[i])
      w = (x - xs[k - 1]) / (xs[k] - xs[k - 1]) if xs[k] > xs[k - 1] else 1.0
      y = ys[k - 1] + w * (ys[k] - ys[k - 1])
    return math.exp(y) if log_value else max(0.0, y)

  def flops_per_s(self, n: float) -> float:
    return self._interp('flops_per_s', n, log_value=True)

  def run_s(self, sp: plan_lib.RunSpec, s, base_cfg) -> float:
    """One run's predicted wall time (a WSD branch: its own part, from its branch step)."""
    n = sp.params
    start = sp.branch_step if sp.trunk else 0
    evals = _events(sp.steps, start, max(1, sp.steps // int(s.evals_per_run)))
    saves = _events(sp.steps, start, max(1, sp.steps // int(s.checkpoints_per_run)))
    fixed = (self.fixed_s + (self.process_s if self.workers else 0.0)
             + self._interp('compile_s', n) + evals * self._interp('eval_s', n)
             + saves * self._interp('checkpoint_s', n))
    return fixed + plan_lib.trained_flops(sp, base_cfg) / self.flops_per_s(n)

  def sweep_s(self, specs: list, s, base_cfg) -> dict:
    """{'runs_s': the runs' makespan on self.slots slots, 'serial_s': their sum, 'fit_s'}."""
    times = {}
    for sp in specs:   # a WSD family trains on one slot, one run after another
      fam = sp.trunk or sp.name
      times[fam] = times.get(fam, 0.0) + self.run_s(sp, s, base_cfg)
    return {'runs_s': makespan(list(times.values()), self.slots),
            'serial_s': sum(times.values()), 'fit_s': self.fit_s}


def _events(steps: int, start: int, every: int) -> int:
  """Evaluations (or saves) a run makes after step `start`: every `every` steps and the last."""
  return steps // every - start // every + (1 if steps % every else 0)


def makespan(durations: list, slots: int) -> float:
  """Longest-first (Graham's LPT) list scheduling on `slots` identical slots: the time the last
  one ends (lm.scaling.runner.run_parallel starts runs longest first)."""
  loads = [0.0] * max(1, slots)
  for d in sorted(durations, reverse=True):
    k = loads.index(min(loads))
    loads[k] += d
  return max(loads)


# ---------------------------------------------------------------------------------------------
# Planning


def check_sweep(s) -> None:
  """The sweeps --minutes can size, each other case refused in one sentence."""
  plan_lib.validate(s)
  if s.mode not in plan_lib.ISOFLOP_MODES:
    raise UserError(f'--minutes chooses FLOP budgets, and sweep.mode={s.mode} has none; use it '
                    'with sweep.mode isoflop or isoflop_wsd, or leave --minutes out.')
  if s.get('backend', 'local') != 'local':
    raise UserError(f"--minutes sizes a sweep to this machine's devices, and sweep.backend="
                    f"{s.get('backend')} trains on a cluster; leave --minutes out there.")
  if int(s.get('pack', 1)) > 1:
    raise UserError(f'--minutes times runs trained alone, and sweep.pack={s.pack} trains them '
                    'packed; set sweep.pack=1 or leave --minutes out.')
  if s.get('only', ''):
    raise UserError(f"--minutes plans a whole sweep, and sweep.only={s.get('only')!r} trains part "
                    'of one; leave one of them out.')


def check_minutes(minutes) -> float:
  if isinstance(minutes, bool) or not isinstance(minutes, (int, float)) or not (
      math.isfinite(minutes) and minutes > 0):
    raise UserError(f'--minutes={minutes} must be a positive number of minutes, e.g. '
                    '--minutes=10.')
  return float(minutes)


class _Candidates:
  """The plans of one sweep config for candidate budget sets, memoised."""

  def __init__(self, sweep_file_cfg, vocab: int):
    self.s = sweep_file_cfg.sweep
    self.base = sweep_file_cfg.base
    self.vocab = vocab
    self.base_seeds = int(self.s.get('seeds_smallest', 0))
    self.memo = {}

  def config(self, budgets: tuple, seeds_smallest: int):
    s = copy.deepcopy(self.s)
    with s.unlocked():
      s.budgets = tuple(budgets)
      if seeds_smallest:   # 0: the key as the config has it (absent, or not above sweep.seeds)
        s.seeds_smallest = int(seeds_smallest)
    return s

  def specs(self, budgets: tuple, seeds_smallest: int) -> list:
    key = (tuple(budgets), seeds_smallest)
    if key not in self.memo:
      self.memo[key] = plan_lib.plan(self.config(budgets, seeds_smallest), self.base, self.vocab)
    return self.memo[key]

  def admissible(self, j: int, min_steps: int) -> bool:
    """A budget whose runs all have min_steps steps or more, with MIN_SIZES distinct sizes."""
    specs = self.specs((grid_value(j),), 0)
    sizes = {(sp.n_layers, sp.d_model) for sp in specs}
    return len(sizes) >= min(MIN_SIZES, int(self.s.sizes_per_budget)) and min(
        sp.steps for sp in specs) >= min_steps

  def floor(self) -> int:
    min_steps = int(self.s.get('min_steps', 0)) or MIN_STEPS
    for j in range(4 * 6, MAX_GRID_INDEX):   # from 1e6 FLOPs up
      if self.admissible(j, min_steps):
        return j
    raise UserError('no FLOP budget up to 1e30 gives this sweep runs of '
                    f'{min_steps} steps with {MIN_SIZES} distinct sizes; lower sweep.min_steps.')


def budget_indices(i0: int, i1: int, k: int) -> tuple:
  """k grid indices from i0 to i1, as evenly spaced as the grid allows."""
  if k == 1:
    return (i0,)
  return tuple(sorted({round(i0 + (i1 - i0) * q / (k - 1)) for q in range(k)}))


class _Search:
  """choose()'s search over candidate plans for one time model."""

  def __init__(self, cands: _Candidates, model: TimeModel, limit_s: float, spent_s: float):
    self.c, self.model, self.limit_s, self.spent_s = cands, model, limit_s, spent_s
    self.s, self.base = cands.s, cands.base

  def cost(self, js: tuple, seeds: int) -> dict:
    specs = self.c.specs(_exact_grid_values(js), seeds)
    t = self.model.sweep_s(specs, self.s, self.base)
    t['spent_s'] = self.spent_s
    t['total_s'] = self.spent_s + t['runs_s'] + t['fit_s']
    t['specs'] = specs
    return t

  def fits(self, js: tuple, seeds: int) -> bool:
    return self.cost(js, seeds)['total_s'] <= self.limit_s

  def best(self, floor: int) -> dict | None:
    """The preferred plan that fits (module doc), or None when not even two budgets fit."""
    seeds0 = self.c.base_seeds
    # 1-2: three budgets, the widest span up to the cap (below it the smallest budget is the
    # floor: the cheapest way to a span); 3: at the cap, the largest budgets.
    k, d = 3, 0
    while d < SPAN_CAP_STEPS and floor + d + 1 < MAX_GRID_INDEX and self.fits(
        budget_indices(floor, floor + max(2, d + 1), 3), seeds0):
      d = max(2, d + 1)
    if d < 2:   # not three budgets: two, at most 2 grid steps apart (never wider than three)
      k = 2
      d = next((x for x in (2, 1) if self.fits((floor, floor + x), seeds0)), 0)
      if d == 0:
        return None
    i0 = floor
    if d == SPAN_CAP_STEPS:   # the window moved up as far as it fits (exponential search)
      i0 = _last_true(lambda i: i + d < MAX_GRID_INDEX and self.fits(
          budget_indices(i, i + d, k), seeds0), floor)
    js, seeds = budget_indices(i0, i0 + d, k), seeds0
    # 4: the smallest budget with two seeds, then one budget more (up to one per 2 grid steps).
    if seeds0 < 2 and int(self.s.seeds) < 2 and self.fits(js, 2):
      seeds = 2
    more = budget_indices(i0, i0 + d, k + 1)
    if k >= 3 and len(more) > len(js) and k + 1 <= 1 + d // 2 and self.fits(more, seeds):
      js = more
    return {'indices': js, 'seeds_smallest': seeds, **self.cost(js, seeds)}


def _last_true(ok, lo: int) -> int:
  """The largest i >= lo with ok(i), for ok true at lo and monotone (true, then false)."""
  step = 1
  while ok(lo + step):
    lo, step = lo + step, 2 * step
  hi = lo + step   # ok(lo) holds, ok(hi) does not
  while hi - lo > 1:
    mid = (lo + hi) // 2
    lo, hi = (mid, hi) if ok(mid) else (lo, mid)
  return lo


def choose(sweep_file_cfg, vocab: int, minutes: float, measure, slots: int = 1,
           workers: bool = False, spent_s: float = 0.0, clock=time.time,
           measure_limit_s: float = MEASURE_LIMIT_S) -> dict:
  """The plan for `minutes` (a dict: what minutes_plan.json holds besides the config).

  measure(spec) -> {'params', 'flops_per_s', 'compile_s', 'eval_s', 'checkpoint_s'[,
  'process_s']}: one shape measured; injectable (tests pass a mock, measure_in_subprocess's
  child a Measurer). spent_s: the seconds this command ran before choose() (clock() measures what
  it spends itself, measuring included). Shapes are measured one at a time, each the most
  important one the current plan has that no measured shape covers (_wanted), until none is left
  or measure_limit_s has passed."""
  t_start = clock()
  s = sweep_file_cfg.sweep
  check_sweep(s)
  minutes = check_minutes(minutes)
  limit_s = 60.0 * minutes
  cands = _Candidates(sweep_file_cfg, vocab)
  floor = cands.floor()
  probe = cands.specs((grid_value(floor),), 0)
  first = _spread(probe, 3)
  points = [measure(first[len(first) // 2])]   # the cheapest budget's middle size
  while True:
    model = TimeModel(points, FIXED_S, max(p.get('process_s', 0.0) for p in points), slots,
                      workers)
    search = _Search(cands, model, limit_s, spent_s + clock() - t_start)
    best = search.best(floor)
    want = _wanted(best['specs'] if best else probe, points)
    if not want or clock() - t_start > measure_limit_s:
      break
    points.append(measure(want))
  if best is None:
    cheapest = search.cost((floor, floor + 1), cands.base_seeds)
    raise UserError(
        f'--minutes={minutes:g} is too short for this sweep here: its cheapest plan (budgets '
        f'{_fmt_budgets([grid_value(floor), grid_value(floor + 1)])}, {len(cheapest["specs"])} '
        f'runs) is predicted to take {cheapest["total_s"] / 60:.1f} minutes at the measured '
        f'{_rates(points)} FLOP/s; give --minutes={math.ceil(cheapest["total_s"] / 60)} or '
        'more.')
  budgets = _exact_grid_values(best['indices'])
  specs = best['specs']
  return {
      'minutes': minutes, 'budgets': list(budgets), 'seeds_smallest': best['seeds_smallest'],
      'span': budgets[-1] / budgets[0], 'runs': len(specs),
      'trained_flops': sum(plan_lib.trained_flops(sp, sweep_file_cfg.base) for sp in specs),
      'floor_budget': grid_value(floor), 'slots': slots, 'workers': workers,
      'predicted_s': {k: best[k] for k in ('spent_s', 'runs_s', 'serial_s', 'fit_s', 'total_s')},
      'measured': [dict(p) for p in sorted(points, key=lambda p: p['params'])],
      'fixed_s': model.fixed_s, 'process_s': model.process_s,
      'uncovered': [sp.name for sp in _wanted(specs, points, every=True)],
      'run_predicted_s': {sp.name: round(model.run_s(sp, s, sweep_file_cfg.base), 1)
                          for sp in specs},
  }


def _rates(points) -> str:
  return ', '.join(f"{p['flops_per_s']:.2g} at N={p['params']:,}"
                   for p in sorted(points, key=lambda p: p['params']))


def _spread(specs: list, k: int) -> list:
  """Up to k specs of distinct sizes, smallest first: the smallest, (k = 3) the one nearest the
  geometric middle, and the largest."""
  by_n = {}
  for sp in sorted(specs, key=lambda x: (x.params, x.steps)):
    by_n.setdefault(sp.params, sp)
  sizes = sorted(by_n)
  picks = [sizes[0], sizes[-1]]
  if k >= 3 and len(sizes) > 2:
    mid = math.sqrt(sizes[0] * sizes[-1])
    picks.append(min(sizes[1:-1], key=lambda n: abs(math.log(n / mid))))
  return [by_n[n] for n in sorted(set(picks))]


def _covered(n: float, points: list) -> bool:
  return any(abs(math.log(n / p['params'])) <= math.log(NEAR) for p in points)


def _wanted(specs: list, points: list, every: bool = False):
  """The next shape to measure for a plan: the first not covered (within NEAR in N) of the
  largest budget's largest and smallest runs, the plan's smallest run, and the largest budget's
  middle one (where the time goes, then the ends). every=True: all the uncovered ones."""
  top = max(sp.budget for sp in specs)
  at_top = _spread([sp for sp in specs if sp.budget == top], 3)
  order = [at_top[-1], at_top[0], _spread(specs, 2)[0]] + at_top[1:-1]
  out = [sp for sp in order if not _covered(sp.params, points)]
  return out if every else (out[0] if out else None)


# ---------------------------------------------------------------------------------------------
# The measurement (in the throwaway process)


class Measurer:
  """Times the real training step of a run spec on this process's devices (the module doc)."""

  def __init__(self, sweep_file_cfg, vocab: int, process_s: float = 0.0, steady_s: float = 1.5,
               log=print):
    self.cfg = sweep_file_cfg
    self.vocab = vocab
    self.process_s = process_s
    self.steady_s = steady_s
    self.log = log

  def run_config(self, sp):
    s, base = self.cfg.sweep, self.cfg.base
    return plan_lib.run_config(base, sp, int(s.evals_per_run), int(s.checkpoints_per_run),
                               plan_lib.eval_rows(s, base), plan_lib.mup_base_width(s))

  def __call__(self, sp) -> dict:
    """One shape: its run's real step on the run's own batches, fed and read as the training
    loop does (the next batch fetched, the previous step's loss read back each step)."""
    import jax

    from lm.stages import pretrain as train_lib
    from lm.training import checkpoint as ckpt_lib
    run = train_lib.build(self.run_config(sp))
    tc = run.train
    t = time.perf_counter()
    state = run.init_state(jax.random.PRNGKey(0))   # compiles too, in every run
    jax.block_until_ready(state)
    init_s = time.perf_counter() - t
    batch = lambda i: train_lib.get_batch(run, 'train', i)
    t = time.perf_counter()
    state, m = run.train_step(state, batch(0))   # compiles
    float(m['loss'])
    first_s = time.perf_counter() - t
    # Three windows of steady_s / 3 each, the fastest kept: a moment of interference from
    # another process on a shared machine (which a whole run averages out) is not taken for
    # the device's rate.
    n, windows = 0, []
    for _ in range(3):
      k, t = 0, time.perf_counter()
      while True:
        state, new = run.train_step(state, batch(n + 1))
        float(m['loss'])   # the loop reads each step's metrics one step later
        m, n, k = new, n + 1, k + 1
        elapsed = time.perf_counter() - t
        if k >= 5 and elapsed >= self.steady_s / 3:
          break
      windows.append(elapsed / k)
    float(m['loss'])
    step_s = min(windows)
    t = time.perf_counter()
    train_lib.evaluate_loss(run, state['params'])   # compiles, reads the validation windows
    eval_first_s = time.perf_counter() - t
    t = time.perf_counter()
    train_lib.evaluate_loss(run, state['params'])
    eval_s = time.perf_counter() - t
    with tempfile.TemporaryDirectory(prefix='lm-minutes-') as tmp:
      ckpts = ckpt_lib.Checkpoints(os.path.join(tmp, 'checkpoints'), 1,
                                   async_save=tc.async_checkpoint)
      t = time.perf_counter()
      ckpts.save(1, state)
      ckpts.close()
      checkpoint_s = time.perf_counter() - t
    tokens = tc.batch_size * tc.seq_len
    point = {'params': sp.params, 'shape': f'L{sp.n_layers}_d{sp.d_model}',
             'batch_size': tc.batch_size, 'seq_len': tc.seq_len,
             'flops_per_s': tokens * sp.flops_per_token / step_s, 'step_s': step_s,
             'steps_timed': n,
             'compile_s': init_s + max(0.0, first_s - step_s) + max(0.0, eval_first_s - eval_s),
             'eval_s': eval_s, 'checkpoint_s': checkpoint_s, 'process_s': self.process_s}
    self.log(f"minutes: measured {point['shape']} (N={sp.params:,}, batch {tc.batch_size}): "
             f"{point['flops_per_s']:.3g} FLOP/s, compile {point['compile_s']:.1f} s, "
             f"eval {eval_s:.2f} s, save {checkpoint_s:.2f} s")
    return point


def _child(request_path: str, out_path: str) -> int:
  """python -m lm.scaling.budget REQUEST OUT: measure and choose, in a throwaway process."""
  cpus = os.environ.get('LM_WORKER_CPUS')
  if cpus and hasattr(os, 'sched_setaffinity'):   # one slot's cores, as lm.worker pins itself
    os.sched_setaffinity(0, {int(c) for c in cpus.split(',')})
  with open(request_path) as f:
    req = json.load(f)
  import jax

  from lm.stages import pretrain   # its import is part of a worker's start-up
  del pretrain
  jax.devices()
  process_s = _process_age()   # what a worker process takes to start, up to its first run
  cfg = ml_collections.ConfigDict(req['config'])
  measurer = Measurer(cfg, req['vocab'], process_s=process_s if req['workers'] else 0.0,
                      log=lambda text: print(text, flush=True))
  try:
    plan = choose(cfg, req['vocab'], req['minutes'], measurer, slots=req['slots'],
                  workers=req['workers'], spent_s=req['spent_s'] + _process_age(),
                  measure_limit_s=req.get('measure_limit_s', MEASURE_LIMIT_S))
  except UserError as e:
    write_json_atomic(out_path, {'error': str(e)})
    return 2
  dev = jax.devices()[0]
  plan['device'] = f'{len(jax.local_devices())} x {dev.device_kind}'
  if dev.platform == 'cpu':
    plan['device'] += f' ({host.host_cores()} cores)'
  plan['measure_s'] = _process_age()
  write_json_atomic(out_path, plan)
  return 0


def measure_in_subprocess(sweep_file_cfg, vocab: int, minutes: float, slots: int, workers: bool,
                          spent_s: float, env: dict | None = None,
                          measure_limit_s: float = MEASURE_LIMIT_S) -> dict:
  """choose() run in a throwaway process with the real measurement; its plan."""
  root = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
  with tempfile.TemporaryDirectory(prefix='lm-minutes-') as tmp:
    req, out = os.path.join(tmp, 'request.json'), os.path.join(tmp, 'plan.json')
    write_json_atomic(req, {'config': json.loads(sweep_file_cfg.to_json()), 'vocab': vocab,
                            'minutes': minutes, 'slots': slots, 'workers': workers,
                            'spent_s': spent_s, 'measure_limit_s': measure_limit_s})
    old = os.environ.get('PYTHONPATH')
    child_env = dict(os.environ, PYTHONPATH=root + (os.pathsep + old if old else ''),
                     **(env or {}))
    t = time.time()
    try:
      proc = subprocess.run([sys.executable, '-m', 'lm.scaling.budget', req, out], cwd=root,
                            env=child_env, stdout=None, stderr=subprocess.PIPE, text=True,
                            timeout=900)
    except subprocess.TimeoutExpired:
      raise UserError('measuring this machine for --minutes took more than 15 minutes; leave '
                      '--minutes out and give the sweep its budgets.') from None
    if os.path.exists(out):
      plan = read_json_object(out, 'rerun the command')
      if 'error' in plan:
        raise UserError(plan['error'])
      if proc.returncode == 0:
        plan['measure_wall_s'] = time.time() - t
        return plan
    last = [line for line in (proc.stderr or '').strip().splitlines() if line.strip()][-1:]
    raise UserError('measuring this machine for --minutes failed (the measuring process '
                    f'exited with status {proc.returncode}: {last[0] if last else "no message"}); '
                    'fix the JAX install or leave --minutes out.')


# ---------------------------------------------------------------------------------------------
# The sweep's side: reuse, refusals, the printed plan


def _process_age() -> float:
  """Seconds since this process started (without psutil: since this module was imported)."""
  try:
    import psutil
    return max(0.0, time.time() - psutil.Process().create_time())
  except Exception:  # no psutil, or no access to the process table
    return time.time() - _IMPORTED_AT


def slots_for(s) -> tuple[int, bool, dict]:
  """(runs at once, whether they go to worker processes, the environment of one slot's share)
  for the sweep as lm.scaling.sweep will run it."""
  parallel = int(s.get('parallel', 1))
  if parallel == 1:
    return 1, False, {}
  platform, count = parallel_lib.probe_devices()
  if parallel == 0:
    parallel = auto_slots(platform, count)
    if parallel == 1:   # then the sweep trains its runs in its own process
      return 1, False, {}
  slots = parallel_lib.device_slots(parallel, platform, count)
  return parallel, True, slots[0].env


def auto_slots(platform: str, count: int) -> int:
  """sweep.parallel = 0 as lm.scaling.runner.auto_parallel decides it for a long sweep: one run
  per CPU core on a CPU, one per GPU on GPUs, one at a time otherwise (tests check the two
  agree)."""
  if platform == 'cpu':
    return max(1, host.host_cores())
  return max(1, count) if platform in ('gpu', 'cuda', 'rocm') else 1


def _user_config(sweep_file_cfg) -> dict:
  return json.loads(sweep_file_cfg.to_json())


def sized_config(sweep_file_cfg, workdir: str, minutes: float, vocab: int | None = None,
                 measure=None, log=print, spent_s: float | None = None):
  """The sweep config with the budgets (and sweep.seeds_smallest) planned for `minutes`, the plan
  written to DIR/minutes_plan.json before anything trains, or read back from it (a rerun).
  measure: None measures in a throwaway process; a function (choose's `measure`) is called in
  this process instead (tests). vocab: None reads it from the prepared corpus. spent_s: the
  seconds this command has run (None: this process's age, measured before the measurement)."""
  minutes = check_minutes(minutes)
  check_sweep(sweep_file_cfg.sweep)
  with lock_lib.hold(workdir):   # one planner per folder, as one sweep per folder
    return _sized(sweep_file_cfg, workdir, minutes, vocab, measure, log, spent_s)


def _sized(sweep_file_cfg, workdir: str, minutes: float, vocab, measure, log, spent_s):
  path = os.path.join(workdir, PLAN_FILE)
  user = _user_config(sweep_file_cfg)
  if os.path.exists(path):
    plan = read_json_object(path, f'delete it to plan {workdir} again, or use a new --workdir')
    _check_same(plan, user, minutes, workdir)
    log(f"minutes: reusing the plan in {path} ({plan['minutes']:g} minutes on "
        f"{plan.get('device', 'this machine')}): budgets {_fmt_budgets(plan['budgets'])}, "
        f"{plan['runs']} runs")
    return apply(sweep_file_cfg, plan)
  if vocab is None:   # the corpus is prepared (or found in its cache) as the sweep will need it
    vocab = data_lib.prepare(data_lib.DataConfig.from_config(
        sweep_file_cfg.base.data)).tokenizer.vocab_size
  slots, workers, env = slots_for(sweep_file_cfg.sweep)
  log(f'minutes: measuring this machine on the sweep\'s own shapes to plan {_minutes(minutes)} '
      f'({slots} run{"s" if slots > 1 else ""} at once)')
  # this command so far: its start, the corpus, the device probe
  spent = _process_age() if spent_s is None else spent_s
  if measure is None:
    plan = measure_in_subprocess(sweep_file_cfg, vocab, minutes, slots, workers, spent, env)
  else:
    plan = choose(sweep_file_cfg, vocab, minutes, measure, slots=slots, workers=workers,
                  spent_s=spent)
    plan.setdefault('device', 'mocked')
  plan['config'] = user
  plan['created'] = time.time()
  os.makedirs(workdir, exist_ok=True)
  write_json_atomic(path, plan)
  for line in describe(plan):
    log(line)
  return apply(sweep_file_cfg, plan)


def apply(sweep_file_cfg, plan: dict):
  """A copy of the sweep config with the plan's budgets and seeds_smallest."""
  cfg = copy.deepcopy(sweep_file_cfg)
  with cfg.unlocked():
    cfg.sweep.budgets = tuple(float(b) for b in plan['budgets'])
    if plan['seeds_smallest']:
      cfg.sweep.seeds_smallest = int(plan['seeds_smallest'])
  return cfg


def _check_same(plan: dict, user: dict, minutes: float, workdir: str) -> None:
  if not isinstance(plan.get('minutes'), (int, float)) or not isinstance(
      plan.get('budgets'), list) or 'config' not in plan:
    raise UserError(f'{os.path.join(workdir, PLAN_FILE)} is not a plan of --minutes; delete it '
                    'to plan the folder again, or use a new --workdir.')
  if float(plan['minutes']) != minutes:
    raise UserError(f"{workdir} was planned for --minutes={plan['minutes']:g} (its {PLAN_FILE}), "
                    f'and its runs belong to that plan; rerun with --minutes={plan["minutes"]:g} '
                    f'to resume it, or use a new --workdir for {minutes:g} minutes.')
  from lm.training import loop
  diff = loop.config_changes(plan['config'], user, allowed=())
  if diff:
    shown = ', '.join(f'{k} {x!r} -> {y!r}' for k, x, y in diff[:3])
    raise UserError(f'{workdir} was planned from another sweep config ({shown}); use a new '
                    '--workdir for this one, or restore the settings it was planned with.')


def _minutes(m: float) -> str:
  return f'{m:g} minute' + ('' if m == 1 else 's')


def _fmt_budgets(budgets) -> str:
  return ', '.join(f'{b:.2g}'.replace('e+', 'e') for b in budgets)


def _compile_range(points) -> str:
  lo, hi = min(p['compile_s'] for p in points), max(p['compile_s'] for p in points)
  return f'{lo:.1f} s' if hi - lo < 0.05 else f'{lo:.1f}-{hi:.1f} s'


def describe(plan: dict) -> list:
  """The printed plan: what was measured, what was chosen and what it is predicted to cost."""
  p = plan['predicted_s']
  rates = _rates(plan['measured'])
  seeds = (f", the smallest with {plan['seeds_smallest']} seeds"
           if plan['seeds_smallest'] > 1 else '')
  return [
      f"minutes: measured on {plan.get('device', 'this machine')}: {rates} FLOP/s "
      f"(App. F count); compiling a run {_compile_range(plan['measured'])}",
      f"minutes: plan for {_minutes(plan['minutes'])}: budgets {_fmt_budgets(plan['budgets'])} "
      f"(a factor {plan['span']:.3g}){seeds}, {plan['runs']} runs, "
      f"{plan['trained_flops']:.3g} FLOPs; predicted {p['total_s'] / 60:.1f} minutes "
      f"({p['spent_s']:.0f} s so far, {p['runs_s']:.0f} s of runs on {plan['slots']} "
      f"slot{'s' if plan['slots'] > 1 else ''}, {p['fit_s']:.0f} s fit)"]


if __name__ == '__main__':
  sys.exit(_child(*sys.argv[1:3]) if len(sys.argv) == 3 else 2)
