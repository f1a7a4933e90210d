"""Sweeps: the plan (budgets, centring, D from C), atomic results, skip / resume / retry, end to end."""
import csv
import dataclasses
import glob
import json
import math
import os
import re
import shutil
import time

import numpy as np
import pytest

from configs import sweep_smoke
from lm.data import tokens as data_lib
from lm.stages import pretrain as train_lib
from lm.errors import UserError
from lm.metrics import read_jsonl
from lm.scaling import plan as plan_lib
from lm.scaling import results as results_lib
from lm.scaling import runner as runner_lib
from lm.scaling import sweep as sweep_lib
from lm.data.tokenizer import ByteTokenizer

BYTES_VOCAB = ByteTokenizer().vocab_size   # what the sweeps' byte corpus runs with (chat tokens in)


def tiny_sweep(cache_dir, budgets=(4e9, 1.2e10)):
  c = sweep_smoke.get_config()
  b = c.base
  b.data.max_bytes, b.data.cache_dir = 300_000, cache_dir
  b.model.max_len = 64
  b.train.batch_size, b.train.seq_len, b.train.eval_batches = 8, 64, 2
  b.train.progress = 'none'
  s = c.sweep
  s.budgets, s.sizes_per_budget, s.span = tuple(budgets), 3, 3.0
  s.head_dim, s.aspect, s.bootstrap, s.max_attempts = 8, 16.0, 10, 2
  s.evals_per_run, s.checkpoints_per_run = 1, 1
  s.tokens_per_param = 20.0
  return c


def test_isoflop_plan_is_centred_and_spends_the_budget():
  c = sweep_smoke.get_config()
  specs = plan_lib.plan(c.sweep, c.base, BYTES_VOCAB)
  tokens_per_step = c.base.train.batch_size * c.base.train.seq_len
  assert len(specs) == 10
  for C in c.sweep.budgets:
    runs = [s for s in specs if s.budget == C]
    assert len(runs) == 5
    # The predicted optimum in the count that spends the budget: C = FLOPs-per-token(N) D with
    # D = tokens_per_param N, FLOPs per token per parameter taken from the middle shape.
    mid = runs[len(runs) // 2]
    n_star = math.sqrt(C / (mid.flops_per_token / mid.params * c.sweep.tokens_per_param))
    n = np.array([s.params for s in runs])
    # Centred on it (geometric mean) and spanning about N*/4 .. 4 N*; the 6ND centre, 15-25% off
    # at these sizes, is not.
    centre = np.exp(np.log(n).mean())
    assert abs(math.log(centre / n_star)) < math.log(1.08)
    assert centre < 0.9 * math.sqrt(C / (6 * c.sweep.tokens_per_param))
    assert n.min() < n_star / 2.5 and n.max() > n_star * 2.5
    assert list(n) == sorted(n)
    for s in runs:   # D = C / FLOPs-per-token, up to rounding to whole steps
      spent = s.steps * tokens_per_step * s.flops_per_token
      assert abs(spent / C - 1) < max(0.01, 1 / s.steps)
      assert 0.25 <= (s.d_model / s.n_layers) / c.sweep.aspect <= 4
      assert s.d_model % c.sweep.head_dim == 0 and s.n_heads == s.d_model // c.sweep.head_dim
  # Wider models get smaller learning rates by the documented rule.
  by_width = sorted({(s.d_model, s.lr) for s in specs})
  assert all(a[1] >= b[1] for a, b in zip(by_width, by_width[1:]))


def test_grid_plan():
  c = sweep_smoke.get_config()
  c.sweep.mode = 'grid'
  c.sweep.grid_params, c.sweep.grid_tokens = (5e4, 2e5), (1e6, 4e6)
  specs = plan_lib.plan(c.sweep, c.base, BYTES_VOCAB)
  assert len(specs) == 4 and all(s.budget is None for s in specs)
  steps = sorted(s.steps for s in specs)
  tokens_per_step = c.base.train.batch_size * c.base.train.seq_len
  assert steps[0] == round(1e6 / tokens_per_step) and steps[-1] == round(4e6 / tokens_per_step)


def test_results_csv_is_written_atomically(tmp_path, monkeypatch):
  path = str(tmp_path / 'results.csv')
  results_lib.write_results(path, [{'run': 'a', 'params': 1, 'tokens': 2, 'loss': 3.0}])
  before = open(path).read()

  class Boom(csv.DictWriter):
    def writerow(self, row):
      raise OSError('disk full')
  monkeypatch.setattr(results_lib.csv, 'DictWriter', Boom)
  with pytest.raises(OSError):
    results_lib.write_results(path, [{'run': 'b', 'params': 1, 'tokens': 2, 'loss': 3.0}])
  assert open(path).read() == before


def test_runner_skips_retries_and_resumes(tmp_path, capsys):
  """A fake trainer whose first run fails once: the rerun trains only that run, then nothing."""
  cfg = tiny_sweep(str(tmp_path / 'cache'))
  workdir = str(tmp_path / 'sweep')
  calls = []
  flaky = {'fail': None, 'failed_once': False}

  def fake_train(run_cfg, rdir):
    name = os.path.basename(rdir)
    calls.append(name)
    if flaky['fail'] is None:
      flaky['fail'] = name
    if name == flaky['fail'] and not flaky['failed_once']:
      flaky['failed_once'] = True
      raise RuntimeError('device lost')
    n = run_cfg.model.d_model * 100
    return {'finished': True, 'params': n, 'params_nonembed': n // 2, 'final_loss': 3.0,
            'eval_loss': 3.0 + 1e5 / n, 'tokens': run_cfg.train.steps * 128,
            'flops': 6.0 * n * run_cfg.train.steps * 128,
            'flops_6nd': 6.0 * n * run_cfg.train.steps * 128, 'steps': run_cfg.train.steps}

  out = sweep_lib.run_sweep(cfg, workdir, train_fn=fake_train, fit=False)
  n_runs = len(calls)
  assert f'sweep: {n_runs - 1}/{n_runs} runs' in capsys.readouterr().out
  assert out['finished'] == n_runs - 1 and out['failed'] == [flaky['fail']]
  failures = [json.loads(l) for l in open(f'{workdir}/failures.jsonl')]
  assert failures[0]['run'] == flaky['fail'] and 'device lost' in failures[0]['error']
  with open(f'{workdir}/results.csv') as f:
    assert len(list(csv.DictReader(f))) == n_runs - 1
  # Second invocation: only the failed run is trained again.
  calls.clear()
  out = sweep_lib.run_sweep(cfg, workdir, train_fn=fake_train, fit=False)
  assert calls == [flaky['fail']] and out['finished'] == n_runs and not out['failed']
  # Third: nothing left to do.
  calls.clear()
  sweep_lib.run_sweep(cfg, workdir, train_fn=fake_train, fit=False)
  assert calls == []


def _fake_train(calls):
  def train(run_cfg, rdir):
    calls.append(os.path.basename(rdir))
    n = run_cfg.model.d_model * 100
    return {'finished': True, 'params': n, 'params_nonembed': n // 2, 'final_loss': 3.0,
            'eval_loss': 3.0 + 1e5 / n, 'tokens': run_cfg.train.steps * 128,
            'flops': 6.0 * n * run_cfg.train.steps * 128,
            'flops_6nd': 6.0 * n * run_cfg.train.steps * 128, 'steps': run_cfg.train.steps}
  return train


def test_changed_plan_is_refused_naming_the_changed_keys(tmp_path):
  """Rerunning a sweep folder under another lr (or batch, data, ...) must not book the old runs'
  losses as the new plan's: it is refused before anything trains, and nothing is rewritten."""
  cfg = tiny_sweep(str(tmp_path / 'cache'), budgets=(4e9,))
  workdir = str(tmp_path / 'sweep')
  calls = []
  sweep_lib.run_sweep(cfg, workdir, train_fn=_fake_train(calls), fit=False)
  assert calls
  before = open(f'{workdir}/results.csv').read()
  plan_before = open(f'{workdir}/sweep.json').read()
  for key, value, needle in (('lr', cfg.sweep.lr * 2, 'train.lr'),
                             ('batch', 4, 'train.batch_size'),
                             ('eval_rows', 32, 'train.eval_batches 2 -> 4')):
    changed = tiny_sweep(str(tmp_path / 'cache'), budgets=(4e9,))
    if key == 'batch':
      changed.base.train.batch_size = value
    else:
      changed.sweep[key] = value
    calls.clear()
    with pytest.raises(UserError, match=needle.replace('.', r'\.')):
      sweep_lib.run_sweep(changed, workdir, train_fn=_fake_train(calls), fit=False)
    assert calls == [] and open(f'{workdir}/results.csv').read() == before
    assert open(f'{workdir}/sweep.json').read() == plan_before
  # An added budget keeps the finished runs and trains only the new ones.
  grown = tiny_sweep(str(tmp_path / 'cache'), budgets=(4e9, 1.2e10))
  calls.clear()
  out = sweep_lib.run_sweep(grown, workdir, train_fn=_fake_train(calls), fit=False)
  assert calls and all(name.startswith('C1.2e10') for name in calls)
  assert out['finished'] == len(json.load(open(f'{workdir}/sweep.json'))['runs'])


def test_sweep_progress_line():
  line = runner_lib.progress_line(4, 10, 1e13, 4e13, 6e12, 200.0)
  assert line == 'sweep: 4/10 runs, 1e+13 of 4e+13 FLOPs (25%), 3e+10 FLOP/s, eta 17 min'
  assert runner_lib.progress_line(0, 3, 0.0, 1e12, 0.0, 0.0).endswith('0 FLOP/s, eta unknown')


def test_run_names_are_unique_for_close_budgets():
  """1.5e13 and 2e13 once shared the tag C2e13 and one budget's runs were silently dropped."""
  c = sweep_smoke.get_config()
  c.sweep.budgets = (1.5e13, 2e13)
  specs = plan_lib.plan(c.sweep, c.base, BYTES_VOCAB)
  assert len({s.name for s in specs}) == len(specs) == 2 * c.sweep.sizes_per_budget
  assert {s.budget for s in specs} == {1.5e13, 2e13}
  assert any(s.name.startswith('C1.5e13_') for s in specs)
  c.sweep.mode = 'grid'
  c.sweep.grid_params, c.sweep.grid_tokens = (5e4,), (1.2e6, 1.25e6)
  assert len({s.name for s in plan_lib.plan(c.sweep, c.base, BYTES_VOCAB)}) == 2


@pytest.mark.parametrize('key,value,needle', [
    ('budgets', (-1.0,), 'sweep.budgets=(-1.0,) must be a non-empty tuple of positive numbers'),
    ('budgets', (), 'sweep.budgets=() must be'),
    ('sizes_per_budget', 0, 'sweep.sizes_per_budget=0 must be a positive integer'),
    ('span', 0.5, 'sweep.span=0.5 must be at least 1'),
    ('span', float('nan'), 'sweep.span=nan must be a positive number'),
    ('tokens_per_param', 0.0, 'sweep.tokens_per_param=0.0 must be a positive number'),
    ('aspect', -2.0, 'sweep.aspect=-2.0 must be a positive number'),
    ('head_dim', 0, 'sweep.head_dim=0 must be a positive integer'),
    ('seeds', 0, 'sweep.seeds=0 must be a positive integer'),
    ('parallel', -1, 'sweep.parallel=-1 must be 0 (as many runs at once'),
    ('batch_sizes', (16, 0), 'sweep.batch_sizes=(16, 0) must be a non-empty tuple'),
    ('min_steps', 0, 'sweep.min_steps=0 must be a positive integer'),
    ('min_layers', 0, 'sweep.min_layers=0 must be a positive integer'),
    ('aspect_band', 0.5, 'sweep.aspect_band=0.5 must be at least 1'),
    ('mode', 'diagonal', "sweep.mode='diagonal' is not known"),
    ('eval_rows', -8, 'sweep.eval_rows=-8 must be a non-negative integer'),
])
def test_every_sweep_key_is_validated_before_planning(tmp_path, key, value, needle):
  c = sweep_smoke.get_config()
  with c.sweep.unlocked():
    c.sweep[key] = value
  with pytest.raises(UserError, match=re.escape(needle)):
    plan_lib.plan(c.sweep, c.base, BYTES_VOCAB)
  with pytest.raises(UserError):
    sweep_lib.run_sweep(c, str(tmp_path / 'sw'), train_fn=lambda *a: None, fit=False)
  assert not (tmp_path / 'sw').exists()


def test_runner_gives_up_after_max_attempts(tmp_path):
  cfg = tiny_sweep(str(tmp_path / 'cache'), budgets=(4e9,))

  def always_fails(run_cfg, rdir):
    raise RuntimeError('broken')
  workdir = str(tmp_path / 'sweep')
  for _ in range(3):
    out = sweep_lib.run_sweep(cfg, workdir, train_fn=always_fails, fit=False)
  n_runs = len(json.load(open(f'{workdir}/sweep.json'))['runs'])
  lines = open(f'{workdir}/failures.jsonl').read().splitlines()
  assert len(lines) == n_runs * 2       # max_attempts=2 per run, then no more tries
  assert len(out['failed']) == n_runs


def test_tiny_sweep_end_to_end(tmp_path):
  """Real training: results.csv, fit.json and the plots; an interrupted run resumes."""
  cfg = tiny_sweep(str(tmp_path / 'cache'))
  workdir = str(tmp_path / 'sweep')
  interrupted = []

  def stop_first_once(run_cfg, rdir):
    if not interrupted:
      interrupted.append(rdir)
      return train_lib.train(run_cfg, rdir, stop_at=max(1, run_cfg.train.steps // 2))
    return train_lib.train(run_cfg, rdir)

  assert sweep_lib.run_sweep(cfg, workdir, train_fn=stop_first_once) == {'stopped': True}
  assert glob.glob(f'{interrupted[0]}/checkpoints/*')
  out = sweep_lib.run_sweep(cfg, workdir, train_fn=stop_first_once)
  n_runs = len(json.load(open(f'{workdir}/sweep.json'))['runs'])
  assert n_runs >= 5 and out['finished'] == n_runs and not out['failed']
  rows = list(csv.DictReader(open(f'{workdir}/results.csv')))
  assert len(rows) == n_runs
  for col in ('run', 'params', 'params_nonembed', 'tokens', 'flops', 'flops_6nd', 'final_loss',
              'eval_loss', 'n_layers', 'd_model', 'lr', 'seed'):
    assert all(r[col] != '' for r in rows), col
  for r in rows:   # Kaplan's convention beside the others: 6 N_nonembed D
    assert float(r['flops_6nd_nonembed']) == pytest.approx(
        6 * float(r['params_nonembed']) * float(r['tokens']), rel=1e-9)
    assert float(r['flops_6nd_nonembed']) < float(r['flops_6nd'])
  fit = json.load(open(f'{workdir}/fit.json'))
  assert len(fit['approach2']['budgets']) == 2
  assert fit['approach1'] is not None
  # `run.py fit` on the sweep's results.csv finds the same training curves beside it.
  beside = sweep_lib.curves_beside(f'{workdir}/results.csv')
  assert beside == json.load(open(f'{workdir}/curves.json'))
  assert sweep_lib.curves_beside(str(tmp_path / 'elsewhere.csv')) is None
  # A copy of the results with the saved curves.json (no run folders) still has them.
  copied = tmp_path / 'copied'
  copied.mkdir()
  for name in ('results.csv', 'curves.json'):
    shutil.copy(f'{workdir}/{name}', copied / name)
  assert sweep_lib.curves_beside(str(copied / 'results.csv')) == beside
  os.remove(copied / 'curves.json')
  assert sweep_lib.curves_beside(str(copied / 'results.csv')) is None
  pngs = glob.glob(f'{workdir}/*.png')
  assert len(pngs) >= 4 and all(os.path.getsize(p) > 10_000 for p in pngs)
  assert os.path.exists(f'{workdir}/report.md')


def test_device_slots_split_cores_and_gpus(monkeypatch):
  from lm.errors import UserError
  from lm.scaling import parallel as par
  cpu = par.device_slots(2, 'cpu', 1, cpus=[0, 1, 2, 3])
  assert [s.env['LM_WORKER_CPUS'] for s in cpu] == ['0,1', '2,3']
  assert [s.env['LM_WORKER_CPUS'] for s in par.device_slots(3, 'cpu', 1, cpus=[0, 1, 2, 3])] \
      == ['0,1', '2', '3']
  monkeypatch.delenv('CUDA_VISIBLE_DEVICES', raising=False)
  gpu = par.device_slots(2, 'gpu', 8)
  assert [s.env['CUDA_VISIBLE_DEVICES'] for s in gpu] == ['0,1,2,3', '4,5,6,7']
  for args, words in [((3, 'cpu', 1, [0, 1]), 'at most 2'), ((9, 'gpu', 8), 'at most 8'),
                      ((2, 'tpu', 4), 'sweep.parallel=1')]:
    with pytest.raises(UserError, match=words):
      par.device_slots(*args)
  monkeypatch.setenv('CUDA_VISIBLE_DEVICES', '3,5,6')   # only these are ours: 2 slots of 1
  assert [s.env['CUDA_VISIBLE_DEVICES'] for s in par.device_slots(2, 'gpu', 3)] == ['3', '5']


@pytest.mark.slow   # about a minute: the default suite keeps the single-worker SIGTERM test
def test_parallel_sweep_stops_on_sigterm_resumes_and_matches_in_process(tmp_path):
  """sweep.parallel=2: two worker processes (one CPU core each here). SIGTERM to the sweep while
  the longest run trains: every worker stops at a checkpoint, nothing is booked as failed, and
  the rerun finishes the sweep; a run's losses equal the same run trained in this process."""
  import signal
  import threading
  cfg = tiny_sweep(str(tmp_path / 'cache'), budgets=(1e11,))
  cfg.sweep.parallel = 2
  cfg.sweep.checkpoints_per_run = 4
  cfg.base.train.progress = 'log'   # the worker's train.log then says when it resumes
  workdir = str(tmp_path / 'sweep')
  specs = plan_lib.plan(cfg.sweep, cfg.base, BYTES_VOCAB)
  longest = f'{workdir}/runs/{specs[0].name}'   # in the first pair to start; most steps
  assert specs[0].steps == max(s.steps for s in specs) and len(specs) == 3

  def term_when_training():
    deadline = time.time() + 120
    while time.time() < deadline and not read_jsonl(f'{longest}/metrics.jsonl'):
      time.sleep(0.02)
    os.kill(os.getpid(), signal.SIGTERM)
  threading.Thread(target=term_when_training, daemon=True).start()
  assert sweep_lib.run_sweep(cfg, workdir, fit=False) == {'stopped': True}
  assert glob.glob(f'{longest}/checkpoints/*') and not os.path.exists(f'{longest}/summary.json')
  assert not os.path.exists(f'{workdir}/failures.jsonl')

  out = sweep_lib.run_sweep(cfg, workdir, fit=False)
  assert out['finished'] == 3 and not out['failed']
  assert 'resuming from step' in open(f'{longest}/train.log').read()
  rows = {r['run']: r for r in csv.DictReader(open(f'{workdir}/results.csv'))}
  assert [r for r in rows] == [s.name for s in specs]          # plan order, whatever finished first
  assert int(rows[specs[0].name]['steps']) == specs[0].steps

  sp = specs[-1]
  ref = train_lib.train(plan_lib.run_config(cfg.base, sp, cfg.sweep.evals_per_run,
                                             cfg.sweep.checkpoints_per_run),
                        str(tmp_path / 'ref'))
  assert abs(float(rows[sp.name]['eval_loss']) - ref['eval_loss']) < 1e-5


def test_parallel_worker_failure_is_booked_with_its_message(tmp_path):
  """A worker that exits on bad input: the sweep books a failure that quotes its last line."""
  from lm.scaling import parallel as par
  cfg = tiny_sweep(str(tmp_path / 'cache'), budgets=(4e9,))
  sp = plan_lib.plan(cfg.sweep, cfg.base, BYTES_VOCAB)[0]
  run_cfg = plan_lib.run_config(cfg.base, sp)
  run_cfg.train.warmup_steps = run_cfg.train.steps + 1      # refused before any training
  job = runner_lib.Job(0, sp, run_cfg, str(tmp_path / 'run'), attempt=1)
  os.makedirs(job.rdir)
  booked = []
  stopped = par.run_jobs([job], par.LocalSlots([par.Slot('cpu', {})]),
                         start=lambda j, where: None,
                         done=lambda j, summary, error=None: booked.append((summary, error)))
  assert not stopped and len(booked) == 1
  summary, error = booked[0]
  assert summary is None and 'status 2' in error and 'warmup' in error


def test_runs_start_from_each_budgets_middle():
  """Within a budget the sizes nearest the predicted optimum train first, smaller budgets before
  larger ones: a sweep stopped part-way has bracketed its minima."""
  c = sweep_smoke.get_config()
  specs = plan_lib.plan(c.sweep, c.base, BYTES_VOCAB)
  order = sorted(specs, key=lambda sp: runner_lib.priority(specs, sp))
  for C, runs in [(C, [s for s in specs if s.budget == C]) for C in c.sweep.budgets]:
    got = [s for s in order if s.budget == C]
    assert [runs.index(s) for s in got] == [2, 1, 3, 0, 4]
  assert [s.budget for s in order] == sorted(s.budget for s in specs)


def test_worker_stops_at_a_checkpoint_when_the_sweep_is_killed(tmp_path):
  """SIGKILL to the sweep process leaves no orphan: its worker gets SIGTERM from the kernel and
  stops at a checkpoint (that a rerun resumes from is tested in test_train)."""
  import signal
  import subprocess
  import sys
  cfg = tiny_sweep(str(tmp_path / 'cache'), budgets=(1e11,))
  cfg.base.train.progress = 'log'
  sp = plan_lib.plan(cfg.sweep, cfg.base, BYTES_VOCAB)[0]
  job_cfg = plan_lib.run_config(cfg.base, sp)
  rdir = str(tmp_path / 'run')
  os.makedirs(rdir)
  with open(tmp_path / 'job.json', 'w') as f:
    f.write(job_cfg.to_json())
  script = f'''
import json, ml_collections
from lm.scaling import parallel, plan, runner
cfg = ml_collections.ConfigDict(json.load(open({str(tmp_path / 'job.json')!r})))
job = runner.Job(0, plan.RunSpec(**{json.dumps(dataclasses.asdict(sp))}), cfg, {rdir!r}, 1)
parallel.run_jobs([job], parallel.LocalSlots([parallel.Slot('cpu', {{}})]), lambda j, w: None,
                  lambda *a: None)
'''
  sweep_proc = subprocess.Popen([sys.executable, '-c', script], cwd=os.path.dirname(
      os.path.dirname(os.path.abspath(__file__))))
  deadline = time.time() + 120
  while time.time() < deadline and not read_jsonl(f'{rdir}/metrics.jsonl'):
    time.sleep(0.05)
  assert read_jsonl(f'{rdir}/metrics.jsonl'), 'the worker never started training'
  sweep_proc.send_signal(signal.SIGKILL)
  sweep_proc.wait()
  while time.time() < deadline and 'checkpoint saved' not in open(f'{rdir}/train.log').read():
    time.sleep(0.1)
  assert 'checkpoint saved' in open(f'{rdir}/train.log').read()
  saved = [int(os.path.basename(p)) for p in glob.glob(f'{rdir}/checkpoints/*')]
  assert saved and 0 < max(saved) < sp.steps and not os.path.exists(f'{rdir}/summary.json')


def test_wsd_branches_equal_standalone_runs_and_are_booked_once(tmp_path):
  """sweep.mode=wsd: per size, one trunk at the longest token count and a branch per shorter
  one that leaves it where its cooldown begins. A branch ends bitwise where a standalone WSD run
  of its length ends; rerunning the sweep trains nothing and books each run once; Approach 1's
  curve per size goes through the branches' final losses."""
  cfg = tiny_sweep(str(tmp_path / 'cache'))
  s = cfg.sweep
  s.mode, s.grid_params, s.grid_tokens, s.cooldown = 'wsd', (6e4,), (12_288, 24_576, 49_152), 0.25
  s.warmup_max, s.evals_per_run, s.checkpoints_per_run = 4, 1, 1
  specs = plan_lib.plan(s, cfg.base, BYTES_VOCAB)
  assert [sp.steps for sp in specs] == [24, 48, 96]
  trunk = specs[-1]
  assert [sp.trunk for sp in specs] == [trunk.name, trunk.name, '']
  assert [sp.branch_step for sp in specs[:2]] == [18, 36]
  assert len({sp.warmup_steps for sp in specs}) == 1
  calls = []

  def counting_train(run_cfg, rdir, stop_at=None):
    calls.append((os.path.basename(rdir), stop_at))
    return train_lib.train(run_cfg, rdir, stop_at=stop_at)
  workdir = str(tmp_path / 'sweep')
  out = sweep_lib.run_sweep(cfg, workdir, train_fn=counting_train, fit=False)
  assert out['finished'] == 3
  # The trunk is trained in pieces: to each branch point, then to its end.
  assert [c for c in calls if c[0] == trunk.name] == [(trunk.name, 18), (trunk.name, 36),
                                                       (trunk.name, None)]
  alone = str(tmp_path / 'alone')
  summary = train_lib.train(plan_lib.run_config(cfg.base, specs[1], 1, 1), alone)
  branch = json.load(open(f'{workdir}/runs/{specs[1].name}/summary.json'))
  assert branch['final_loss'] == summary['final_loss'] and branch['eval_loss'] == summary['eval_loss']
  # ... and it trained only its cooldown: its rows up to the branch point are the trunk's own
  # (same wall-clock stamps), after it they are new.
  b_rows = read_jsonl(f'{workdir}/runs/{specs[1].name}/metrics.jsonl')
  t_rows = {r['step']: r for r in read_jsonl(f'{workdir}/runs/{trunk.name}/metrics.jsonl')}
  early = [r for r in b_rows if r['step'] <= 36]
  assert early and all(r['time'] == t_rows[r['step']]['time'] for r in early)
  assert all(r['time'] > early[-1]['time'] for r in b_rows if r['step'] > 36)
  rows = list(csv.DictReader(open(f'{workdir}/results.csv')))
  assert [r['run'] for r in rows] == [sp.name for sp in specs]
  calls.clear()
  sweep_lib.run_sweep(cfg, workdir, train_fn=counting_train, fit=False)
  assert calls == [] and len(list(csv.DictReader(open(f'{workdir}/results.csv')))) == 3
  curves = results_lib.wsd_curves([(sp, json.load(open(f'{workdir}/runs/{sp.name}/summary.json')))
                                 for sp in specs])
  (curve,) = curves.values()
  assert curve['curve_tokens'] == [sp.steps * 8 * 64 for sp in specs]
  assert curve['curve_loss'] == [float(r['eval_loss']) for r in rows]


def assert_batch_rule(sp, seq_len, floor, largest, smallest=None):
  """The batch rule for one planned run: at least `floor` steps (unless it already has the
  `smallest` batch); the largest batch that keeps the floor, as doubling it would break it; and
  the budget still what the run spends."""
  assert sp.steps >= floor or sp.batch_size == smallest
  tokens = sp.budget / sp.flops_per_token
  assert sp.batch_size == largest or tokens / (2 * sp.batch_size * seq_len) < floor
  assert abs(sp.steps * sp.batch_size * seq_len * sp.flops_per_token / sp.budget - 1) < 1 / sp.steps


def test_batch_rule_keeps_every_run_above_the_step_floor_and_shapes_in_band():
  c = sweep_smoke.get_config()
  s = c.sweep
  with s.unlocked():
    s.budgets, s.span, s.head_dim, s.aspect = (5e11, 1.5e12, 4.5e12), 3.0, 8, 16.0
    s.aspect_band, s.min_layers = 2.0, 2
    s.batch_sizes, s.min_steps = (8, 16, 32, 64, 128), 400
  specs = plan_lib.plan(s, c.base, BYTES_VOCAB)
  T = c.base.train.seq_len
  for sp in specs:
    assert sp.n_layers >= 2 and 0.5 <= (sp.d_model / sp.n_layers) / 16.0 <= 2.0
    assert_batch_rule(sp, T, floor=400, largest=128)
    assert plan_lib.run_config(c.base, sp).train.batch_size == sp.batch_size
  assert len({sp.batch_size for sp in specs}) > 2      # small models take the large batches
  # Without a ladder the base config's batch holds for every run, as before.
  with s.unlocked():
    del s['batch_sizes']
  assert {plan_lib.spec_batch(sp, c.base) for sp in plan_lib.plan(s, c.base, BYTES_VOCAB)} \
      == {c.base.train.batch_size}


def test_runs_of_different_batches_are_scored_on_the_same_windows(tmp_path):
  """The batch rule gives runs of one sweep batches 2, 4 and 8; each still evaluates on the same
  sweep.eval_rows validation windows (eval_batches = eval_rows / batch), so their losses compare.
  A count that some batch does not divide is refused before anything is written."""
  c = tiny_sweep(str(tmp_path / 'cache'))
  s = c.sweep
  s.batch_sizes, s.min_steps, s.eval_rows = (2, 4, 8), 150, 24
  specs = plan_lib.plan(s, c.base, BYTES_VOCAB)
  assert {sp.batch_size for sp in specs} == {2, 4, 8}
  ds = data_lib.prepare(data_lib.DataConfig.from_config(c.base.data))
  T = c.base.train.seq_len
  seen = []
  for sp in specs:
    tc = plan_lib.run_config(c.base, sp, rows=plan_lib.eval_rows(s, c.base)).train
    assert tc.eval_batches * tc.batch_size == 24
    seen.append(np.concatenate(ds.eval_batches(tc.eval_batches, tc.batch_size, T)))
  assert all(np.array_equal(seen[0], x) for x in seen[1:])
  # Without sweep.eval_rows: the base config's eval_batches x batch_size (2 x 8) for every run.
  with s.unlocked():
    del s['eval_rows']
  assert {plan_lib.run_config(c.base, sp).train.eval_batches * sp.batch_size
          for sp in specs} == {16}
  s.eval_rows = 10
  with pytest.raises(UserError, match=re.escape('sweep.eval_rows=10 is not a multiple of the '
                                                'batch size 4')):
    sweep_lib.run_sweep(c, str(tmp_path / 'sw'), train_fn=lambda *a: None, fit=False)
  assert not (tmp_path / 'sw').exists()


def test_exponent_sweep_gives_every_run_its_step_floor():
  """configs/sweep_exponent.py: each run the largest batch of 2-16 that leaves 2000 steps, or
  batch 2 when none does; the budgets are what the runs spend."""
  from configs import sweep_exponent
  c = sweep_exponent.get_config()
  specs = plan_lib.plan(c.sweep, c.base, BYTES_VOCAB)
  T = c.base.train.seq_len
  assert len(specs) == 23 and {sp.batch_size for sp in specs} == {2, 4, 8, 16}
  for sp in specs:
    assert_batch_rule(sp, T, floor=2000, largest=16, smallest=2)


def test_auto_parallel_takes_one_run_per_core(monkeypatch):
  from lm.scaling import parallel as parallel_lib
  monkeypatch.setattr(parallel_lib, 'probe_devices', lambda: ('cpu', 1))
  monkeypatch.setattr(os, 'sched_getaffinity', lambda _: {0, 1, 2, 3})
  assert runner_lib.auto_parallel(10) == 4 and runner_lib.auto_parallel(3) == 3
  monkeypatch.setattr(parallel_lib, 'probe_devices', lambda: ('gpu', 8))
  assert runner_lib.auto_parallel(5) == 5
  monkeypatch.setattr(parallel_lib, 'probe_devices', lambda: ('tpu', 8))
  assert runner_lib.auto_parallel(5) == 1


def test_the_smallest_budget_gets_the_extra_seeds():
  c = sweep_smoke.get_config()
  with c.sweep.unlocked():
    c.sweep.seeds_smallest = 3
  specs = plan_lib.plan(c.sweep, c.base, BYTES_VOCAB)
  small = min(c.sweep.budgets)
  for seed in (1, 2):
    mine = [s for s in specs if s.seed == seed]
    assert mine and {s.budget for s in mine} == {small}
    assert sorted(s.params for s in mine) == sorted(s.params for s in specs
                                                    if s.seed == 0 and s.budget == small)
  assert len({s.name for s in specs}) == len(specs)


def test_extra_seeds_on_the_smallest_budgets_extend_a_plan():
  """sweep.seeds_smallest_budgets = k puts the extra seeds on the k smallest budgets. Here (every
  trunk long enough for the full warmup) the runs already planned keep their run configs, so a
  finished folder extends without retraining; a branch whose new trunk has another warmup gets
  another config, which the identity check refuses
  (test_changed_plan_is_refused_naming_the_changed_keys)."""
  from configs import sweep_exponent_wsd
  c = sweep_exponent_wsd.get_config()
  before = {sp.name: sp for sp in plan_lib.plan(c.sweep, c.base, BYTES_VOCAB)}
  with c.sweep.unlocked():
    c.sweep.seeds_smallest_budgets = 3
  after = {sp.name: sp for sp in plan_lib.plan(c.sweep, c.base, BYTES_VOCAB)}
  assert set(before) < set(after)
  for name, sp in before.items():   # same run config (its identity); a branch may find a longer
    assert (plan_lib.run_config(c.base, after[name]).to_dict()   # trunk of its own seed
            == plan_lib.run_config(c.base, sp).to_dict())
    assert after[name] == dataclasses.replace(sp, trunk=after[name].trunk)
  three = sorted(c.sweep.budgets)[:3]
  extra = [sp for sp in after.values() if sp.seed == 1]
  assert {sp.budget for sp in extra} == set(three)
  for C in three:
    assert (sorted((sp.n_layers, sp.d_model) for sp in extra if sp.budget == C)
            == sorted((sp.n_layers, sp.d_model) for sp in after.values()
                      if sp.seed == 0 and sp.budget == C))
  with c.sweep.unlocked():
    c.sweep.seeds_smallest_budgets = 0
  with pytest.raises(UserError, match='seeds_smallest_budgets'):
    plan_lib.plan(c.sweep, c.base, BYTES_VOCAB)


def test_only_keeps_the_matching_runs_and_their_trunks():
  """sweep.only trains part of a plan: the runs it matches, each with the trunk it branches from
  (whatever that trunk's name), every kept run exactly as the whole plan has it."""
  from configs import sweep_exponent_aspect
  c = sweep_exponent_aspect.get_config()
  whole = {sp.name: sp for sp in plan_lib.plan(c.sweep, c.base, BYTES_VOCAB)}
  with c.sweep.unlocked():
    c.sweep.only = r'^C2\.7e12_L4_d32_s1$'
  part = plan_lib.plan(c.sweep, c.base, BYTES_VOCAB)
  branch = whole['C2.7e12_L4_d32_s1']
  assert branch.trunk and branch.trunk != branch.name          # a branch of a longer run
  assert [sp.name for sp in part] == [n for n in whole if n in (branch.name, branch.trunk)]
  assert all(sp == whole[sp.name] for sp in part)
  with c.sweep.unlocked():
    c.sweep.only = '_L(4_d32|5_d40)_'
  part = plan_lib.plan(c.sweep, c.base, BYTES_VOCAB)
  assert {(sp.n_layers, sp.d_model) for sp in part} == {(4, 32), (5, 40)}
  assert len(part) == len([n for n in whole if '_L4_d32_' in n or '_L5_d40_' in n])
  for pattern, match in (('_L99_', 'matches none'), ('C1e12_(', 'not a valid regular')):
    with c.sweep.unlocked():
      c.sweep.only = pattern
    with pytest.raises(UserError, match=match):
      plan_lib.plan(c.sweep, c.base, BYTES_VOCAB)


def test_one_aspect_ladder_takes_every_shape_of_that_aspect_within_the_span():
  """sweep.aspect_band = 1: every shape has d_model = aspect · n_layers, and each budget takes
  all such shapes from N*/span to N*·span (none skipped, none of another aspect)."""
  from configs import sweep_exponent_one_aspect
  c = sweep_exponent_one_aspect.get_config()
  s = c.sweep
  specs = plan_lib.plan(s, c.base, BYTES_VOCAB)
  sizes = plan_lib.one_aspect_sizes(c.base.model, BYTES_VOCAB, s.head_dim, s.aspect, s.min_layers)
  assert len(sizes) == 48 - s.min_layers + 1 and sizes == sorted(sizes)
  assert all(sp.d_model == 10 * sp.n_layers and sp.n_heads == sp.n_layers for sp in specs)
  for C in s.budgets:
    mine = sorted(sp.params for sp in specs if sp.budget == C and sp.seed == 0)
    lo, hi = mine[0], mine[-1]
    inside = [n for n in sizes if lo <= n <= hi]
    assert mine == inside and len(mine) >= 3               # a contiguous run of rungs
    below = [n for n in sizes if n < lo]
    above = [n for n in sizes if n > hi]
    assert hi / lo <= s.span ** 2                          # within N*/span .. N*·span
    if below and above:                                    # the neighbours fall outside
      assert above[0] / below[-1] > s.span ** 2
  with c.sweep.unlocked():
    c.sweep.aspect = 10.3   # 10.3 · L is a multiple of 10 only beyond 48 layers
  with pytest.raises(UserError, match='No model shape with head_dim=10'):
    plan_lib.plan(c.sweep, c.base, BYTES_VOCAB)


def test_isoflop_wsd_plan_shares_trunks_across_budgets():
  """sweep.mode=isoflop_wsd: one ladder of sizes for every budget; a size's runs with one batch
  are branches of its longest, each keeping its own budget, batch and steps."""
  from configs import sweep_exponent_wsd
  c = sweep_exponent_wsd.get_config()
  specs = plan_lib.plan(c.sweep, c.base, BYTES_VOCAB)
  T = c.base.train.seq_len
  by_name = {sp.name: sp for sp in specs}
  assert len(by_name) == len(specs)
  assert {sp.budget for sp in specs} == set(c.sweep.budgets)
  for C in c.sweep.budgets:
    assert len([sp for sp in specs if sp.budget == C and sp.seed == 0]) == 5
  for sp in specs:
    assert_batch_rule(sp, T, floor=2000, largest=16, smallest=2)   # the rule, run by run
    assert sp.cooldown == 0.2 and plan_lib.run_config(c.base, sp).train.schedule == 'wsd'
    if sp.trunk:
      t = by_name[sp.trunk]
      assert (t.n_layers, t.d_model, t.seed, t.batch_size, t.lr, t.warmup_steps) == (
          sp.n_layers, sp.d_model, sp.seed, sp.batch_size, sp.lr, sp.warmup_steps)
      assert not t.trunk and t.steps > sp.steps and t.budget > sp.budget
      assert sp.branch_step == sp.steps - round(0.2 * sp.steps)
  shared = [sp for sp in specs if sp.trunk]
  assert len(shared) >= 8 and len({sp.d_model for sp in specs}) >= 6
  # The ladder: the same shapes recur from budget to budget.
  ladder = plan_lib.ladder(100.0, 10.0, 3 ** 0.5, 3.0)
  assert np.allclose(ladder, [10 * 3 ** (k / 2) for k in range(3, 7)])


@pytest.mark.slow   # about a minute: WSD branches stay in the default suite (booked once, equal to
# standalone runs), and so do worker processes (stopped and resumed by a killed sweep)
def test_isoflop_wsd_sweep_in_worker_processes(tmp_path):
  """The branches of sweep.mode=isoflop_wsd run in worker processes (sweep.parallel=2), one
  family at a time per slot: each branch starts from its trunk's checkpoint (its early rows are
  the trunk's own), ends where a standalone WSD run of its length ends, and a rerun trains
  nothing; Approach 1's curve per size goes through its runs' final losses."""
  cfg = tiny_sweep(str(tmp_path / 'cache'))
  s = cfg.sweep
  s.mode, s.warmup_max, s.parallel = 'isoflop_wsd', 4, 2
  specs = plan_lib.plan(s, cfg.base, BYTES_VOCAB)
  branches = [sp for sp in specs if sp.trunk]
  assert len(specs) == 5 and len(branches) == 2
  workdir = str(tmp_path / 'sweep')
  out = sweep_lib.run_sweep(cfg, workdir, fit=False)
  assert out['finished'] == 5 and not out['failed']
  rows = {r['run']: r for r in csv.DictReader(open(f'{workdir}/results.csv'))}
  assert list(rows) == [sp.name for sp in specs]
  for sp in branches:
    b_rows = read_jsonl(f'{workdir}/runs/{sp.name}/metrics.jsonl')
    t_rows = {r['step']: r for r in read_jsonl(f'{workdir}/runs/{sp.trunk}/metrics.jsonl')}
    early = [r for r in b_rows if r['step'] <= sp.branch_step]
    assert early and all(r['time'] == t_rows[r['step']]['time'] for r in early)
    assert max(r['step'] for r in b_rows) == sp.steps
  sp = branches[0]
  alone = train_lib.train(plan_lib.run_config(cfg.base, sp, 1, 1), str(tmp_path / 'alone'))
  assert abs(float(rows[sp.name]['eval_loss']) - alone['eval_loss']) < 1e-5
  stamps = {x.name: os.path.getmtime(f'{workdir}/runs/{x.name}/summary.json') for x in specs}
  again = sweep_lib.run_sweep(cfg, workdir, fit=False)
  assert again['finished'] == 5 and len(list(csv.DictReader(open(f'{workdir}/results.csv')))) == 5
  assert stamps == {x.name: os.path.getmtime(f'{workdir}/runs/{x.name}/summary.json')
                    for x in specs}   # nothing was trained again
  finished = [(x, json.load(open(f'{workdir}/runs/{x.name}/summary.json'))) for x in specs]
  curve = results_lib.wsd_curves(finished)[f'L{sp.n_layers}_d{sp.d_model}_s0']
  same = sorted((x for x in specs if (x.n_layers, x.d_model) == (sp.n_layers, sp.d_model)),
                key=lambda x: x.steps)
  assert len(same) == 2 and curve['curve_loss'] == [float(rows[x.name]['eval_loss']) for x in same]


def test_a_one_budget_wsd_sweep_is_fitted_without_approach1(tmp_path, capsys):
  """One budget in isoflop_wsd mode: every size is its own trunk with one final loss, so no curve
  has two points. The sweep's fit goes on without Approach 1 (and says so) instead of failing
  after the runs are done; fitting the folder again later does the same."""
  c = tiny_sweep(str(tmp_path / 'cache'), budgets=(4e9,))
  s = c.sweep
  s.mode, s.sizes_per_budget, s.seeds, s.bootstrap = 'isoflop_wsd', 6, 2, 0
  specs = plan_lib.plan(s, c.base, BYTES_VOCAB)
  assert len(specs) >= 6 and not any(sp.trunk for sp in specs)
  finished = []
  for sp in specs:
    cfg = plan_lib.run_config(c.base, sp)
    tokens = sp.steps * sp.batch_size * c.base.train.seq_len
    summary = {'params': sp.params, 'params_nonembed': sp.params // 2, 'tokens': tokens,
               'flops': sp.flops_per_token * tokens, 'flops_6nd': 6.0 * sp.params * tokens,
               'final_loss': 3.0, 'eval_loss': 2.0 + 30.0 / sp.params ** 0.3 + 30.0 / tokens ** 0.3}
    finished.append((sp, cfg, summary))
  workdir = tmp_path / 'sweep'
  workdir.mkdir()
  results_lib.write_results(str(workdir / 'results.csv'), [results_lib.result_row(*f) for f in finished])
  fit = sweep_lib.fit_sweep(s, str(workdir), finished)
  assert fit['approach1'] is None and fit['approach3']['a'] is not None
  assert 'Approach 1 skipped' in capsys.readouterr().out
  assert (workdir / 'report.md').exists() and sweep_lib.curves_beside(str(workdir / 'results.csv')) is None
