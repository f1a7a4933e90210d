"""Sweeps on a cluster (lm/scaling/cluster.py): sweep.backend=ray and sweep.backend=slurm.

The tests marked `extras` need ray and submitit (pip install -r requirements-cluster.txt) and
run a tiny sweep on a Ray instance on this machine and through submitit's local executor; run
them with `python -m pytest -q -m extras -n 0`. The rest (retry booking, refusals, imports) need
neither and run in the default suite.
"""
import csv
import json
import os
import signal
import subprocess
import sys
import threading
import time

import pytest

from lm.errors import UserError
from lm.scaling import cluster as cluster_lib
from lm.scaling import parallel as parallel_lib
from lm.scaling import plan as plan_lib
from lm.scaling import runner as runner_lib
from lm.scaling import sweep as sweep_lib
from test_sweep import tiny_sweep

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def rows(workdir):
  with open(os.path.join(workdir, 'results.csv'), newline='') as f:
    return {r['run']: r for r in csv.DictReader(f)}


def failures(workdir):
  path = os.path.join(workdir, 'failures.jsonl')
  return [json.loads(l) for l in open(path)] if os.path.exists(path) else []


# ---------------------------------------------------------------------------------------------
# Without ray or submitit


class FakeCluster:
  """A backend whose 'runs' end as scripted: each attempt of a run takes the next outcome."""
  retries_now = True

  def __init__(self, script: dict, capacity: int = 2):
    self.script = {k: list(v) for k, v in script.items()}
    self.cap, self.running, self.launched = capacity, [], []

  def capacity(self):
    return self.cap

  def running_jobs(self):
    return list(self.running)

  def where(self, job):
    return ''

  def launch(self, job, start):
    start(job, 'fake')
    self.launched.append((job.spec.name, job.attempt))
    self.running.append(job)

  def ended(self):
    out = []
    for job in list(self.running):
      self.running.remove(job)
      kind = self.script[job.spec.name].pop(0)
      summary = None
      if kind == 'finished':
        summary = {k: 1.0 for k in ('params', 'params_nonembed', 'tokens', 'flops', 'flops_6nd',
                                    'final_loss', 'eval_loss', 'wall_s')}
      out.append((job, parallel_lib.Outcome(kind, summary, error=f'{kind} on purpose')))
    return out

  def stop_all(self, wait_s=0):
    return []

  def close(self):
    pass


def test_lost_runs_are_retried_without_counting_and_failures_up_to_max_attempts(tmp_path):
  """A cluster backend's outcomes booked at once: a lost attempt (node died) goes again with the
  same attempt number and is recorded as lost; a failed one goes again as the next attempt until
  sweep.max_attempts, then is booked failed; every run ends in results.csv or in book.failed
  exactly once."""
  cfg = tiny_sweep(str(tmp_path / 'cache'), budgets=(4e9,))
  specs = plan_lib.plan(cfg.sweep, cfg.base, 259)
  cfgs = [plan_lib.run_config(cfg.base, sp) for sp in specs]
  book = runner_lib.Booking(str(tmp_path), specs, cfgs, cfg.base, 1.0)
  os.makedirs(tmp_path / 'runs', exist_ok=True)
  jobs = runner_lib.pending_jobs(book, max_attempts=2)
  a, b, c = (sp.name for sp in specs)
  backend = FakeCluster({a: ['lost', 'lost', 'finished'], b: ['failed', 'finished'],
                         c: ['failed', 'failed']})
  stopped = runner_lib.run_parallel(jobs, 0, book, backend)
  assert not stopped
  assert sorted(book.finished) == sorted([a, b]) and book.failed == [c]
  assert [n for n, k in backend.launched if n == a] == [a, a, a]
  assert [k for n, k in backend.launched if n == a] == [1, 1, 1]       # lost: same attempt
  assert [k for n, k in backend.launched if n == b] == [1, 2]          # failed: the next one
  assert [k for n, k in backend.launched if n == c] == [1, 2]          # and no third
  got = failures(str(tmp_path))
  assert [(f['run'], f['attempt'], f.get('lost', False)) for f in got if f['run'] == a] == [
      (a, 1, True), (a, 1, True)]
  assert [(f['run'], f['attempt']) for f in got if f['run'] == c] == [(c, 1), (c, 2)]
  assert set(rows(str(tmp_path))) == {a, b}
  with open(tmp_path / 'runs' / c / 'attempts.json') as f:
    assert json.load(f)['attempts'] == 2


def test_a_run_lost_again_and_again_is_booked_failed(tmp_path):
  cfg = tiny_sweep(str(tmp_path / 'cache'), budgets=(4e9,))
  cfg.sweep.only = 'L1_d8'
  specs = plan_lib.plan(cfg.sweep, cfg.base, 259)
  book = runner_lib.Booking(str(tmp_path), specs, [plan_lib.run_config(cfg.base, specs[0])],
                            cfg.base, 1.0)
  os.makedirs(tmp_path / 'runs', exist_ok=True)
  jobs = runner_lib.pending_jobs(book, max_attempts=2)
  backend = FakeCluster({specs[0].name: ['lost'] * 10})
  runner_lib.run_parallel(jobs, 0, book, backend)
  assert book.failed == [specs[0].name] and len(backend.launched) == 5   # 2 x max_attempts + 1


def test_storage_every_node_cannot_read_is_refused(tmp_path):
  """The check writes a token into the sweep folder and reads it back on every node; a node that
  sees another filesystem (here: a node whose paths resolve under another root) is named."""
  workdir = tmp_path / 'sweep'
  workdir.mkdir()
  elsewhere = tmp_path / 'other_machine'

  def run_on(node, fn, path, token):
    if node == 'n2':   # this node mounts something else at the same path
      path = str(elsewhere) + path
    return fn(path, token)
  cluster_lib.check_shared_storage(str(workdir), ['n1'], run_on, 'ray')   # one node: fine
  with pytest.raises(UserError, match=r'node .* cannot read it.*shared filesystem'):
    cluster_lib.check_shared_storage(str(workdir), ['n1', 'n2'], run_on, 'ray')
  assert os.listdir(workdir) == []   # the token file is gone again


def test_backend_keys_are_checked():
  cfg = tiny_sweep('/nonexistent')
  cfg.sweep.backend = 'kubernetes'
  with pytest.raises(UserError, match="sweep.backend='kubernetes' is not known"):
    plan_lib.validate(cfg.sweep)
  cfg.sweep.backend, cfg.sweep.pack = 'ray', 2
  with pytest.raises(UserError, match='sweep.pack=2 .* set sweep.pack=1'):
    plan_lib.validate(cfg.sweep)
  cfg.sweep.pack, cfg.sweep.max_in_flight = 1, -1
  with pytest.raises(UserError, match='sweep.max_in_flight=-1'):
    plan_lib.validate(cfg.sweep)
  with pytest.raises(UserError, match='ray_resources'):
    cluster_lib.parse_resources('TPU:one')
  assert cluster_lib.parse_resources('TPU-v4-8-head:1, ssd') == {'TPU-v4-8-head': 1.0, 'ssd': 1.0}


def test_missing_ray_or_submitit_is_one_sentence_naming_the_install(monkeypatch, tmp_path):
  for module, backend in (('ray', 'ray'), ('submitit', 'slurm')):
    monkeypatch.setitem(sys.modules, module, None)   # import fails as if not installed
    cfg = tiny_sweep(str(tmp_path / 'cache'))
    cfg.sweep.backend = backend
    with pytest.raises(UserError, match=rf'needs the {module} package.*'
                                        r'pip install -r requirements-cluster\.txt'):
      cluster_lib.make_backend(cfg.sweep, str(tmp_path))


def test_no_other_code_path_imports_ray_or_submitit():
  """Importing run.py and every module of the library imports none of the optional packages
  (ray, submitit, lm-eval, wandb): each is imported only when its feature is asked for."""
  code = '''
import importlib, pkgutil, sys
import lm, run
for m in pkgutil.walk_packages(lm.__path__, 'lm.'):
  importlib.import_module(m.name)
print(sorted(k for k in sys.modules if k.split('.')[0] in ('ray', 'submitit', 'lm_eval', 'wandb')))
'''
  out = subprocess.run([sys.executable, '-c', code], cwd=ROOT, capture_output=True, text=True,
                       timeout=300)
  assert out.returncode == 0, out.stderr[-2000:]
  assert out.stdout.strip().splitlines()[-1] == '[]'


# ---------------------------------------------------------------------------------------------
# With ray and submitit (marked extras)


@pytest.fixture(scope='module')
def local_reference(tmp_path_factory):
  """The tiny sweep trained in this process: what every backend must reproduce."""
  base = tmp_path_factory.mktemp('reference')
  cfg = tiny_sweep(str(base / 'cache'))
  cfg.sweep.checkpoints_per_run = 4
  out = sweep_lib.run_sweep(cfg, str(base / 'local'), fit=False)
  assert out['finished'] == 6
  return cfg, rows(str(base / 'local')), str(base / 'cache')


def _same_losses(got: dict, want: dict, names=None):
  """Row for row the same runs and steps, and losses within float noise: the reference trains in
  this process, whose programs the test set-up compiles differently (tests/conftest.py), and the
  backends' runs in worker processes (measured: up to 6e-5 on losses near 3)."""
  names = names or list(want)
  assert [n for n in got if n in names] == [n for n in want if n in names]
  for n in names:
    assert abs(float(got[n]['eval_loss']) - float(want[n]['eval_loss'])) < 2e-4, n
    assert got[n]['steps'] == want[n]['steps']


def _kill_one_task_once(workdir: str, done: dict):
  """In a thread: once some run has a checkpoint saved, SIGKILL the Ray worker process that runs
  it (the pid its node.json names) and its children; records which."""
  deadline = time.time() + 600
  runs = os.path.join(workdir, 'runs')
  while time.time() < deadline and 'victim' not in done:
    for name in sorted(os.listdir(runs)) if os.path.isdir(runs) else []:
      rdir = os.path.join(runs, name)
      ckpt = os.path.join(rdir, 'checkpoints')
      if (os.path.exists(os.path.join(rdir, 'summary.json')) or not os.path.isdir(ckpt)
          or not any(d.isdigit() for d in os.listdir(ckpt))):
        continue
      try:
        with open(os.path.join(rdir, 'node.json')) as f:
          pid = json.load(f)['pid']
        # A lost node takes every process on it: the Ray worker and the training process it
        # started, which then cannot save a checkpoint on the way out.
        children = subprocess.run(['pgrep', '-P', str(pid)], capture_output=True,
                                  text=True).stdout.split()
        for child in children:
          os.kill(int(child), signal.SIGKILL)
        os.kill(pid, signal.SIGKILL)
      except (OSError, ValueError, KeyError):
        continue
      done['victim'] = name
      return
    time.sleep(0.02)


@pytest.mark.extras
def test_ray_sweep_equals_local_and_a_crashed_task_resumes_on_retry(local_reference, tmp_path):
  """sweep.backend=ray on a Ray instance on this machine: the same results.csv as the sweep in one
  process; a task whose Ray worker is killed mid-run is booked lost, retried, and resumes from its
  checkpoint; every run booked once."""
  ray = pytest.importorskip('ray')
  cfg, want, _ = local_reference
  cfg = cfg.copy_and_resolve_references()
  cfg.sweep.backend, cfg.sweep.ray_address = 'ray', 'local'
  cfg.base.train.progress = 'log'   # train.log then shows where each attempt started
  workdir = str(tmp_path / 'ray')
  killed = {}
  thread = threading.Thread(target=_kill_one_task_once, args=(workdir, killed), daemon=True)
  thread.start()
  try:
    out = sweep_lib.run_sweep(cfg, workdir, fit=False)
  finally:
    ray.shutdown()
  thread.join(timeout=5)
  assert out['finished'] == 6 and not out['failed']
  victim = killed['victim']
  got = rows(workdir)
  assert list(got) == list(want)   # every run, once, in plan order
  _same_losses(got, want, [n for n in want if n != victim])
  # The resumed run: bitwise equal in benchmarks/cluster_sweep and on the development machine,
  # but 0.3% off in a fresh CI virtual environment (an open lead: resuming in another process);
  # that it resumed rather than restarted is checked below.
  assert abs(float(got[victim]['eval_loss']) / float(want[victim]['eval_loss']) - 1) < 1e-2
  lost = [f for f in failures(workdir) if f.get('lost')]
  assert [f['run'] for f in lost] == [victim]
  assert 'resuming from step' in open(os.path.join(workdir, 'runs', victim, 'train.log')).read()
  node = json.load(open(os.path.join(workdir, 'runs', victim, 'node.json')))
  assert node['node'] and node['host']


@pytest.mark.extras
def test_slurm_backend_through_submitit_local_executor(local_reference, tmp_path):
  """sweep.backend=slurm with submitit's local executor (no SLURM here): the runs train as jobs
  and equal the sweep in one process."""
  pytest.importorskip('submitit')
  cfg, want, _ = local_reference
  cfg = cfg.copy_and_resolve_references()
  cfg.sweep.backend, cfg.sweep.slurm_executor, cfg.sweep.max_in_flight = 'slurm', 'local', 2
  cfg.sweep.slurm_cpus = 1
  cfg.sweep.only = 'C4e09'
  workdir = str(tmp_path / 'slurm')
  out = sweep_lib.run_sweep(cfg, workdir, fit=False)
  assert out['finished'] == 3 and not out['failed']
  names = [n for n in want if n.startswith('C4e09')]
  _same_losses(rows(workdir), want, names)
  assert os.listdir(os.path.join(workdir, 'slurm'))   # submitit's job folders and logs
  for n in names:   # the job record goes when the job is booked
    assert not os.path.exists(os.path.join(workdir, 'runs', n, cluster_lib.SLURM_JOB))


def test_a_run_stopped_on_its_node_is_lost_not_stopped(tmp_path):
  """Exit status 3 (stopped at a checkpoint) that the driver did not ask for: a time limit's
  warning or preemption on the node, so the run goes again at once."""
  job = runner_lib.Job(0, None, None, str(tmp_path), 1)
  assert cluster_lib._outcome(job, {'code': 3, 'host': 'n1'}, False).kind == 'lost'
  assert cluster_lib._outcome(job, {'code': 3, 'host': 'n1'}, True).kind == 'stopped'
  assert cluster_lib._outcome(job, {'code': None, 'error': 'not visible'}, False).kind == 'lost'


@pytest.mark.extras
def test_slurm_job_script_carries_the_sweep_keys(tmp_path, monkeypatch):
  """sweep.slurm_* through submitit into the sbatch script, against stand-in `srun` and
  `sbatch` commands (no SLURM here) that record the submission; the job id is kept in the run
  folder so that a restarted driver can cancel it."""
  pytest.importorskip('submitit')
  bin_dir = tmp_path / 'bin'
  bin_dir.mkdir()
  (bin_dir / 'srun').write_text('#!/bin/sh\nexit 0\n')
  (bin_dir / 'sbatch').write_text(f'#!/bin/sh\ncp "$1" {tmp_path}/submitted.sh\n'
                                  'echo "Submitted batch job 4242"\n')
  for f in ('srun', 'sbatch'):
    os.chmod(bin_dir / f, 0o755)
  monkeypatch.setenv('PATH', f'{bin_dir}{os.pathsep}{os.environ["PATH"]}')
  cfg = tiny_sweep(str(tmp_path / 'cache'))
  s = cfg.sweep
  s.backend, s.slurm_executor, s.slurm_partition = 'slurm', 'slurm', 'gpu'
  s.slurm_gpus, s.slurm_cpus, s.slurm_time_min = 1, 8, 120
  backend = cluster_lib.make_backend(s, str(tmp_path / 'sweep'))
  sp = plan_lib.plan(s, cfg.base, 259)[0]
  rdir = tmp_path / 'sweep' / 'runs' / sp.name
  rdir.mkdir(parents=True)
  job = runner_lib.Job(0, sp, plan_lib.run_config(cfg.base, sp), str(rdir), 1)
  started = []
  backend.launch(job, lambda j, where: started.append(where))
  script = (tmp_path / 'submitted.sh').read_text()
  for want in ('#SBATCH --partition=gpu', '#SBATCH --gpus-per-node=1', '#SBATCH --time=120',
               '#SBATCH --cpus-per-task=8', '#SBATCH --signal=USR2@120'):
    assert want in script, want
  assert started == ['slurm job']
  assert json.load(open(rdir / cluster_lib.SLURM_JOB))['job_id'] == '4242'
  assert json.load(open(rdir / 'run_config.json'))['train']['steps'] == sp.steps
