"""Several sweep runs at once, each in its own process on its own share of the machine.

`sweep.parallel = P` splits the local devices into P equal slots: on GPUs each slot gets
len(GPUs) // P of them (through CUDA_VISIBLE_DEVICES), on a CPU each gets its share of the cores
(the worker pins itself to them). Small models use a few cores poorly, so on a CPU two 1-core
runs side by side get through a sweep faster than one 2-core run at a time. TPUs are not split:
there a run spreads over every chip through the mesh (sweep.parallel = 1).

Each run is `python -m lm.worker RUN_DIR` with its output in RUN_DIR/train.log. The sweep
process books each outcome as its run ends (results.csv rewritten atomically, failures to
failures.jsonl). SIGTERM or Ctrl-C to the sweep is passed to the running workers, which save a
checkpoint and stop; if the sweep is killed outright the kernel sends them SIGTERM
(lm.worker). Rerunning the same command resumes.
"""
import dataclasses
import json
import os
import signal
import subprocess
import sys
import time

from lm.errors import UserError
from lm.metrics import read_jsonl, write_json_atomic

STATUS_EVERY_S = 60.0   # how often the sweep prints where its running runs are
_ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


@dataclasses.dataclass
class Slot:
  label: str           # e.g. 'cpu 0-1' or 'gpu 2,3'
  env: dict            # extra environment for the worker


def probe_devices() -> tuple[str, int]:
  """(platform, local device count) as JAX sees them, asked in a throwaway process so that this
  process never claims the accelerators its workers need."""
  code = 'import jax; d = jax.local_devices(); print(d[0].platform, len(d))'
  out = subprocess.run([sys.executable, '-c', code], capture_output=True, text=True,
                       timeout=600, env=dict(os.environ, PYTHONPATH=_pythonpath()))
  if out.returncode != 0:
    raise UserError('JAX could not list the devices for sweep.parallel (it said: '
                    f'{out.stderr.strip().splitlines()[-1:]}); fix the JAX install or set '
                    'sweep.parallel=1.')
  platform, count = out.stdout.split()[-2:]
  return platform, int(count)


def _pythonpath() -> str:
  old = os.environ.get('PYTHONPATH')
  return _ROOT + (os.pathsep + old if old else '')


def _span(ids) -> str:
  ids = list(ids)
  consecutive = all(b == a + 1 for a, b in zip(ids, ids[1:]))
  return f'{ids[0]}-{ids[-1]}' if len(ids) > 2 and consecutive else ','.join(map(str, ids))


def device_slots(parallel: int, platform: str | None = None, count: int | None = None,
                 cpus: list[int] | None = None) -> list[Slot]:
  """P equal, disjoint shares of this machine (the arguments override what is detected)."""
  if platform is None:
    platform, count = probe_devices()
  if platform == 'cpu':
    cpus = sorted(cpus if cpus is not None else os.sched_getaffinity(0))
    if parallel > len(cpus):
      raise UserError(f'sweep.parallel={parallel} asks for more runs at once than the '
                      f'{len(cpus)} CPU cores this process may use; set sweep.parallel to at '
                      f'most {len(cpus)}.')
    per, extra = divmod(len(cpus), parallel)
    slots, at = [], 0
    for i in range(parallel):   # the first `extra` slots take one core more
      mine = cpus[at:at + per + (i < extra)]
      at += len(mine)
      slots.append(Slot(f'cpu {_span(mine)}', {'LM_WORKER_CPUS': ','.join(map(str, mine))}))
    return slots
  if platform in ('gpu', 'cuda', 'rocm'):
    visible = os.environ.get('CUDA_VISIBLE_DEVICES')
    ids = [v for v in visible.split(',') if v] if visible else [str(i) for i in range(count)]
    ids = ids[:count]
    if parallel > len(ids):
      raise UserError(f'sweep.parallel={parallel} asks for more runs at once than the '
                      f'{len(ids)} GPUs here; set sweep.parallel to at most {len(ids)}.')
    per = len(ids) // parallel
    return [Slot(f'gpu {",".join(ids[i * per:(i + 1) * per])}',
                 {'CUDA_VISIBLE_DEVICES': ','.join(ids[i * per:(i + 1) * per])})
            for i in range(parallel)]
  raise UserError(f'sweep.parallel={parallel} splits CPU cores or GPUs between runs, and this '
                  f'machine has {platform} devices; set sweep.parallel=1 and let the mesh spread '
                  'each run over all of them.')


def _last_line(path: str) -> str:
  try:
    with open(path, 'rb') as f:
      f.seek(0, os.SEEK_END)
      f.seek(max(0, f.tell() - 4096))
      lines = [l for l in f.read().decode('utf-8', 'replace').splitlines() if l.strip()]
  except OSError:
    return ''
  return lines[-1].strip() if lines else ''


def _where(job) -> str:
  rows = read_jsonl(os.path.join(job.rdir, 'metrics.jsonl'))
  if not rows and job.spec.trunk:   # a WSD branch whose trunk is still training up to it
    trunk = read_jsonl(os.path.join(os.path.dirname(job.rdir), job.spec.trunk, 'metrics.jsonl'))
    at = f"step {trunk[-1]['step']}/{job.spec.branch_step}" if trunk else 'starting'
    return f'{job.spec.name} (trunk {job.spec.trunk} {at})'
  if not rows:
    return f'{job.spec.name} starting'
  r = rows[-1]
  return f"{job.spec.name} step {r['step']}/{job.spec.steps} loss {r.get('loss_avg', 0):.3f}"


@dataclasses.dataclass
class Outcome:
  """How one attempt at a run ended: 'finished' (summary: its summary.json), 'stopped' (at a
  checkpoint, by SIGTERM), 'failed' (error: why), or 'lost' (the machine running it went away:
  a cluster node died; it resumes from its last checkpoint on another)."""
  kind: str
  summary: dict | None = None
  error: str = ''


def outcome_of(job, code: int, stop_requested: bool) -> Outcome:
  """The outcome of a worker process (python -m lm.worker) that exited with status `code`."""
  summary_path = os.path.join(job.rdir, 'summary.json')
  if code == 0 and os.path.exists(summary_path):
    with open(summary_path) as f:
      return Outcome('finished', json.load(f))
  if code == 3 or (code < 0 and stop_requested):
    return Outcome('stopped')
  last = _last_line(os.path.join(job.rdir, 'train.log'))
  return Outcome('failed', error=f'worker exited with status {code}: {last[:500]} '
                                 f'(log: {job.rdir}/train.log)')


def worker_command(rdir: str) -> list[str]:
  return [sys.executable, '-m', 'lm.worker', os.path.abspath(rdir)]


def worker_env(parent_pid: int, extra: dict | None = None) -> dict:
  """The environment of a worker process: the project importable, the parent it dies with."""
  return dict(os.environ, PYTHONPATH=_pythonpath(), LM_WORKER_PARENT=str(parent_pid),
              **(extra or {}))


class LocalSlots:
  """Runs in worker processes on this machine, one per slot (device_slots). The interface every
  way of running a sweep's jobs shares (lm.scaling.cluster has the cluster ones): capacity(),
  launch(job, start), ended(), stop_all(wait_s), running_jobs(), where(job), close()."""

  retries_now = False   # a failed run is retried on the sweep's next invocation
  name = 'local'

  def __init__(self, slots: list[Slot]):
    self.slots = slots
    self.free = list(range(len(slots)))
    self.running = {}   # slot index -> (job, Popen, log file)
    self.stop_requested = False

  def capacity(self) -> int:
    return len(self.slots)

  def running_jobs(self) -> list:
    return [j for j, _, _ in self.running.values()]

  def where(self, job) -> str:
    return ''

  def launch(self, job, start) -> None:
    k = self.free.pop(0)
    start(job, self.slots[k].label)
    write_json_atomic(os.path.join(job.rdir, 'run_config.json'), json.loads(job.cfg.to_json()))
    log = open(os.path.join(job.rdir, 'train.log'), 'a')
    proc = subprocess.Popen(worker_command(job.rdir), stdout=log, stderr=subprocess.STDOUT,
                            env=worker_env(os.getpid(), self.slots[k].env), cwd=_ROOT)
    self.running[k] = (job, proc, log)

  def ended(self) -> list:
    return [self._reap(k) for k in [k for k, (_, proc, _) in self.running.items()
                                    if proc.poll() is not None]]

  def _reap(self, k: int):
    job, proc, log = self.running.pop(k)
    log.close()
    self.free.append(k)
    return job, outcome_of(job, proc.returncode, self.stop_requested)

  def stop_all(self, wait_s: float = 300.0) -> list:
    """SIGTERM to every running worker (each saves a checkpoint and stops), then waits up to
    wait_s in all (a worker still running then is killed); their outcomes."""
    self.stop_requested = True
    for _, proc, _ in self.running.values():
      if proc.poll() is None:
        proc.send_signal(signal.SIGTERM)
    deadline = time.time() + wait_s
    out = []
    for k in list(self.running):
      proc = self.running[k][1]
      try:
        proc.wait(timeout=max(1.0, deadline - time.time()))
      except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait()
      out.append(self._reap(k))
    return out

  def close(self) -> None:
    pass


def run_jobs(jobs, backend, start, done, ready=None, retry=None) -> bool:
  """Trains `jobs` (runner.Job) in order on `backend` (LocalSlots, or a cluster's), as many at
  once as backend.capacity() allows, each as soon as `ready(job, running_jobs)` allows (default:
  always). `start(job, where)` and `done(job, summary | None, error)` are the sweep's booking
  callbacks; `retry(job, error, lost)` (backends that retry at once) returns the job's next
  attempt, or None when it is booked failed. True if stopped (SIGTERM or Ctrl-C)."""
  if not jobs:
    return False
  queue = list(jobs)
  stop = {'requested': False}

  def settle(job, o: Outcome) -> None:
    if o.kind == 'finished':
      done(job, o.summary)
    elif o.kind == 'stopped':
      print(f'    {job.spec.name} stopped at a checkpoint', flush=True)
    elif retry is not None and not stop['requested']:
      again = retry(job, o.error, o.kind == 'lost')
      if again is not None:
        queue.insert(0, again)
    else:
      done(job, None, o.error)

  def on_term(*_):
    stop['requested'] = True
  try:
    previous = signal.signal(signal.SIGTERM, on_term)
  except ValueError:   # not the main thread
    previous = None
  last_status = time.time()
  try:
    while queue or backend.running_jobs():
      if stop['requested']:
        for job, o in backend.stop_all():
          settle(job, o)
        return True
      _fill(backend, queue, ready, start)
      for job, o in backend.ended():
        settle(job, o)
      running = backend.running_jobs()
      if running and time.time() - last_status >= STATUS_EVERY_S:
        print('    running: ' + '; '.join(_where(j) + backend.where(j) for j in running),
              flush=True)
        last_status = time.time()
      time.sleep(0.2)
    return False
  except KeyboardInterrupt:
    stop['requested'] = True
    for job, o in backend.stop_all(wait_s=60.0):
      settle(job, o)
    raise
  finally:
    if previous is not None:
      signal.signal(signal.SIGTERM, previous)
    backend.close()


def _fill(backend, queue: list, ready, start) -> None:
  """Starts queued jobs while the backend has room, each time the first in the queue that
  `ready(job, running_jobs)` allows (None: any)."""
  while queue and len(backend.running_jobs()) < backend.capacity():
    now = backend.running_jobs()
    k = next((i for i, j in enumerate(queue) if ready is None or ready(j, now)), None)
    if k is None:
      break
    backend.launch(queue.pop(k), start)
