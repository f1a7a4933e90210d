"""A sweep's runs on a cluster: `sweep.backend=ray` (each run a Ray task) or `sweep.backend=slurm`
(each run a SLURM job, submitted through submitit). The sweep process stays the driver and keeps
its bookkeeping (lm.scaling.runner.Booking: results.csv, failures.jsonl, attempts, run identity);
only where the runs train changes. docs/cluster.md tells how to set up each.

Every run trains as `python -m lm.worker RUN_DIR` on the node the scheduler picked (run_on_node),
so the sweep folder must be on storage every node mounts at the same path, and so must the
project (checked before anything trains: check_shared_storage). A run whose node dies (Ray: the
node's raylet is gone; SLURM: the job ended without a result, e.g. node failure, preemption,
time limit) is *lost*, not failed: it is started again on another node at once and resumes from
its last checkpoint, and the loss does not count against sweep.max_attempts. A run that fails
(the worker exits with an error) is retried at once up to sweep.max_attempts. The driver can be
killed and restarted at any moment: a run is finished when its summary.json exists, so each is
booked exactly once, and an interrupted one resumes from its checkpoint.

Ray and submitit are optional dependencies (requirements-cluster.txt), imported only here and
only when a sweep asks for their backend.
"""
import importlib
import json
import logging
import os
import secrets
import signal
import socket
import subprocess
import sys
import time

from lm import lock as lock_lib
from lm.errors import UserError
from lm.metrics import read_json_object, write_json_atomic
from lm.scaling import parallel as parallel_lib

BACKENDS = ('local', 'ray', 'slurm')
NODE = 'node.json'          # in a run folder: where its current attempt runs
SLURM_JOB = 'slurm_job.json'
_ROOT = parallel_lib._ROOT
INSTALL = 'pip install -r requirements-cluster.txt'


def _need(module: str, backend: str):
  try:
    return importlib.import_module(module)
  except ImportError:
    raise UserError(f'sweep.backend={backend} needs the {module} package, which is not '
                    f'installed; install it with `{INSTALL}`.') from None


def make_backend(s, workdir: str):
  """The backend sweep.backend names, connected and checked (shared storage, resources)."""
  name = s.get('backend', 'local')
  if name == 'ray':
    return RayBackend(s, workdir)
  if name == 'slurm':
    return SlurmBackend(s, workdir)
  raise ValueError(name)


# ---------------------------------------------------------------------------------------------
# On the node


def run_on_node(rdir: str) -> dict:
  """One attempt at a run, on the node a scheduler chose: `python -m lm.worker RDIR` with its
  output appended to RDIR/train.log, where it runs written to RDIR/node.json. SIGTERM, SIGINT or a
  Ray cancellation is passed on to the worker, which saves a checkpoint and stops. Returns
  {'code': the worker's exit status (None: it never started), 'host', 'error'}."""
  host = socket.gethostname()
  if not os.path.isdir(rdir):
    return {'code': None, 'host': host,
            'error': f'the run folder {rdir} is not visible on host {host}'}
  write_json_atomic(os.path.join(rdir, NODE), {'host': host, 'node': _ray_node_id(),
                                               'pid': os.getpid(), 'since': time.time()})
  # An earlier attempt on this host may still be saving its checkpoint; on another host the
  # driver clears the lock of a node it knows is gone (_clear_lost_lock).
  lock_lib.wait_until_free(rdir, timeout_s=600.0)
  with open(os.path.join(rdir, 'train.log'), 'a') as log:
    proc = subprocess.Popen(parallel_lib.worker_command(rdir), stdout=log,
                            stderr=subprocess.STDOUT, env=parallel_lib.worker_env(os.getpid()),
                            cwd=_ROOT)

    def forward(signum, _frame):
      if proc.poll() is None:
        proc.send_signal(signal.SIGTERM)
    previous = {}
    try:
      for sig in (signal.SIGTERM, signal.SIGUSR2):   # SIGUSR2: SLURM's warning before a limit
        previous[sig] = signal.signal(sig, forward)
    except ValueError:   # not the main thread: the scheduler's own stop still reaches the worker
      pass
    try:
      while True:
        try:
          code = proc.wait()
          break
        except KeyboardInterrupt:   # SIGINT, or ray.cancel: stop at a checkpoint
          forward(signal.SIGINT, None)
    finally:
      for sig, handler in previous.items():
        signal.signal(sig, handler)
  return {'code': code, 'host': host, 'error': ''}


def _ray_node_id() -> str:
  ray = sys.modules.get('ray')
  if ray is None or not ray.is_initialized():
    return ''
  return ray.get_runtime_context().get_node_id()


def sees_file(path: str, token: str) -> dict:
  """On a node: whether `path` exists there holding `token` (the shared-storage check)."""
  try:
    with open(path) as f:
      ok = f.read().strip() == token
  except OSError:
    ok = False
  return {'ok': ok, 'host': socket.gethostname()}


def check_shared_storage(workdir: str, nodes: list[str], run_on, backend: str) -> None:
  """Refuses, in one sentence, a sweep folder that some node cannot read: the driver writes a
  token file into it, and `run_on(node, sees_file, path, token)` reads it back on each node
  (a Ray task pinned to the node; a SLURM job)."""
  token = secrets.token_hex(8)
  path = os.path.join(os.path.abspath(workdir), f'.storage-check-{token}')
  with open(path, 'w') as f:
    f.write(token)
  try:
    answers = [(node, run_on(node, sees_file, path, token)) for node in nodes]
  finally:
    os.unlink(path)
  bad = [(node, a) for node, a in answers if not a.get('ok')]
  if bad:
    node, a = bad[0]
    where = a.get('host') or node
    why = a.get('error') or f'{path} written by the driver is not there'
    raise UserError(f'sweep.backend={backend} needs the sweep folder {os.path.abspath(workdir)} '
                    f'on storage every node mounts at the same path, and node {where} cannot '
                    f'read it ({why}); put --workdir on a shared filesystem (NFS, Lustre, a '
                    f'bucket mounted with gcsfuse) and keep the project there too.')


def _clear_lost_lock(rdir: str, lost_host: str) -> None:
  """A run lost with its node on another host leaves that node's lock in the run folder, which no
  process here can check; the scheduler said the node is gone, so the lock goes."""
  holder = lock_lib.lock_holder(rdir)
  if holder and lost_host and holder.get('host') == lost_host != socket.gethostname():
    try:
      os.unlink(os.path.join(rdir, lock_lib.NAME))
      print(f'    removed the lock of {rdir} left by lost host {lost_host}', flush=True)
    except OSError:
      pass


def _node_of(rdir: str) -> dict:
  try:
    with open(os.path.join(rdir, NODE)) as f:
      return json.load(f)
  except (OSError, ValueError):
    return {}


def _outcome(job, answer: dict, stop_requested: bool):
  """A node's answer as an outcome. A run stopped at a checkpoint that the driver did not stop
  was stopped where it ran (a SLURM time limit's warning, preemption, a SIGTERM on the node): it
  is lost, and goes again at once from that checkpoint."""
  if answer.get('code') is None:
    return parallel_lib.Outcome('lost', error=answer.get('error') or 'the run never started')
  outcome = parallel_lib.outcome_of(job, answer['code'], stop_requested)
  if outcome.kind == 'stopped' and not stop_requested:
    return parallel_lib.Outcome('lost', error=f"stopped on host {answer.get('host', '?')} "
                                              '(a time limit, preemption or a SIGTERM there)')
  return outcome


# ---------------------------------------------------------------------------------------------
# Ray


def parse_resources(text: str) -> dict:
  """'TPU-v4-8-head:1,ssd:1' -> {'TPU-v4-8-head': 1.0, 'ssd': 1.0} (sweep.ray_resources)."""
  out = {}
  for part in filter(None, (p.strip() for p in (text or '').split(','))):
    name, _, amount = part.partition(':')
    try:
      out[name.strip()] = float(amount or 1)
    except ValueError:
      raise UserError(f'sweep.ray_resources={text!r} must read like "TPU-v4-8-head:1,ssd:1" '
                      '(custom Ray resources each run needs, name:amount, comma separated).'
                      ) from None
  return out


class RayBackend:
  """Each attempt at a run is a Ray task (run_on_node) asking for sweep.ray_num_cpus,
  sweep.ray_num_gpus and sweep.ray_resources; at most as many run at once as the live nodes fit
  (and sweep.max_in_flight, if set). Ray never retries a task itself (max_retries=0): the driver
  does, booking each attempt."""

  retries_now = True
  name = 'ray'

  def __init__(self, s, workdir: str):
    ray = self.ray = _need('ray', 'ray')
    self.need = {'CPU': float(s.get('ray_num_cpus', 1)), 'GPU': float(s.get('ray_num_gpus', 0)),
                 **parse_resources(s.get('ray_resources', ''))}
    self.need = {k: v for k, v in self.need.items() if v > 0}
    self.max_in_flight = int(s.get('max_in_flight', 0))
    address = s.get('ray_address', '') or None
    if not ray.is_initialized():
      try:
        extra = {'include_dashboard': False} if address == 'local' else {}
        ray.init(address=address, runtime_env={'env_vars': {'PYTHONPATH': _ROOT}},
                 log_to_driver=False, logging_level=logging.WARNING, **extra)
      except (ConnectionError, RuntimeError, ValueError) as e:
        raise UserError(f'sweep.ray_address={address or ""!r}: no Ray cluster could be reached '
                        f'({str(e).splitlines()[0][:200]}); start one (`ray start --head` on the '
                        'head node), name its address, or leave the key empty for a Ray '
                        'instance on this machine.') from None
    options = dict(max_retries=0, num_cpus=self.need.get('CPU', 0),
                   num_gpus=self.need.get('GPU', 0),
                   resources={k: v for k, v in self.need.items() if k not in ('CPU', 'GPU')})
    self.task = ray.remote(run_on_node).options(**options)
    self.running = {}   # ObjectRef -> job
    self.stop_requested = False
    self._cap, self._cap_at = 0, 0.0
    nodes = self.fitting_nodes()
    if not nodes:
      raise UserError(f'no live node of the Ray cluster has what one run asks for '
                      f'({self._need_text()}); lower sweep.ray_num_cpus / ray_num_gpus, fix '
                      'sweep.ray_resources, or add nodes that have them.')
    check_shared_storage(workdir, [n['NodeID'] for n in nodes], self._run_pinned, 'ray')
    print(f'ray: {len(nodes)} node(s) can take runs ({self._need_text()} each), up to '
          f'{self.capacity()} at once', flush=True)

  def _need_text(self) -> str:
    return ', '.join(f'{k}={v:g}' for k, v in self.need.items()) or 'nothing'

  def fitting_nodes(self) -> list[dict]:
    return [n for n in self.ray.nodes() if n.get('Alive') and self._fits(n) > 0]

  def _fits(self, node: dict) -> int:
    have = node.get('Resources') or {}
    if not self.need:
      return 1
    return int(min(have.get(k, 0.0) // v for k, v in self.need.items()))

  def capacity(self) -> int:
    """Runs at once: what the live nodes fit (looked up every 10 s), capped by max_in_flight."""
    if time.time() - self._cap_at > 10.0:
      self._cap = sum(self._fits(n) for n in self.fitting_nodes())
      self._cap_at = time.time()
    return min(self._cap, self.max_in_flight) if self.max_in_flight else self._cap

  def _run_pinned(self, node_id: str, fn, *args):
    from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy
    ref = self.ray.remote(fn).options(
        num_cpus=0, max_retries=0,
        scheduling_strategy=NodeAffinitySchedulingStrategy(node_id, soft=False)).remote(*args)
    try:
      return self.ray.get(ref, timeout=300)
    except self.ray.exceptions.GetTimeoutError:
      return {'ok': False, 'error': 'it did not answer within 300 s'}
    except self.ray.exceptions.RayError as e:
      return {'ok': False, 'error': f'the check failed there: {str(e).splitlines()[0][:200]} '
                                    f'(is the project at {_ROOT} on that node?)'}

  def running_jobs(self) -> list:
    return list(self.running.values())

  def where(self, job) -> str:
    node = _node_of(job.rdir)
    return (f" on {node.get('host', '?')} (node {node.get('node', '')[:8]})" if node
            else ' (waiting for a node)')

  def launch(self, job, start) -> None:
    start(job, 'the Ray cluster')
    write_json_atomic(os.path.join(job.rdir, 'run_config.json'), json.loads(job.cfg.to_json()))
    with_node = os.path.join(job.rdir, NODE)
    if os.path.exists(with_node):
      os.unlink(with_node)
    self.running[self.task.remote(os.path.abspath(job.rdir))] = job

  def ended(self) -> list:
    if not self.running:
      return []
    done, _ = self.ray.wait(list(self.running), num_returns=len(self.running), timeout=0)
    return [self._settle(ref) for ref in done]

  def _settle(self, ref):
    job = self.running.pop(ref)
    ray = self.ray
    try:
      return job, _outcome(job, ray.get(ref), self.stop_requested)
    except (ray.exceptions.TaskCancelledError, KeyboardInterrupt):
      return job, parallel_lib.Outcome('stopped')
    except ray.exceptions.RayTaskError as e:   # the task itself raised
      return job, parallel_lib.Outcome('failed', error=str(e).strip().splitlines()[-1][:500])
    except ray.exceptions.RayError as e:       # the node or the worker process is gone
      node = _node_of(job.rdir)
      _clear_lost_lock(job.rdir, node.get('host', ''))
      first = str(e).strip().splitlines()[0][:300]
      return job, parallel_lib.Outcome('lost', error=f"{type(e).__name__} on host "
                                                     f"{node.get('host', '?')}: {first}")

  def stop_all(self, wait_s: float = 300.0) -> list:
    """Cancels every running task (the worker saves a checkpoint and stops), waits up to wait_s,
    then forces what is left."""
    self.stop_requested = True
    refs = list(self.running)
    for ref in refs:
      self.ray.cancel(ref)
    if refs:
      self.ray.wait(refs, num_returns=len(refs), timeout=wait_s)
    for ref in refs:
      self.ray.cancel(ref, force=True)
    return [self._settle(ref) for ref in refs]

  def close(self) -> None:
    pass


# ---------------------------------------------------------------------------------------------
# SLURM (submitit)


class SlurmBackend:
  """Each attempt at a run is one SLURM job (submitit): sweep.slurm_partition, slurm_time_min,
  slurm_gpus (per job), slurm_cpus, and sweep.slurm_executor = 'slurm' (sbatch through submitit),
  'local' (submitit's local executor: processes on this machine, for testing a sweep's set-up
  without a cluster) or 'auto' (SLURM where sbatch exists, else local). At most
  sweep.max_in_flight jobs are in the queue at once (0: every run at once; SLURM queues them).
  The job of a run that a killed driver left behind is cancelled when the driver restarts (it
  saves a checkpoint on SIGTERM), so each run has one job at a time."""

  retries_now = True
  name = 'slurm'

  def __init__(self, s, workdir: str):
    self.submitit = _need('submitit', 'slurm')
    kind = s.get('slurm_executor', 'auto')
    if kind not in ('auto', 'slurm', 'local'):
      raise UserError(f"sweep.slurm_executor={kind!r} must be 'auto', 'slurm' or 'local'.")
    self.folder = os.path.join(os.path.abspath(workdir), 'slurm')
    os.environ['PYTHONPATH'] = parallel_lib._pythonpath()   # jobs unpickle run_on_node
    try:
      self.executor = self.submitit.AutoExecutor(folder=self.folder,
                                                 cluster=None if kind == 'auto' else kind)
    except RuntimeError as e:   # no srun/sbatch on this machine
      raise UserError(f'sweep.slurm_executor={kind} needs SLURM on this machine ({e}); run the '
                      'sweep on the cluster\'s login node, or set sweep.slurm_executor=local to '
                      'try the set-up with local processes.') from None
    params = dict(timeout_min=int(s.get('slurm_time_min', 240)), name='lm-sweep',
                  cpus_per_task=int(s.get('slurm_cpus', 4)), stderr_to_stdout=True)
    if int(s.get('slurm_gpus', 0)):
      params['gpus_per_node'] = int(s.get('slurm_gpus', 0))
    if self.executor.cluster == 'slurm':
      if s.get('slurm_partition', ''):
        params['slurm_partition'] = s.get('slurm_partition', '')
      params['slurm_signal_delay_s'] = 120   # SIGUSR2 that long before the limit: a checkpoint
    self.executor.update_parameters(**params)
    self.max_in_flight = int(s.get('max_in_flight', 0))
    self.running = {}   # job id -> (job, submitit job)
    self.stop_requested = False
    print(f'slurm: jobs through submitit ({self.executor.cluster} executor), logs in '
          f'{self.folder}', flush=True)

  def capacity(self) -> int:
    return self.max_in_flight or 1_000_000

  def running_jobs(self) -> list:
    return [j for j, _ in self.running.values()]

  def where(self, job) -> str:
    node = _node_of(job.rdir)
    return f" on {node.get('host', '?')}" if node else ' (queued)'

  def cancel_leftover(self, rdir: str) -> None:
    """A job this run's folder names from an earlier driver, cancelled (it saves a checkpoint on
    SIGTERM) and waited for, so that one job at a time trains the run."""
    path = os.path.join(rdir, SLURM_JOB)
    if not os.path.exists(path):
      return
    old = read_json_object(path, 'delete it; it only names the job of an earlier attempt')
    pid = old.get('local_pid')
    if old.get('executor') == 'local' and pid:
      try:
        os.kill(int(pid), signal.SIGTERM)
        print(f'    stopping the job an earlier driver left on {rdir} (pid {pid})', flush=True)
      except (ProcessLookupError, PermissionError):
        pass
    elif old.get('executor') == 'slurm' and old.get('job_id'):
      subprocess.run(['scancel', '--signal=TERM', '--full', str(old['job_id'])],
                     capture_output=True)
    os.unlink(path)
    lock_lib.wait_until_free(rdir, timeout_s=600.0)

  def launch(self, job, start) -> None:
    self.cancel_leftover(job.rdir)
    start(job, f'{self.executor.cluster} job')
    write_json_atomic(os.path.join(job.rdir, 'run_config.json'), json.loads(job.cfg.to_json()))
    if os.path.exists(os.path.join(job.rdir, NODE)):
      os.unlink(os.path.join(job.rdir, NODE))
    sjob = self.executor.submit(run_on_node, os.path.abspath(job.rdir))
    process = getattr(sjob, '_process', None)
    write_json_atomic(os.path.join(job.rdir, SLURM_JOB), {
        'executor': self.executor.cluster, 'job_id': str(sjob.job_id),
        'local_pid': process.pid if process is not None else None})
    self.running[str(sjob.job_id)] = (job, sjob)

  def ended(self) -> list:
    return [self._settle(k) for k in [k for k, (_, sj) in self.running.items() if sj.done()]]

  def _settle(self, key: str):
    job, sjob = self.running.pop(key)
    utils = self.submitit.core.utils
    try:
      answer = sjob.result()
    except utils.FailedJobError as e:   # the function raised (submitit's own failure included)
      outcome = parallel_lib.Outcome('failed', error=str(e).strip().splitlines()[-1][:500])
    except utils.UncompletedJobError as e:   # killed: node failure, preemption, time limit
      outcome = (parallel_lib.Outcome('stopped') if self.stop_requested else
                 parallel_lib.Outcome('lost', error=f'job {key} ended without a result: '
                                                    f'{str(e).strip().splitlines()[0][:300]}'))
      if outcome.kind == 'lost':
        _clear_lost_lock(job.rdir, _node_of(job.rdir).get('host', ''))
    else:
      outcome = _outcome(job, answer, self.stop_requested)
    path = os.path.join(job.rdir, SLURM_JOB)
    if os.path.exists(path):
      os.unlink(path)
    return job, outcome

  def stop_all(self, wait_s: float = 300.0) -> list:
    """SIGTERM to every job's run (it saves a checkpoint and stops), then waits up to wait_s."""
    self.stop_requested = True
    for _, sjob in self.running.values():
      if self.executor.cluster == 'slurm':
        subprocess.run(['scancel', '--signal=TERM', '--full', str(sjob.job_id)],
                       capture_output=True)
      else:
        process = getattr(sjob, '_process', None)
        if process is not None and process.poll() is None:
          process.send_signal(signal.SIGTERM)
    deadline = time.time() + wait_s
    while time.time() < deadline and not all(sj.done() for _, sj in self.running.values()):
      time.sleep(0.5)
    for _, sjob in self.running.values():
      if not sjob.done():
        sjob.cancel(check=False)
    return [self._settle(k) for k in list(self.running)]

  def close(self) -> None:
    pass
