"""A sweep's runs scored on lm-evaluation-harness tasks (sweep.harness): each finished run's final
weights through lm/eval/harness.py, into runs/NAME/harness.json (kept: a rerun scores only what is
new), DIR/harness.csv (one row per run: N, D, C, eval loss and every task metric) and
DIR/task_vs_compute.png (plot.plot_task_vs_compute). lm-eval is optional: this module imports it
only through lm.eval.harness when a sweep asks for tasks.
"""
import csv
import json
import os

from lm import runs
from lm.eval import harness as harness_lib
from lm.metrics import write_json_atomic


def score_runs(s, workdir: str, finished: list) -> dict:
  """Scores every finished run (finished: (spec, config, summary) per run) not yet scored on the
  same tasks and limit; writes harness.csv and task_vs_compute.png; returns {run: {task: metrics}}."""
  tasks = harness_lib.task_names(s.get('harness', ''))
  limit, include = int(s.get('harness_limit', 0)), s.get('harness_include', '')
  harness_lib.check_tasks(tasks, include)
  key = {'tasks': tasks, 'limit': limit, 'include': include}
  scores = {}
  for i, (sp, _, _) in enumerate(finished):
    rdir = os.path.join(workdir, 'runs', sp.name)
    path = os.path.join(rdir, 'harness.json')
    if os.path.exists(path):
      with open(path) as f:
        old = json.load(f)
      if old.get('key') == key:
        scores[sp.name] = old['tasks']
        continue
    print(f'    harness [{i + 1}/{len(finished)}] {sp.name}: {", ".join(tasks)}', flush=True)
    mc, params, tokenizer, _ = runs.load_model(rdir)
    got = harness_lib.run_harness(harness_lib.make_adapter(mc, params, tokenizer, name=sp.name),
                                  tasks, limit=limit, include=include)
    write_json_atomic(path, dict(got, key=key))
    scores[sp.name] = got['tasks']
  rows = []
  for sp, cfg, summary in finished:
    row = {'run': sp.name, 'params': summary['params'], 'tokens': summary['tokens'],
           'flops': summary['flops'], 'budget': sp.budget or '', 'eval_loss': summary['eval_loss']}
    for task, metrics in scores[sp.name].items():
      row.update({f'{task}/{m}': v for m, v in metrics.items()})
    rows.append(row)
  columns = list(dict.fromkeys(k for r in rows for k in r))
  with open(os.path.join(workdir, 'harness.csv'), 'w', newline='') as f:
    w = csv.DictWriter(f, fieldnames=columns)
    w.writeheader()
    w.writerows(rows)
  if rows:
    from lm.scaling import plot as plot_lib   # local: matplotlib, which only the figure needs
    plot_lib.plot_task_vs_compute(rows, tasks, os.path.join(workdir, 'task_vs_compute.png'))
  return scores
