"""Fine-tuning with and without replay: what each run kept of the pretraining corpus and what it
learned, from finished `run.py finetune` runs.

    python -m benchmarks.replay_scan --out=docs/results/replay \
        "no replay, lr 3e-3=runs/scan/r0" "replay 0.25, lr 3e-3=runs/scan/w25" ...

Each run folder's metrics.jsonl evaluations (every train.eval_every steps) give the pretraining
corpus's validation loss, the held-out exact match of the instruction families (`acc/all`) and the
code task's gold reward of greedy answers; base_eval.json gives the base model's. Writes
result.json, table.md and frontier.png (exact match against the share of the base's validation
loss kept, base loss / run loss, one line per run through its evaluations).
"""
import argparse
import json
import os


def read_run(workdir: str) -> dict:
  base = json.load(open(os.path.join(workdir, 'base_eval.json')))
  cfg = json.load(open(os.path.join(workdir, 'config.json')))
  evals = []
  for line in open(os.path.join(workdir, 'metrics.jsonl')):
    r = json.loads(line)
    if 'pretrain_eval_loss' in r:
      evals.append({'step': r['step'], 'val_loss': r['pretrain_eval_loss'],
                    'exact': r.get('acc/all'), 'gold': r.get('gold'),
                    'kept': base['pretrain_eval_loss'] / r['pretrain_eval_loss'],
                    'families': {k[4:]: v for k, v in r.items()
                                 if k.startswith('acc/') and k != 'acc/all'}})
  return {'workdir': os.path.abspath(workdir), 'base_val_loss': base['pretrain_eval_loss'],
          'replay_fraction': cfg['finetune'].get('replay_fraction', 0.0),
          'lr': cfg['train']['lr'], 'steps': cfg['train']['steps'],
          'lora_rank': cfg.get('lora', {}).get('rank', 0), 'evals': evals}


def table(result: dict) -> str:
  lines = ['| run | replay | lr | steps | LoRA | val loss (base %.3f) | kept | exact match '
           '(instructions) | gold (code, greedy) |' % next(iter(result.values()))['base_val_loss'],
           '|---|---|---|---|---|---|---|---|---|']
  for name, r in result.items():
    e = r['evals'][-1]
    lines.append(f"| {name} | {r['replay_fraction']} | {r['lr']} | {e['step']} | "
                 f"{r['lora_rank'] or '-'} | {e['val_loss']:.3f} | {e['kept']:.1%} | "
                 f"{e['exact']:.1%} | {e['gold']:.3f} |")
  return '\n'.join(lines) + '\n'


def plot(result: dict, path: str) -> None:
  import matplotlib
  matplotlib.use('Agg')
  import matplotlib.pyplot as plt
  fig, ax = plt.subplots(figsize=(9, 4.5))
  colors = plt.get_cmap('tab20').colors
  for i, (name, r) in enumerate(result.items()):
    xs = [100 * e['kept'] for e in r['evals']]
    ys = [100 * e['exact'] for e in r['evals']]
    # Full fine-tuning solid, LoRA dashed; tab20's ten dark shades first, then its ten light ones.
    ax.plot(xs, ys, 'o--' if r['lora_rank'] else 'o-', color=colors[2 * i % 20 + i // 10 % 2],
            label=name, ms=4)
    ax.annotate(str(r['evals'][-1]['step']), (xs[-1], ys[-1]), fontsize=7,
                textcoords='offset points', xytext=(3, 3))
  ax.axvline(100 / 1.1, color='gray', ls=':', lw=1)    # within 10% of the base's loss (full)
  ax.axvline(100 / 1.15, color='gray', ls=':', lw=1)   # within 15% (LoRA)
  ax.axhline(60, color='gray', ls=':', lw=1)
  ax.set_xlabel("validation loss kept: base loss / run's loss (%)")
  ax.set_ylabel('held-out instruction exact match (%)')
  ax.set_title('fine-tuning: what is learned against what is kept', fontsize=10)
  ax.grid(alpha=0.3)
  ax.legend(fontsize=7, loc='upper left', bbox_to_anchor=(1.01, 1.0))
  fig.tight_layout()
  fig.savefig(path, dpi=100)
  plt.close(fig)


def main():
  ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  ap.add_argument('--out', required=True)
  ap.add_argument('runs', nargs='+', help='"label=RUN_DIR"')
  a = ap.parse_args()
  result = {}
  for spec in a.runs:
    label, d = spec.rsplit('=', 1)
    result[label] = read_run(d)
  os.makedirs(a.out, exist_ok=True)
  with open(os.path.join(a.out, 'result.json'), 'w') as f:
    json.dump(result, f, indent=1)
  with open(os.path.join(a.out, 'table.md'), 'w') as f:
    f.write(table(result))
  plot(result, os.path.join(a.out, 'frontier.png'))
  print(table(result))


if __name__ == '__main__':
  main()
