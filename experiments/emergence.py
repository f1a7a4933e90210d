"""Emergent abilities, measured: does multi-digit addition appear suddenly with scale, and does
the answer depend on the metric?

  python -m experiments.emergence [--runs=runs/emergence] [--out=docs/results/emergence]

A ladder of six byte-level models, 33K to 1.5M parameters (about 45x), is trained by the sweep
engine in grid mode (configs/emergence.py) on the Python standard library mixed with 10% generated
"a+b=c" lines. Every run scores held-out addition problems (never in its training text; lm/eval/tasks.py)
with 1, 2, 3 and 4 digit operands, few-shot with 3 demonstrations, at eight points of training
(train.eval_tasks in the training loop), by three metrics:

  * exact match of the greedy answer (all or nothing);
  * per-digit accuracy (digits right at their place value, over the longer of answer and guess);
  * the log-probability of the correct answer, a continuous score of how close the model is.

Schaeffer et al. (2023, "Are Emergent Abilities of Large Language Models a Mirage?") argue that
sharp jumps come from all-or-nothing metrics while the continuous ones move smoothly; the
sub-skills view says a task that needs several skills at once (here: every digit right) has a
success rate near the product of theirs. The experiment measures both: each metric against
parameters (at the end of training) and against training FLOPs (every evaluation), in one figure,
and exact match against the product of per-position accuracies (the `exact_indep` metric) in a
second. It reports what the runs show; nothing is fitted to force a threshold.

On 2 CPU cores the ladder trains in about an hour (two runs at once, one per core); rerunning
skips finished runs and resumes interrupted ones.
"""
import json
import os
import time

from absl import app
import numpy as np

from experiments import common

NAME = 'emergence'
DIGITS = (1, 2, 3, 4)
METRICS = (('exact', 'exact match'), ('partial', 'per-digit accuracy'),
           ('logprob', 'log p(correct answer), nats'))


def train_ladder(runs_dir: str, cfg=None) -> dict:
  """Trains (or finds) the ladder with the sweep engine; returns the sweep's summary."""
  from configs import emergence as emergence_config
  from lm.scaling import sweep
  cfg = cfg or emergence_config.get_config()
  return sweep.run_sweep(cfg, runs_dir, fit=False)


def collect(runs_dir: str) -> list[dict]:
  """One record per run of the ladder: its size and every evaluation row with task metrics."""
  from lm.metrics import read_jsonl
  with open(os.path.join(runs_dir, 'sweep.json')) as f:
    plan = json.load(f)
  out = []
  for spec in plan['runs']:
    rdir = os.path.join(runs_dir, 'runs', spec['name'])
    summary_path = os.path.join(rdir, 'summary.json')
    if not os.path.exists(summary_path):
      continue
    with open(summary_path) as f:
      summary = json.load(f)
    evals = [r for r in read_jsonl(os.path.join(rdir, 'metrics.jsonl'))
             if 'task/arith1/exact' in r]
    out.append({'name': spec['name'], 'params': summary['params'],
                'params_nonembed': summary['params_nonembed'], 'n_layers': spec['n_layers'],
                'd_model': spec['d_model'], 'evals': evals})
  return sorted(out, key=lambda r: r['params'])


def table_rows(runs: list[dict]) -> list[dict]:
  """The end-of-training numbers per size and digit count."""
  rows = []
  for r in runs:
    last = r['evals'][-1]
    row = {'params': r['params'], 'shape': f"L{r['n_layers']} d{r['d_model']}",
           'flops': last['flops'], 'eval_loss': last['eval_loss']}
    for d in DIGITS:
      for m in ('exact', 'partial', 'logprob', 'exact_indep'):
        row[f'{d}/{m}'] = last[f'task/arith{d}/{m}']
    rows.append(row)
  return rows


def report(result):
  rows = table_rows(result['runs'])
  print(f"{'params':>9s} {'shape':>8s} {'val loss':>8s}  " + '  '.join(
      f'{d}-digit: exact digit  logp  indep' for d in DIGITS))
  for row in rows:
    cells = '  '.join(f"{row[f'{d}/exact']:14.0%} {row[f'{d}/partial']:5.0%} "
                      f"{row[f'{d}/logprob']:5.1f} {row[f'{d}/exact_indep']:6.0%}" for d in DIGITS)
    print(f"{row['params']:9,d} {row['shape']:>8s} {row['eval_loss']:8.3f}  {cells}")


def plot(result, folder: str) -> list[str]:
  import matplotlib.pyplot as plt
  runs = result['runs']
  colors = plt.cm.viridis(np.linspace(0.0, 0.85, len(DIGITS)))
  rows = METRICS + (('eval_loss', 'validation loss (nats/byte)'),)
  fig, axes = plt.subplots(len(rows), 2, figsize=(11, 3.0 * len(rows)), sharex='col')
  params = [r['params'] for r in runs]
  for i, (key, label) in enumerate(rows):
    ax_n, ax_c = axes[i]
    series = [(None, 'C3')] if key == 'eval_loss' else list(zip(DIGITS, colors))
    for d, color in series:
      col = key if d is None else f'task/arith{d}/{key}'
      ax_n.plot(params, [r['evals'][-1][col] for r in runs], 'o-', color=color,
                label='all text' if d is None else f'{d} digit')
      for j, r in enumerate(runs):
        ax_c.plot([e['flops'] for e in r['evals']], [e[col] for e in r['evals']], '-',
                  color=color, alpha=0.35 + 0.65 * j / max(1, len(runs) - 1), lw=1.2)
        ax_c.plot(r['evals'][-1]['flops'], r['evals'][-1][col], 'o', color=color, ms=4)
    ax_n.set_ylabel(label)
    if i == 0:
      ax_n.legend(fontsize=8)
      ax_n.set_title('end of training, against parameters')
      ax_c.set_title('every evaluation, against training FLOPs\n(one line per size, darker = larger)')
  for ax in axes.ravel():
    ax.set_xscale('log')
    ax.grid(alpha=0.3)
  axes[-1, 0].set_xlabel('parameters')
  axes[-1, 1].set_xlabel('training FLOPs (Chinchilla App. F count)')
  fig.suptitle('Held-out addition, few-shot (3 demonstrations): which metrics jump, which move '
               'smoothly', fontsize=11)
  paths = [common.save(fig, folder, 'emergence.png')]

  fig, ax = plt.subplots(figsize=(5.5, 5))
  top = 0.0
  for d, color in zip(DIGITS, colors):
    xs = [e[f'task/arith{d}/exact_indep'] for r in runs for e in r['evals']]
    ys = [e[f'task/arith{d}/exact'] for r in runs for e in r['evals']]
    ax.plot(xs, ys, 'o', color=color, alpha=0.7, ms=4, label=f'{d} digit')
    top = max([top] + xs + ys)
  top = min(1.0, 1.1 * top) or 1.0                  # the range the points use
  ax.plot([0, top], [0, top], 'k--', lw=1, label='exact = product')
  ax.set_xlim(-0.01 * top, top)
  ax.set_ylim(-0.01 * top, top)
  ax.set_xlabel('product of per-position accuracies (and length)')
  ax.set_ylabel('measured exact match')
  ax.set_title('Sub-skills: does the product of per-digit\naccuracies predict exact match?',
               fontsize=10)
  ax.legend(fontsize=8)
  ax.grid(alpha=0.3)
  paths.append(common.save(fig, folder, 'subskills.png'))
  with open(os.path.join(folder, 'results.json'), 'w') as f:
    json.dump({'table': table_rows(runs), 'wall_s': result.get('wall_s'),
               'runs': runs}, f, indent=1)
  paths.append(os.path.join(folder, 'results.json'))
  return paths


def run(runs_dir=None, cfg=None) -> dict:
  runs_dir = common.runs_dir(NAME, runs_dir)
  t0 = time.time()
  sweep = train_ladder(runs_dir, cfg)
  runs = collect(runs_dir)
  if not runs:
    raise SystemExit(f'no finished runs in {runs_dir}; see {runs_dir}/failures.jsonl')
  return {'runs': runs, 'wall_s': time.time() - t0, 'failed': sweep.get('failed', [])}


def main(_):
  common.main(NAME, run, report, plot)


if __name__ == '__main__':
  app.run(main)
