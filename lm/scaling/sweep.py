"""Scaling sweeps: plan the runs (lm.scaling.plan: a model-size ladder; IsoFLOP budgets or an N x D
grid), run them in their own folders (lm.scaling.runner: one after another, or sweep.parallel at
once on separate devices or CPU cores), keep results.csv current (lm.scaling.results), then fit
and plot (fit_sweep).

A run is finished when its summary.json exists; re-running skips it. A run's identity is its full
resolved config (runs/NAME/run_config.json): a sweep folder whose runs were trained under another
plan (lr, batch, schedule, data, ...) is refused before anything trains, naming the changed keys.
An interrupted run resumes from its checkpoint; a failed run is retried up to sweep.max_attempts
times, each failure recorded in DIR/failures.jsonl. results.csv is rewritten atomically after
every run. The sweep holds DIR's lock while it runs (lm/lock.py), so a second sweep on the same
folder (a scheduler restarting a driver that still runs) is refused; each run holds its own run
folder's lock, in this process or in a worker. A sweep stopped by SIGTERM is recorded as such, so
run.py exits with status 3.
"""
import csv
import dataclasses
import json
import os
import time

from lm import lock as lock_lib
from lm import tracking   # imports wandb only when tracking is on
from lm.data import tokens as data_lib
from lm.errors import UserError, record_signal_stop
from lm.eval import harness as harness_lib   # imports lm-eval only when tasks are asked for
from lm.metrics import read_json_object, write_json_atomic
from lm.scaling import cluster as cluster_lib   # imports ray/submitit only for their backend
from lm.scaling import plan as plan_lib
from lm.scaling import results as results_lib
from lm.scaling import runner as runner_lib
from lm.scaling import tasks as tasks_lib
from lm.stages import pretrain as train_lib


def run_sweep(sweep_file_cfg, workdir: str, train_fn=None, fit: bool = True) -> dict:
  """Runs every planned run not yet finished, then fits and plots. Returns a short summary.

  sweep.parallel > 1 trains that many runs at once, each in its own process on its own share of
  the devices (lm.scaling.parallel); otherwise runs go one after another in this process."""
  s, base_cfg = sweep_file_cfg.sweep, sweep_file_cfg.base
  plan_lib.validate(s)   # before the corpus is prepared or anything is written
  if s.get('harness', ''):   # lm-eval installed and the tasks known, before anything trains
    harness_lib.check_tasks(harness_lib.task_names(s.harness), s.get('harness_include', ''))
  parallel, pack = _parallel_and_pack(s, train_fn)
  train_fn = train_fn or train_lib.train
  if base_cfg.train.get('init_from'):
    raise UserError('base.train.init_from would start every run of the sweep from the same '
                    'weights; a sweep trains each size from scratch, so leave it empty.')
  with lock_lib.hold(workdir):   # before anything is prepared or written
    return _run_sweep(sweep_file_cfg, workdir, train_fn, fit, parallel, pack)


def _run_sweep(sweep_file_cfg, workdir: str, train_fn, fit: bool, parallel: int, pack: int):
  s, base_cfg = sweep_file_cfg.sweep, sweep_file_cfg.base
  dataset = data_lib.prepare(data_lib.DataConfig.from_config(base_cfg.data))
  specs, cfgs = _planned_runs(s, base_cfg, dataset.tokenizer.vocab_size, workdir)
  total_flops = _write_plan(sweep_file_cfg, workdir, specs)
  book = runner_lib.Booking(workdir, specs, cfgs, base_cfg, total_flops)
  jobs = runner_lib.pending_jobs(book, s.max_attempts)
  stopped = _train(s, workdir, jobs, book, train_fn, parallel, pack)
  if stopped:
    book.stopped()
    record_signal_stop(workdir)
    print('sweep stopped (SIGTERM); rerun the same command to resume.', flush=True)
    return {'stopped': True}
  results_lib.write_results(book.results_path, results_lib.result_rows(specs, book.finished))
  finished = [book.finished[sp.name] for sp in specs if sp.name in book.finished]
  out = {'finished': len(finished), 'failed': book.failed, 'results': book.results_path,
         'wall_s': time.time() - book.t0}
  if s.get('harness', '') and finished:
    out['harness'] = tasks_lib.score_runs(s, workdir, finished)
  if fit and len(finished) < 5:
    print(f'fit skipped: Approach 3 needs at least 5 finished runs, {len(finished)} are done.')
  elif fit:
    out['fit'] = fit_sweep(s, workdir, finished, dataset.entropy_rate)
    if base_cfg.train.get('wandb'):
      tracking.log_sweep_fit(base_cfg.train, workdir, base_cfg.train.get('wandb_group', ''))
  return out


def _train(s, workdir: str, jobs: list, book, train_fn, parallel: int, pack: int) -> bool:
  """Trains the pending jobs where sweep.backend says: on a cluster (lm.scaling.cluster), in
  worker processes here (sweep.parallel), or in this process. True if stopped (SIGTERM)."""
  if s.get('backend', 'local') != 'local':
    if not jobs:
      return False
    return runner_lib.run_parallel(jobs, 0, book, cluster_lib.make_backend(s, workdir))
  if parallel == 0 and jobs:
    parallel = runner_lib.auto_parallel(len(jobs))
    print(f'sweep.parallel=0: {parallel} run(s) at once', flush=True)
  if parallel > 1:
    return runner_lib.run_parallel(jobs, parallel, book)
  return runner_lib.run_in_process(jobs, pack, book, train_fn)


def _parallel_and_pack(s, train_fn) -> tuple[int, int]:
  """(runs at once, 0 for as many as the machine has cores or GPUs; runs per pack), with the
  combinations that cannot work refused: a train_fn runs in this process, unpacked."""
  parallel = s.get('parallel', 1)
  pack = int(s.get('pack', 1))
  if train_fn is not None and s.get('backend', 'local') != 'local':
    raise ValueError('train_fn applies to runs in this process (sweep.backend=local).')
  if parallel == 0 and (train_fn is not None or pack > 1):
    parallel = 1
  if pack > 1 and train_fn is not None:
    raise ValueError('train_fn applies to unpacked runs only (sweep.pack=1).')
  if parallel > 1 and train_fn is not None:
    raise ValueError('train_fn applies to in-process runs only (sweep.parallel=1).')
  return parallel, pack


def _planned_runs(s, base_cfg, vocab: int, workdir: str) -> tuple[list, list]:
  """The plan's runs and their full configs, checked before anything is written or trained:
  every run scored on the same validation windows, and no run folder holding another plan's
  work (the folder's sweep.json still describes the plan that trained it)."""
  specs = plan_lib.plan(s, base_cfg, vocab)
  plan_lib.check_eval_rows(s, base_cfg, specs)
  rows = plan_lib.eval_rows(s, base_cfg)
  cfgs = [plan_lib.run_config(base_cfg, sp, s.evals_per_run, s.checkpoints_per_run, rows,
                              plan_lib.mup_base_width(s)) for sp in specs]
  if base_cfg.train.get('wandb'):   # one W&B group per sweep, each run tagged with N, D, C
    group = base_cfg.train.get('wandb_group', '') or os.path.basename(os.path.abspath(workdir))
    for sp, cfg in zip(specs, cfgs):
      tokens = sp.steps * cfg.train.batch_size * cfg.train.seq_len
      cfg.train.wandb_group = group
      cfg.train.wandb_tags = ','.join(
          tracking.tags(base_cfg.train.get('wandb_tags', ''))
          + [f'N={sp.params}', f'D={tokens}'] + ([f'C={sp.budget:g}'] if sp.budget else []))
  for sp, cfg in zip(specs, cfgs):
    plan_lib.check_run_identity(workdir, sp.name, cfg)
  return specs, cfgs


def _write_plan(sweep_file_cfg, workdir: str, specs: list) -> float:
  """DIR/sweep.json (the config and the planned runs) and the runs/ folder; returns the FLOPs
  the plan trains (Chinchilla App. F count)."""
  os.makedirs(os.path.join(workdir, 'runs'), exist_ok=True)
  base_cfg = sweep_file_cfg.base
  total_flops = sum(plan_lib.trained_flops(sp, base_cfg) for sp in specs)
  write_json_atomic(os.path.join(workdir, 'sweep.json'), {
      'config': json.loads(sweep_file_cfg.to_json()), 'planned_flops': total_flops,
      'runs': [dataclasses.asdict(sp) for sp in specs]})
  print(f'sweep: {len(specs)} runs, {total_flops:.3g} FLOPs planned (Chinchilla App. F count); '
        f'outputs in {workdir}', flush=True)
  return total_flops


def fit_sweep(s, workdir: str, finished: list, entropy_rate: float | None = None) -> dict:
  """The fit at the end of a sweep, on its results.csv and the finished runs' curves
  (finished: (spec, config, summary) per run): fit.json, the plots and report.md."""
  # Local: report imports scipy and matplotlib, which only the fit needs (not a sweep's start).
  from lm.scaling import report as report_lib
  # WSD: Approach 1 from the branches' finals, one honest point per length
  if s.mode in plan_lib.WSD_MODES:
    curves = results_lib.wsd_curves([(a, c) for a, b, c in finished])
  else:
    curves = results_lib.run_curves(workdir, [(a.name, c['params']) for a, b, c in finished])
  write_json_atomic(os.path.join(workdir, 'curves.json'), curves)
  if results_lib.usable_curves(curves) is None:
    print('Approach 1 skipped: it needs two or more runs with two or more points on their '
          'curves (a WSD sweep of one budget has one point per size).', flush=True)
  result = report_lib.run_fit(os.path.join(workdir, 'results.csv'), workdir, loss_key='eval_loss',
                              bootstrap=s.bootstrap, curves=results_lib.usable_curves(curves))
  if entropy_rate is not None:
    _append_truth(workdir, result, entropy_rate)
  return result


def curves_beside(results_csv: str) -> dict | None:
  """The training curves of the runs in a sweep's results.csv, so that fitting a sweep's results
  mid-way still gets Approach 1: read from the sweep's run folders, else from a curves.json saved
  beside the CSV (a copied results folder); None when there are neither."""
  workdir = os.path.dirname(os.path.abspath(results_csv))
  wsd = False
  if os.path.exists(os.path.join(workdir, 'sweep.json')):
    plan = read_json_object(os.path.join(workdir, 'sweep.json'), 'rerun the sweep to rewrite it, '
                            'or fit a copy of results.csv kept outside the sweep folder')
    wsd = ((plan.get('config') or {}).get('sweep') or {}).get('mode') in plan_lib.WSD_MODES
  if wsd or not os.path.isdir(os.path.join(workdir, 'runs')):   # WSD: the branches' finals
    saved = os.path.join(workdir, 'curves.json')
    if not os.path.exists(saved):
      return None
    from lm.scaling import fit as fit_lib   # local: fit imports scipy, needed only here
    return results_lib.usable_curves(fit_lib.read_curves(saved))
  with open(results_csv, newline='') as f:
    rows = [r for r in csv.DictReader(f) if r.get('run') and r.get('params')]
  return results_lib.usable_curves(
      results_lib.run_curves(workdir, [(r['run'], int(float(r['params']))) for r in rows]))


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
