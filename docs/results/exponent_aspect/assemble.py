"""Assemble results.csv and curves.json of configs/sweep_exponent_aspect.py from the runs it shares
with configs/sweep_exponent_wide.py (docs/results/exponent_wide, two seeds everywhere) and the runs
trained for its two new shapes in a sweep folder:

    python run.py sweep --config=configs/sweep_exponent_aspect.py \
        "--config.sweep.only=_L(4_d32|5_d40)_|^C1\\.5e11_L2_d(16|24)_s0$" --workdir=runs/exponent_aspect
    python docs/results/exponent_aspect/assemble.py runs/exponent_aspect

A run is taken from the wide sweep only where both plans give it the same name and the same spec
(size, steps, batch, lr, warmup, trunk and branch step), hence the same run config. Runs trained
in both folders (the pattern above retrains three of the shared runs) are compared and printed:
equal losses mean that the assembled file is what the whole plan trained in one folder gives.
"""
import csv
import dataclasses
import json
import os
import sys

sys.path.insert(0, os.path.join(os.path.dirname(__file__), '..', '..', '..'))

from configs import sweep_exponent_aspect, sweep_exponent_wide  # noqa: E402
from lm.scaling import plan as plan_lib  # noqa: E402
from lm.scaling import results as results_lib  # noqa: E402

BYTES_VOCAB = 263
HERE = os.path.dirname(os.path.abspath(__file__))


def read(path):
  with open(path, newline='') as f:
    return {r['run']: r for r in csv.DictReader(f)}


def main(new_dir):
  aspect = sweep_exponent_aspect.get_config()
  wide = sweep_exponent_wide.get_config()
  wide.sweep.seeds_smallest_budgets = 9   # the second command of docs/results/exponent_wide
  plan = plan_lib.plan(aspect.sweep, aspect.base, BYTES_VOCAB)
  wide_plan = {sp.name: sp for sp in plan_lib.plan(wide.sweep, wide.base, BYTES_VOCAB)}
  old = read(os.path.join(HERE, '..', 'exponent_wide', 'results.csv'))
  new = read(os.path.join(new_dir, 'results.csv'))
  rows, missing = [], []
  for sp in plan:
    shared = sp.name in wide_plan and dataclasses.asdict(wide_plan[sp.name]) == dataclasses.asdict(sp)
    if sp.name in new:
      if shared and sp.name in old:
        a, b = float(old[sp.name]['loss']), float(new[sp.name]['loss'])
        print(f'{sp.name}: trained in both folders, loss {a:.6f} (wide) and {b:.6f} (here), '
              f'difference {b - a:+.2e}')
      rows.append(new[sp.name])
    elif shared and sp.name in old:
      rows.append(old[sp.name])
    else:
      missing.append(sp.name)
  if missing:
    sys.exit(f'{len(missing)} planned runs are in neither folder ({", ".join(missing[:4])}, ...): '
             'train them with the sweep command in this file.')
  with open(os.path.join(HERE, 'results.csv'), 'w', newline='') as f:
    w = csv.DictWriter(f, fieldnames=results_lib.RESULT_COLUMNS)
    w.writeheader()
    for r in rows:
      w.writerow({k: r.get(k, '') for k in results_lib.RESULT_COLUMNS})
  curves = {}   # per size and seed, the final losses of its WSD branches (lm.scaling.results.wsd_curves)
  for r in sorted(rows, key=lambda r: float(r['tokens'])):
    c = curves.setdefault(f"L{r['n_layers']}_d{r['d_model']}_s{r['seed']}",
                          {'params': int(r['params']), 'curve_flops': [], 'curve_tokens': [],
                           'curve_loss': []})
    c['curve_flops'].append(float(r['flops']))
    c['curve_tokens'].append(float(r['tokens']))
    c['curve_loss'].append(float(r['eval_loss']))
  with open(os.path.join(HERE, 'curves.json'), 'w') as f:
    json.dump(dict(sorted(curves.items())), f, indent=1)
  n_new = sum(r['run'] in new for r in rows)
  print(f'wrote {len(rows)} runs ({len(rows) - n_new} from exponent_wide, {n_new} from {new_dir}) '
        f'to {HERE}/results.csv and curves.json')


if __name__ == '__main__':
  main(sys.argv[1] if len(sys.argv) > 1 else 'runs/exponent_aspect')
