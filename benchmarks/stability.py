"""Muon against AdamW, and z-loss with QK-norm against bfloat16 divergence, on this machine.

  python -m benchmarks.stability --part=muon --out=docs/results/stability
      configs/tiny.py and configs/pretrain_small.py, each trained with train.optimizer=adamw and
      =muon at the config's own steps, batch and learning rate (equal tokens): final train and
      validation loss, wall time.
  python -m benchmarks.stability --part=bf16 --out=docs/results/stability
      configs/tiny.py in bfloat16 compute (model.dtype=bfloat16) at --lrs, plain and with
      train.z_loss=1e-4 and model.qk_norm=True: which runs diverge (a NaN loss stops them, or the
      validation loss ends above --diverged).

Runs go under --runs (one folder each; a finished one is read back, not retrained). Each part
adds its rows to OUT/result.json and rewrites OUT/table.md and the plots.
"""
import argparse
import json
import math
import os
import sys
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _train(config_name: str, workdir: str, overrides: dict) -> dict:
  """Trains one run (or reads a finished one): final loss, validation loss, wall, curve."""
  from lm.errors import UserError
  from lm.stages import pretrain as train_lib
  import importlib
  cfg = importlib.import_module(f'configs.{config_name}').get_config()
  for key, value in overrides.items():
    section, name = key.split('.')
    cfg[section][name] = value
  cfg.train.progress = 'none'
  wall_file = os.path.join(workdir, 'benchmark_wall.json')
  done_before = os.path.exists(wall_file)
  t0 = time.perf_counter()
  error = None
  try:
    summary = train_lib.train(cfg, workdir)
  except UserError as e:   # a NaN loss stops the run with one sentence
    summary, error = {}, str(e)
  if done_before:   # read back: the wall time of the call that trained it
    with open(wall_file) as f:
      wall = json.load(f)['wall_s']
  else:
    wall = time.perf_counter() - t0
    os.makedirs(workdir, exist_ok=True)
    with open(wall_file, 'w') as f:
      json.dump({'wall_s': wall}, f)
  rows = []
  path = os.path.join(workdir, 'metrics.jsonl')
  if os.path.exists(path):
    with open(path) as f:
      rows = [json.loads(line) for line in f]
  evals = [r['eval_loss'] for r in rows if 'eval_loss' in r]
  return {'config': config_name, 'overrides': overrides, 'workdir': workdir,
          'final_loss': summary.get('final_loss'), 'eval_loss': evals[-1] if evals else None,
          'steps_done': rows[-1]['step'] if rows else 0, 'error': error,
          'wall_s': wall,
          'curve': [(r['step'], r['loss']) for r in rows if 'loss' in r],
          'max_grad_norm': max((r.get('grad_norm', 0) for r in rows), default=None)}


def muon_part(args) -> list:
  out = []
  for config_name in args.configs.split(','):
    for opt in ('adamw', 'muon'):
      r = _train(config_name, os.path.join(args.runs, f'{config_name}_{opt}'),
                 {'train.optimizer': opt})
      r['part'], r['name'] = 'muon', f'{config_name} {opt}'
      print(f"{r['name']}: train loss {r['final_loss']:.4f}, validation {r['eval_loss']:.4f}, "
            f"{r['wall_s']:.0f} s", flush=True)
      out.append(r)
  return out


def bf16_part(args) -> list:
  out = []
  for lr in [float(x) for x in args.lrs.split(',')]:
    for stable in (False, True):
      over = {'model.dtype': 'bfloat16', 'train.lr': lr, 'train.steps': args.bf16_steps,
              'train.eval_every': args.bf16_steps, 'train.checkpoint_every': args.bf16_steps}
      if stable:
        over.update({'train.z_loss': 1e-4, 'model.qk_norm': True})
      name = f"bf16_lr{lr:g}{'_zqk' if stable else ''}"
      r = _train('tiny', os.path.join(args.runs, name), over)
      r['part'], r['name'], r['lr'], r['stable'] = 'bf16', name, lr, stable
      ev = r['eval_loss']
      r['diverged'] = bool(r['error']) or ev is None or not math.isfinite(ev) or ev > args.diverged
      print(f"{name}: {'DIVERGED' if r['diverged'] else 'trained'}, validation "
            f"{ev if ev is None else round(ev, 4)}, max grad norm {r['max_grad_norm']}"
            + (f" ({r['error']})" if r['error'] else ''), flush=True)
      out.append(r)
  return out


def _write(out_dir: str, rows: list) -> None:
  os.makedirs(out_dir, exist_ok=True)
  path = os.path.join(out_dir, 'result.json')
  old = []
  if os.path.exists(path):
    with open(path) as f:
      old = [r for r in json.load(f) if r['name'] not in {x['name'] for x in rows}]
  rows = old + rows
  with open(path, 'w') as f:
    json.dump(rows, f, indent=1)
  fmt = lambda v: '-' if v is None else f'{v:.4f}'
  lines = ['| run | train loss | validation loss | wall (s) | note |', '|---|---|---|---|---|']
  for r in rows:
    note = 'diverged' if r.get('diverged') else ''
    if r.get('error'):
      note += f" at step {r['steps_done']}: {r['error'][:80]}"
    lines.append(f"| {r['name']} | {fmt(r['final_loss'])} | {fmt(r['eval_loss'])} | "
                 f"{r['wall_s']:.0f} | {note} |")
  with open(os.path.join(out_dir, 'table.md'), 'w') as f:
    f.write('\n'.join(lines) + '\n')
  _plot(out_dir, rows)


def _plot(out_dir: str, rows: list) -> None:
  import matplotlib
  matplotlib.use('Agg')
  import matplotlib.pyplot as plt
  muon = [r for r in rows if r['part'] == 'muon']
  if muon:
    configs = sorted({r['config'] for r in muon})
    fig, axes = plt.subplots(1, len(configs), figsize=(5 * len(configs), 3.6), squeeze=False)
    for ax, c in zip(axes[0], configs):
      for r in muon:
        if r['config'] == c:
          steps, loss = zip(*r['curve'])
          ax.plot(steps, loss, label=r['name'].split()[-1], lw=1)
      ax.set(title=f'configs/{c}.py', xlabel='step', ylabel='train loss (nats/token)')
      ax.set_ylim(top=min(3.0, ax.get_ylim()[1]))
      ax.legend()
      ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(os.path.join(out_dir, 'muon_vs_adamw.png'), dpi=120)
    plt.close(fig)
  bf = [r for r in rows if r['part'] == 'bf16']
  if bf:
    fig, ax = plt.subplots(figsize=(5, 3.6))
    for stable, label in ((False, 'plain'), (True, 'z-loss + QK-norm')):
      pts = sorted((r['lr'], r['eval_loss'] if not r['diverged'] else float('nan'))
                   for r in bf if r['stable'] == stable)
      ax.plot([p[0] for p in pts], [p[1] for p in pts], 'o-', label=label)
      for r in bf:
        if r['stable'] == stable and r['diverged']:
          ax.axvline(r['lr'], color='C1' if stable else 'C0', ls=':', alpha=0.6)
    ax.set(xscale='log', xlabel='learning rate', ylabel='validation loss',
           title='bfloat16, configs/tiny.py (dotted: diverged)')
    ax.legend()
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(os.path.join(out_dir, 'bf16_lr.png'), dpi=120)
    plt.close(fig)


def main():
  p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  p.add_argument('--part', choices=('muon', 'bf16'), required=True)
  p.add_argument('--configs', default='tiny,pretrain_small')
  p.add_argument('--lrs', default='0.003,0.01,0.03,0.1')
  p.add_argument('--bf16_steps', type=int, default=400)
  p.add_argument('--diverged', type=float, default=4.0,
                 help='a validation loss above this (nats/token) counts as diverged')
  p.add_argument('--runs', default='runs/stability')
  p.add_argument('--out', default='docs/results/stability')
  args = p.parse_args()
  sys.path.insert(0, ROOT)
  rows = muon_part(args) if args.part == 'muon' else bf16_part(args)
  _write(args.out, rows)
  print(f'wrote {args.out}/result.json, table.md and plots')


if __name__ == '__main__':
  main()
