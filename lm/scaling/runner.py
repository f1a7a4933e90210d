"""Executing a sweep's plan: the runs still to train (a finished run is skipped, a failed one
retried up to sweep.max_attempts times, each failure recorded in DIR/failures.jsonl), trained one
after another in this process (packed where sweep.pack allows: lm/scaling/packed.py) or
sweep.parallel at once in worker processes (lm.scaling.parallel), WSD branches started from their
trunks' checkpoints, and each outcome booked as it ends (results.csv, the progress line).

lm.worker imports this module in every worker process: it imports nothing that training itself
does not (no scipy, no matplotlib).
"""
import dataclasses
import hashlib
import json
import os
import shutil
import time
import traceback

import ml_collections

from lm import host
from lm.errors import UserError
from lm.metrics import read_json_object, read_jsonl, write_json_atomic
from lm.scaling import packed as packed_lib
from lm.scaling import parallel as parallel_lib
from lm.scaling import results as results_lib
from lm.scaling.plan import RUN_IDENTITY, RunSpec, trained_flops
from lm.training import loop


@dataclasses.dataclass
class Job:
  """One run the sweep still has to train."""
  index: int
  spec: RunSpec
  cfg: object
  rdir: str
  attempt: int   # this try's number, 1-based


class Booking:
  """A sweep's record of its runs as they start and end: each run folder's config and attempt
  count, failures.jsonl, results.csv (rewritten atomically after every success) and the
  progress line. `start` and `done` are the callbacks the ways of running (run_in_process,
  run_parallel) call."""

  def __init__(self, workdir: str, specs: list[RunSpec], cfgs: list, base_cfg, total_flops: float):
    self.workdir, self.specs, self.cfgs, self.base_cfg = workdir, specs, cfgs, base_cfg
    self.total_flops = total_flops
    self.by_name = {sp.name: (sp, cfg) for sp, cfg in zip(specs, cfgs)}
    self.results_path = os.path.join(workdir, 'results.csv')
    self.finished = {}   # run name -> (spec, config, summary)
    self.failed = []
    self.started = []    # the jobs started in this invocation
    self.session_flops = 0.0   # what this invocation trained itself
    self.max_attempts = 1      # set by pending_jobs
    self.lost = {}             # run name -> attempts lost with their node (retry)
    self.t0 = time.time()

  def start(self, job: Job, where: str = '') -> None:
    sp = job.spec
    print(f'[{job.index + 1}/{len(self.specs)}] {sp.name}: N={sp.params:,} steps={sp.steps} '
          f'lr={sp.lr:.2g}' + (f' on {where}' if where else ''), flush=True)
    os.makedirs(job.rdir, exist_ok=True)
    write_json_atomic(os.path.join(job.rdir, RUN_IDENTITY), json.loads(job.cfg.to_json()))
    write_json_atomic(os.path.join(job.rdir, 'attempts.json'), {'attempts': job.attempt})
    self.started.append(job)
    if sp.trunk:   # for a worker process; the sweep's own process branches directly
      write_branch(job.rdir, sp, *self.by_name[sp.trunk], self.workdir)

  def done(self, job: Job, summary: dict | None, error: str | None = None, tb: str = '') -> None:
    """Books one run's outcome; results.csv is rewritten (atomically) after every success."""
    if summary is None:
      record_failure(self.workdir, job.spec.name, job.attempt, error, tb)
      print(f'    {job.spec.name} failed ({error}); recorded in failures.jsonl', flush=True)
      self.failed.append(job.spec.name)
      return
    print(f"    {job.spec.name} done in {summary.get('wall_s', 0):.0f} s: eval loss "
          f"{summary['eval_loss']:.4f}, {summary['flops']:.3g} FLOPs", flush=True)
    self.finished[job.spec.name] = (job.spec, job.cfg, summary)
    results_lib.write_results(self.results_path,
                              results_lib.result_rows(self.specs, self.finished))
    # The FLOPs this run trained itself (a WSD branch: its cooldown; the trunk's steps up to it
    # are counted when the trunk finishes).
    self.session_flops += trained_flops(job.spec, self.base_cfg)
    done_flops = sum(trained_flops(sp, self.base_cfg) for sp, _, _ in self.finished.values())
    print('    ' + progress_line(len(self.finished), len(self.specs), done_flops,
                                 self.total_flops, self.session_flops, time.time() - self.t0),
          flush=True)


  def retry(self, job: Job, error: str, lost: bool = False) -> Job | None:
    """A failed or lost attempt on a backend that retries at once (a cluster's): recorded in
    failures.jsonl, then the run's next attempt, or None when the run is booked failed. A lost
    attempt (its node died) is no failure of the run and does not count against
    sweep.max_attempts (it resumes from its last checkpoint), but a run lost more than
    2 x max_attempts times in one invocation is booked failed."""
    name = job.spec.name
    record_failure(self.workdir, name, job.attempt, error, lost=lost)
    if lost:
      self.lost[name] = self.lost.get(name, 0) + 1
      if self.lost[name] <= 2 * self.max_attempts:
        print(f'    {name} lost ({error}); retried from its last checkpoint', flush=True)
        return dataclasses.replace(job)
    elif job.attempt < self.max_attempts:
      print(f'    {name} failed ({error}); attempt {job.attempt + 1} of {self.max_attempts} '
            'follows', flush=True)
      return dataclasses.replace(job, attempt=job.attempt + 1)
    print(f'    {name} failed ({error}); recorded in failures.jsonl, not retried', flush=True)
    self.failed.append(name)
    return None

  def stopped(self) -> None:
    """After a SIGTERM: the runs started here that neither finished nor failed were stopped at a
    checkpoint, which is no failed attempt (a sweep preempted N times must not give up on its
    runs): their attempt count goes back."""
    for job in self.started:
      if job.spec.name not in self.finished and job.spec.name not in self.failed:
        write_json_atomic(os.path.join(job.rdir, 'attempts.json'), {'attempts': job.attempt - 1})


def pending_jobs(book: Booking, max_attempts: int) -> list[Job]:
  """The runs still to train, in run order (priority). A run finished earlier goes into
  book.finished, one that failed max_attempts times into book.failed, each with a line."""
  jobs = []
  book.max_attempts = max_attempts
  n = len(book.specs)
  for i, (sp, cfg) in enumerate(zip(book.specs, book.cfgs)):
    rdir = os.path.join(book.workdir, 'runs', sp.name)
    summary_path = os.path.join(rdir, 'summary.json')
    if os.path.exists(summary_path):
      book.finished[sp.name] = (sp, cfg, read_json_object(
          summary_path, f'delete it (or the folder {rdir}) to train the run again'))
      print(f'[{i + 1}/{n}] {sp.name}: finished earlier, skipped', flush=True)
      continue
    attempts_path = os.path.join(rdir, 'attempts.json')
    attempts = _attempts(attempts_path)
    if attempts >= max_attempts:
      print(f'[{i + 1}/{n}] {sp.name}: did not finish in {attempts} attempts, not retried '
            f'(see failures.jsonl and {rdir}/train.log if any; delete {attempts_path} to try '
            'again)', flush=True)
      book.failed.append(sp.name)
      continue
    jobs.append(Job(i, sp, cfg, rdir, attempts + 1))
  jobs.sort(key=lambda j: priority(book.specs, j.spec))
  return jobs


def run_parallel(jobs: list[Job], parallel: int, book: Booking, backend=None) -> bool:
  """Trains the jobs `parallel` at a time, each in its own worker process (lm.scaling.parallel),
  or on `backend` (a cluster's: lm.scaling.cluster), as many at once as it takes. True if
  stopped (SIGTERM).

  Longest first (Graham's LPT rule): the last runs to start are the short ones, so no long run
  is left training alone on one slot while the others sit idle at the end. A WSD family counts
  as one job: its runs go shortest first, one at a time."""
  cost = {}
  for j in jobs:
    cost[family(j.spec)] = cost.get(family(j.spec), 0.0) + trained_flops(j.spec, book.base_cfg)
  jobs = sorted(jobs, key=lambda j: (-cost[family(j.spec)], family(j.spec), j.spec.steps))
  return parallel_lib.run_jobs(
      jobs, backend or parallel_lib.LocalSlots(parallel_lib.device_slots(parallel)), book.start,
      book.done, ready=lambda job, running: all(family(r.spec) != family(job.spec)
                                                for r in running),
      retry=book.retry if getattr(backend, 'retries_now', False) else None)


def run_in_process(jobs: list[Job], pack: int, book: Booking, train_fn) -> bool:
  """Trains the jobs one after another in this process (in packs of `pack` where their configs
  allow: packs). A failed run is booked and the next one starts. True if stopped (SIGTERM)."""
  for group in packs(jobs, pack):
    if len(group) > 1:
      if not train_pack(group, book.workdir, book.start, book.done):
        return True
      continue
    job = group[0]
    book.start(job)
    try:
      if job.spec.trunk and not branch_from_trunk(job.spec, job.rdir, *book.by_name[job.spec.trunk],
                                                  book.workdir, train_fn):
        return True
      summary = train_and_record(train_fn, job.cfg, job.rdir)
    except KeyboardInterrupt:
      raise
    except Exception as e:  # recorded and retried on the next invocation
      book.done(job, None, f'{type(e).__name__}: {e}', traceback.format_exc(limit=5))
      continue
    if not summary.get('finished'):
      return True
    book.done(job, summary)
  return False


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


def record_failure(workdir: str, name: str, attempt: int, error: str, tb: str = '',
                   lost: bool = False) -> None:
  """One line of DIR/failures.jsonl (lost: the attempt's node died; it did not fail itself)."""
  row = {'run': name, 'attempt': attempt, 'time': time.time(), 'error': error, 'traceback': tb}
  if lost:
    row['lost'] = True
  with open(os.path.join(workdir, 'failures.jsonl'), 'a') as f:
    f.write(json.dumps(row) + '\n')


def _attempts(path: str) -> int:
  try:
    with open(path) as f:
      return json.load(f)['attempts']
  except (OSError, ValueError, KeyError):
    return 0


def priority(specs: list[RunSpec], sp: RunSpec) -> tuple:
  """Run order: budget by budget (smallest first), and within a budget the sizes nearest its
  middle (the predicted optimum) first, then outwards, so that a sweep stopped part-way through
  a budget has already bracketed that budget's minimum. Grid sweeps keep the plan's order.
  Runs in parallel go longest first instead (run_parallel)."""
  if sp.budget is None:
    return (0, specs.index(sp))
  same = [x for x in specs if x.budget == sp.budget and x.seed == sp.seed]
  centre = (len(same) - 1) / 2
  budgets = sorted({x.budget for x in specs if x.budget is not None})
  return (sp.seed, budgets.index(sp.budget), abs(same.index(sp) - centre), same.index(sp))


def auto_parallel(n_jobs: int) -> int:
  """sweep.parallel = 0: one run per CPU core on a CPU (small models use several cores poorly,
  benchmarks/parallel_runs.py), one per GPU on GPUs, one at a time on TPUs."""
  platform, count = parallel_lib.probe_devices()
  if platform == 'cpu':
    return max(1, min(host.host_cores(), n_jobs))
  return max(1, min(count, n_jobs)) if platform in ('gpu', 'cuda', 'rocm') else 1


def branch_from_trunk(sp: RunSpec, rdir: str, trunk: RunSpec, trunk_cfg, workdir: str,
                      train_fn) -> bool:
  """Starts WSD branch `sp` from its trunk's checkpoint at sp.branch_step: the trunk is trained
  up to that step if it is not there yet (and stops with a checkpoint), then the checkpoint and
  the trunk's metrics rows up to it are copied into the branch, which resumes from them as from
  its own. A branch that already has a checkpoint just resumes. False when the trunk was stopped
  (SIGTERM) before it got there: nothing is copied, and a rerun carries on."""
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
  b = read_json_object(path, 'rerun the sweep, which rewrites it')
  return branch_from_trunk(RunSpec(**b['spec']), rdir, RunSpec(**b['trunk']),
                           ml_collections.ConfigDict(b['trunk_config']), b['workdir'], train_fn)


def packs(jobs: list[Job], size: int) -> list[list[Job]]:
  """The jobs in groups of up to `size` that can train as one packed program (their configs
  differ only in seed and lr: lm/scaling/packed.py), in the order of each group's first job.
  size 1 (the default): every job alone."""
  if size <= 1:
    return [[j] for j in jobs]
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
  for job in group:
    start(job)
  names = '+'.join(j.spec.name for j in group)
  pack_dir = os.path.join(workdir, 'packs', hashlib.sha1(names.encode()).hexdigest()[:12])
  print(f'    packed: {names} in one program', flush=True)
  t0 = time.time()
  try:
    summaries = packed_lib.train([j.cfg for j in group], [j.rdir for j in group], pack_dir)
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
