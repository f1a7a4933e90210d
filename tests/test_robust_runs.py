"""Runs that end honestly: one writer per folder (lm/lock.py), a failed checkpoint save that stops
the run in one sentence, SIGTERM's own exit status, the divergence message, and a pipeline whose
every stage is checked before the first starts."""
import contextlib
import errno
import json
import os
import re
import signal
import socket
import subprocess
import sys
import time

import orbax.checkpoint as ocp
import pytest

from configs import base
from configs import pipeline as pipeline_config
from configs import sweep_smoke
from lm import lock as lock_lib
from lm import pipeline as pipeline_lib
from lm.errors import UserError
from lm.metrics import read_jsonl
from lm.scaling import sweep as sweep_lib
from lm.stages import pretrain as train_lib
from lm.training import checkpoint as ckpt_lib
from lm.training import loop

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

HOLD = '''
import sys, time
from lm import lock
with lock.hold(sys.argv[1]):
  print('held', flush=True)
  time.sleep(120)
'''


def _holder(folder):
  """A second process that takes `folder`'s lock and keeps it (until killed)."""
  proc = subprocess.Popen([sys.executable, '-c', HOLD, folder], cwd=REPO, stdout=subprocess.PIPE,
                          text=True)
  assert proc.stdout.readline().strip() == 'held'
  return proc


def test_a_second_process_is_refused_and_a_dead_holders_lock_is_taken_over(tmp_path, capsys):
  folder = str(tmp_path / 'run')
  proc = _holder(folder)
  try:
    with open(os.path.join(folder, 'keep.txt'), 'w') as f:
      f.write('the holder\'s work')
    with pytest.raises(UserError) as e:
      lock_lib.acquire(folder)
    text = str(e.value)
    assert f'pid {proc.pid} on host {socket.gethostname()}' in text and 'wait for it' in text
    assert f'delete {folder}/.lock if that process is gone' in text
    assert text.count('. ') == 0 and '\n' not in text   # one sentence
  finally:
    proc.kill()
    proc.wait()
  # Killed outright: its lock stays behind, names a dead pid, and is taken over.
  assert json.load(open(os.path.join(folder, '.lock')))['pid'] == proc.pid
  with lock_lib.hold(folder):
    assert json.load(open(os.path.join(folder, '.lock')))['pid'] == os.getpid()
    with lock_lib.hold(folder):   # a process may take its own folder again
      pass
    assert os.path.exists(os.path.join(folder, '.lock'))
  assert f'took over the lock of {folder} from pid {proc.pid}' in capsys.readouterr().err
  assert not os.path.exists(os.path.join(folder, '.lock'))
  assert open(os.path.join(folder, 'keep.txt')).read() == 'the holder\'s work'


def test_locks_on_another_host_unreadable_or_unwritable_are_refused(tmp_path):
  folder = str(tmp_path / 'run')
  os.makedirs(folder)
  path = os.path.join(folder, '.lock')
  with open(path, 'w') as f:
    json.dump({'host': 'node-17', 'pid': os.getpid() + 1, 'command': 'run.py train',
               'since': time.time()}, f)
  with pytest.raises(UserError, match=r'pid \d+ on host node-17.*cannot be checked from host'):
    lock_lib.acquire(folder)
  with open(path, 'wb') as f:
    f.write(b'\x00\xffgarbage')
  with pytest.raises(UserError, match=f'{path} is not a lock file this program can read'):
    lock_lib.acquire(folder)
  os.remove(path)
  with open(tmp_path / 'file', 'w') as f:
    f.write('x')
  with pytest.raises(UserError, match='exists and is not a folder'):
    lock_lib.acquire(str(tmp_path / 'file'))
  # A holder that died with an exception still releases the folder.
  with pytest.raises(RuntimeError):
    with lock_lib.hold(folder):
      raise RuntimeError('boom')
  assert not os.path.exists(path)


def _tiny_args(cache_dir, steps=20):
  return ['--config=configs/tiny.py', '--config.model.n_layers=1', '--config.model.d_model=32',
          '--config.model.n_heads=2', '--config.model.max_len=32',
          '--config.data.max_bytes=200000', f'--config.data.cache_dir={cache_dir}',
          f'--config.train.steps={steps}', '--config.train.batch_size=4',
          '--config.train.seq_len=32', '--config.train.warmup_steps=2',
          '--config.train.eval_every=1000', '--config.train.checkpoint_every=1000',
          '--config.train.eval_batches=1', '--config.train.log_every=1',
          '--config.train.progress=log']


def test_two_train_processes_on_one_workdir_and_sigterm_exits_3(tmp_path):
  """`run.py train` twice on one workdir: the second is refused in one sentence while the first
  trains on, untouched; SIGTERM then stops the first at a checkpoint with exit status 3."""
  workdir = str(tmp_path / 'run')
  args = [sys.executable, 'run.py', 'train', f'--workdir={workdir}',
          *_tiny_args(str(tmp_path / 'cache'), steps=100_000)]
  first = subprocess.Popen(args, cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                           text=True)
  try:
    deadline = time.time() + 120
    while time.time() < deadline and not os.path.exists(f'{workdir}/.lock'):
      assert first.poll() is None, first.communicate()
      time.sleep(0.05)
    second = subprocess.run(args, cwd=REPO, capture_output=True, text=True, timeout=120)
    assert second.returncode == 2
    lines = second.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith(f'error: {workdir} is in use by another '
                                                   f'process (pid {first.pid} on host')
    while time.time() < deadline and len(read_jsonl(f'{workdir}/metrics.jsonl')) < 2:
      time.sleep(0.05)
    config = open(f'{workdir}/config.json').read()
    steps_before = len(read_jsonl(f'{workdir}/metrics.jsonl'))
    time.sleep(0.3)
    assert len(read_jsonl(f'{workdir}/metrics.jsonl')) > steps_before   # still training
    assert first.poll() is None and open(f'{workdir}/config.json').read() == config
    first.send_signal(signal.SIGTERM)
    out, err = first.communicate(timeout=120)
  finally:
    if first.poll() is None:
      first.kill()
  assert first.returncode == 3, err
  assert 'stopped by SIGTERM before finishing' in err and 'Traceback' not in err
  assert 'checkpoint saved' in out
  assert os.listdir(f'{workdir}/checkpoints') and not os.path.exists(f'{workdir}/summary.json')
  assert not os.path.exists(f'{workdir}/.lock')


class _NoSpace:
  """A commit future whose write fails as on a full disk."""

  def result(self, timeout=None):
    raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))


def small_config(cache_dir, **train):
  c = base.get_config()
  c.model.n_layers, c.model.d_model, c.model.n_heads, c.model.max_len = 1, 32, 2, 32
  c.data.max_bytes, c.data.cache_dir = 200_000, cache_dir
  t = dict(steps=12, batch_size=4, seq_len=32, warmup_steps=2, eval_every=100, eval_batches=1,
           log_every=2, checkpoint_every=4, progress='none')
  for k, v in t.items():
    c.train[k] = v
  for k, v in train.items():
    c.train[k] = v
  return c


@pytest.mark.parametrize('asynchronous', [True, False])
def test_a_failed_save_stops_the_run_and_keeps_the_checkpoint_before_it(tmp_path, monkeypatch,
                                                                        capsys, asynchronous):
  """The disk fills after the first checkpoint: the second save's write fails (in orbax's
  background thread when saving asynchronously). The run stops there in one sentence naming the
  folder and the cause, step 4 stays restorable, the failed step leaves nothing behind, and the
  free-space check warned before the save."""
  saves = []
  real = ocp.StandardCheckpointHandler.async_save

  async def async_save(self, directory, *args, **kwargs):
    futures = await real(self, directory, *args, **kwargs)
    saves.append(str(directory))
    return futures if len(saves) == 1 else list(futures or []) + [_NoSpace()]
  monkeypatch.setattr(ocp.StandardCheckpointHandler, 'async_save', async_save)
  real_usage = ckpt_lib.shutil.disk_usage
  monkeypatch.setattr(ckpt_lib.shutil, 'disk_usage',
                      lambda p: real_usage(p)._replace(free=1000))
  real_batch = train_lib.get_batch

  def slow_batch(run, split, index):   # steps after the failing save take real time, as usual
    if split == 'train' and index >= 8:
      time.sleep(0.3)
    return real_batch(run, split, index)
  monkeypatch.setattr(train_lib, 'get_batch', slow_batch)
  workdir = str(tmp_path / 'run')
  with pytest.raises(UserError) as e:
    train_lib.train(small_config(str(tmp_path / 'cache'), async_checkpoint=asynchronous), workdir)
  ckpt_dir = os.path.join(workdir, 'checkpoints')
  assert str(e.value) == (
      f'The checkpoint of step 8 could not be written into {ckpt_dir} (No space left on device), '
      'so the run stopped; the checkpoint of step 4 is intact and a rerun resumes from it once '
      'the disk has space (or the folder is writable again).')
  assert sorted(os.listdir(ckpt_dir)) == ['4']
  params, step = ckpt_lib.restore_subtree(ckpt_dir)
  assert step == 4 and params
  assert not os.path.exists(f'{workdir}/summary.json') and not os.path.exists(f'{workdir}/.lock')
  out = capsys.readouterr().out
  assert 'checkpoint of step 8 may not fit' in out and 'Traceback' not in out
  # Noticed at the next steps, not at the end (step 12).
  assert max(r['step'] for r in read_jsonl(f'{workdir}/metrics.jsonl')) <= 10


def test_the_divergence_message_says_what_exists_and_what_a_rerun_does(tmp_path):
  class Ckpts:
    directory = '/r/checkpoints'

    def __init__(self, steps):
      self._steps = steps

    def wait(self):
      pass

    def steps(self):
      return self._steps

  stage = loop.Stage.__new__(loop.Stage)
  stage.resumable_changes = loop.RESUMABLE_CHANGES
  d = loop._Diverged(7, 'loss', float('nan'), '')
  assert loop._diverged(d, stage, Ckpts([])) == (
      'The loss became nan at step 7; no checkpoint was saved before it; a rerun with the same '
      'settings starts again from step 0 on the same batches and will likely diverge again, and '
      'this folder refuses a changed train.lr or train.warmup_steps as a different config, so '
      'start a new --workdir with a lower train.lr or more train.warmup_steps.')
  text = loop._diverged(d, stage, Ckpts([5]))
  assert 'the checkpoint of step 5 (saved before it) is in /r/checkpoints' in text
  assert 'starts again from step 5' in text
  # What the message promises: the folder refuses a changed lr.
  cfg = base.get_config().to_dict()
  other = json.loads(json.dumps(cfg))
  other['train']['lr'] /= 10
  assert 'train.lr' not in loop.RESUMABLE_CHANGES
  with pytest.raises(UserError, match='train.lr'):
    loop.check_resumable(cfg, other)
  stage.resumable_changes = loop.RESUMABLE_CHANGES + ('train.lr',)
  assert loop._diverged(d, stage, Ckpts([5])).endswith(
      'lower train.lr and rerun the same command to resume from step 5.')


def test_a_sweep_or_pipeline_folder_in_use_is_refused_before_any_work(tmp_path):
  for name in ('sweep', 'pipeline'):
    folder = str(tmp_path / name)
    proc = _holder(folder)
    try:
      with pytest.raises(UserError, match=f'{folder} is in use by another process .pid '
                                          f'{proc.pid}'):
        if name == 'sweep':
          sweep_lib.run_sweep(sweep_smoke.get_config(), folder, fit=False)
        else:
          pipeline_lib.run_pipeline(pipeline_config.get_config(), folder, log=lambda *_: None)
      assert os.listdir(folder) == ['.lock']
    finally:
      proc.kill()
      proc.wait()


def test_pipeline_checks_every_stage_before_the_first_starts(tmp_path):
  """A misspelt key in the last stage (DPO) or a bad value in PPO: refused at once, before any
  folder exists."""
  workdir = str(tmp_path / 'pipe')
  cfg = pipeline_config.get_config()
  with cfg.dpo.dpo.unlocked():
    cfg.dpo.dpo.betta = 0.2
  with pytest.raises(UserError, match='betta'):
    pipeline_lib.run_pipeline(cfg, workdir, log=lambda *_: None)
  cfg = pipeline_config.get_config()
  cfg.ppo.ppo.minibatch = 7
  with pytest.raises(UserError, match=r'^in the ppo stage \(--config.ppo.\*\): .*ppo.minibatch=7'):
    pipeline_lib.run_pipeline(cfg, workdir, log=lambda *_: None)
  cfg = pipeline_config.get_config()
  cfg.sft.train.init_from = 'runs/x'
  with pytest.raises(UserError, match='leave train.init_from empty'):
    pipeline_lib.run_pipeline(cfg, workdir, log=lambda *_: None)
  assert not os.path.exists(workdir)
  good = pipeline_config.get_config()
  pipeline_lib.validate_stages(good, pipeline_lib.stage_configs(good, workdir))   # no refusal


def test_a_run_stopped_by_sigterm_is_no_failed_attempt(tmp_path):
  """A sweep preempted more often than sweep.max_attempts does not give up on its runs: a run
  started and then stopped at a checkpoint gets its attempt back; a failed one keeps it."""
  from lm.scaling import plan as plan_lib
  from lm.scaling import runner as runner_lib
  c = sweep_smoke.get_config()
  specs = plan_lib.plan(c.sweep, c.base, 256)[:2]
  cfgs = [plan_lib.run_config(c.base, sp) for sp in specs]
  book = runner_lib.Booking(str(tmp_path), specs, cfgs, c.base, 1.0)
  jobs = runner_lib.pending_jobs(book, max_attempts=1)
  assert [j.attempt for j in jobs] == [1, 1]
  for j in jobs:
    book.start(j)
  book.done(jobs[1], None, 'UserError: bad')
  book.stopped()
  again = runner_lib.pending_jobs(runner_lib.Booking(str(tmp_path), specs, cfgs, c.base, 1.0), 1)
  assert [j.spec.name for j in again] == [jobs[0].spec.name]   # the failed one is not retried


def test_a_full_disk_under_the_metrics_stops_the_run_in_one_sentence(tmp_path, monkeypatch):
  from lm import metrics as metrics_lib
  real = metrics_lib.MetricsWriter.write

  def write(self, row):
    if row['step'] >= 6:
      raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
    real(self, row)
  monkeypatch.setattr(metrics_lib.MetricsWriter, 'write', write)
  workdir = str(tmp_path / 'run')
  with pytest.raises(UserError, match=re.escape(
      f'writing into {workdir} failed (No space left on device), so the run stopped; the '
      'checkpoint of step 4 is intact and a rerun resumes from it')):
    train_lib.train(small_config(str(tmp_path / 'cache')), workdir)
  assert not os.path.exists(f'{workdir}/.lock')


@contextlib.contextmanager
def held_by_another_process(folder):
  """`folder`'s lock held by a live second process for the block."""
  root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
  other = subprocess.Popen([sys.executable, '-c', 'import time; from lm import lock; '
                            f'lock.acquire({str(folder)!r}); print("held", flush=True); '
                            'time.sleep(60)'], cwd=root, stdout=subprocess.PIPE, text=True)
  try:
    assert other.stdout.readline().strip() == 'held'
    yield
  finally:
    other.kill()
    other.wait()


def test_a_stage_holds_its_folder_before_the_loop_starts(tmp_path):
  """Fine-tuning (base_eval.json), reward and DPO (sampled pairs) write before their loop runs:
  a folder another live process holds is refused before any of it."""
  from configs import dpo as dpo_cfg
  from lm.align import dpo as dpo_lib
  held = tmp_path / 'dpo'
  c = dpo_cfg.get_config()
  c.dpo.init_from = str(tmp_path / 'never_read')
  with held_by_another_process(held):
    with pytest.raises(UserError, match='is in use by another process'):
      dpo_lib.train_dpo(c, str(held))
    assert sorted(os.listdir(held)) == ['.lock']


def test_import_and_export_never_replace_a_folder_in_use(tmp_path):
  """--overwrite replaces a finished folder, never one a live process holds."""
  from lm.interop import hf
  out = tmp_path / 'out'
  with held_by_another_process(out):
    with pytest.raises(UserError, match='is in use by another process'):
      hf._check_out(str(out), True, '--out')
  hf._check_out(str(out), True, '--out')   # its holder is gone: the stale lock is taken over
  assert not os.path.exists(out / '.lock')
