"""Does the sweep's learning-rate rule sit near the best rate?

    python -m benchmarks.lr_scan [--config=configs/sweep_exponent_wsd.py --budget=5e11]

A sweep sets each run's peak learning rate by one rule (sweep.lr * (ref / d_model)^power). This
script takes the smallest and the largest run that a sweep config plans for one budget, trains
each again at multiples of its rule's rate (the same shape, tokens, batch, warmup and schedule;
only train.lr differs), and reports every final evaluation loss against the best of its scan.
Runs go sweep.parallel at a time through the sweep engine (a grid of named runs), so the scan
resumes like a sweep. Results: --out (default runs/lr_scan): table.md, result.json, runs/.
"""
import dataclasses
import json
import os
import time

from absl import app
from absl import flags
from absl import logging
from ml_collections import config_flags

FLAGS = flags.FLAGS
flags.DEFINE_string('out', 'runs/lr_scan', 'Output folder.')
flags.DEFINE_float('budget', 1e12, 'The budget (FLOPs) whose smallest and largest runs are scanned.')
flags.DEFINE_string('multiples', '0.5,1,2,4', 'Multiples of the rule\'s learning rate.')
flags.DEFINE_integer('parallel', 0, 'Runs at once (0: one per CPU core).')
config_flags.DEFINE_config_file('config', 'configs/sweep_smoke.py',
                                'The sweep config whose plan (shapes, batch rule, schedule) is scanned.')


def main(argv):
  del argv
  logging.set_verbosity(logging.WARNING)
  from lm.data import tokens as data_lib
  from lm.scaling import parallel as parallel_lib
  from lm.scaling import plan as plan_lib
  from lm.scaling import runner as runner_lib
  cfg = FLAGS.config
  cfg.base.train.progress = 'none'
  s = cfg.sweep
  s.budgets = (FLAGS.budget,)
  vocab = data_lib.prepare(data_lib.DataConfig.from_config(cfg.base.data)).tokenizer.vocab_size
  plan = plan_lib.plan(s, cfg.base, vocab)
  ends = [min(plan, key=lambda sp: sp.params), max(plan, key=lambda sp: sp.params)]
  multiples = [float(m) for m in FLAGS.multiples.split(',')]
  # Each scanned run stands alone (a WSD plan's branch trains as the whole run it equals).
  specs = [dataclasses.replace(sp, name=f'{sp.name}_lrx{m:g}', lr=sp.lr * m, trunk='',
                               branch_step=0) for sp in ends for m in multiples]
  rows_eval = plan_lib.eval_rows(s, cfg.base)
  os.makedirs(os.path.join(FLAGS.out, 'runs'), exist_ok=True)
  jobs = []
  for i, sp in enumerate(specs):
    rdir = os.path.join(FLAGS.out, 'runs', sp.name)
    if not os.path.exists(os.path.join(rdir, 'summary.json')):
      jobs.append(runner_lib.Job(i, sp, plan_lib.run_config(cfg.base, sp, 1, 1, rows_eval), rdir,
                                1))
  t0 = time.time()
  parallel = FLAGS.parallel or runner_lib.auto_parallel(max(1, len(jobs)))

  def start(job, where=''):
    os.makedirs(job.rdir, exist_ok=True)
    print(f'{job.spec.name}: N={job.spec.params:,} steps={job.spec.steps} lr={job.spec.lr:.3g}'
          + (f' on {where}' if where else ''), flush=True)

  def done(job, summary, error=None, tb=''):
    print(f'    {job.spec.name}: ' + (f"eval loss {summary['eval_loss']:.4f}" if summary
                                       else f'failed ({error})'), flush=True)
  if jobs:
    parallel_lib.run_jobs(jobs, parallel_lib.LocalSlots(parallel_lib.device_slots(parallel)),
                          start, done)
  rows = []
  for sp in specs:
    path = os.path.join(FLAGS.out, 'runs', sp.name, 'summary.json')
    with open(path) as f:
      rows.append({'run': sp.name, 'params': sp.params, 'd_model': sp.d_model,
                   'n_layers': sp.n_layers, 'steps': sp.steps, 'lr': sp.lr,
                   'batch_size': plan_lib.spec_batch(sp, cfg.base),
                   'eval_loss': json.load(f)['eval_loss']})
  lines = ['| run | N | batch | steps | lr | multiple of the rule | eval loss | above the scan\'s best |',
           '|---|---|---|---|---|---|---|---|']
  for i, sp in enumerate(ends):
    mine = rows[i * len(multiples):(i + 1) * len(multiples)]
    best = min(r['eval_loss'] for r in mine)
    for r, m in zip(mine, multiples):
      r['multiple'], r['above_best'] = m, r['eval_loss'] / best - 1
      lines.append(f"| {r['run']} | {r['params']:,} | {r['batch_size']} | {r['steps']} | "
                   f"{r['lr']:.3g} | {m:g} | "
                   f"{r['eval_loss']:.4f} | {100 * r['above_best']:.1f}% |")
  table = '\n'.join(lines)
  print(table)
  with open(os.path.join(FLAGS.out, 'table.md'), 'w') as f:
    f.write(table + '\n')
  with open(os.path.join(FLAGS.out, 'result.json'), 'w') as f:
    json.dump({'config': config_flags.get_config_filename(FLAGS['config']),
               'budget': FLAGS.budget, 'multiples': multiples, 'rows': rows,
               'wall_s': time.time() - t0}, f, indent=2)


if __name__ == '__main__':
  app.run(main)
