"""A sweep's results: results.csv (one row per finished run, in plan order, rewritten atomically)
and the training curves Approach 1 fits (each run's metrics.jsonl, or a WSD sweep's branch finals).
"""
import csv
import os

from lm.metrics import read_jsonl
from lm.scaling.plan import RunSpec

RESULT_COLUMNS = ('run', 'budget', 'params', 'params_nonembed', 'tokens', 'flops', 'flops_6nd',
                  'flops_6nd_nonembed', 'final_loss', 'eval_loss', 'loss', 'n_layers', 'd_model', 'n_heads', 'd_ff',
                  'steps', 'batch_size', 'seq_len', 'lr', 'seed', 'wall_s')


def result_row(sp: RunSpec, cfg, summary: dict) -> dict:
  return {'run': sp.name, 'budget': sp.budget or '', 'params': summary['params'],
          'params_nonembed': summary['params_nonembed'], 'tokens': summary['tokens'],
          'flops': summary['flops'], 'flops_6nd': summary['flops_6nd'],
          'flops_6nd_nonembed': 6.0 * summary['params_nonembed'] * summary['tokens'],
          'final_loss': summary['final_loss'], 'eval_loss': summary['eval_loss'],
          'loss': summary['eval_loss'], 'n_layers': sp.n_layers, 'd_model': sp.d_model,
          'n_heads': sp.n_heads, 'd_ff': summary.get('d_ff', ''), 'steps': sp.steps,
          'batch_size': cfg.train.batch_size, 'seq_len': cfg.train.seq_len, 'lr': sp.lr,
          'seed': sp.seed, 'wall_s': summary.get('wall_s', '')}


def result_rows(specs: list[RunSpec], finished: dict) -> list[dict]:
  """results.csv rows in plan order (runs that finish out of order still sort the same)."""
  return [result_row(*finished[sp.name]) for sp in specs if sp.name in finished]


def write_results(path: str, rows: list[dict]) -> None:
  """results.csv through a temporary file and a rename: a reader never sees half a row."""
  tmp = f'{path}.tmp{os.getpid()}'
  with open(tmp, 'w', newline='') as f:
    w = csv.DictWriter(f, fieldnames=RESULT_COLUMNS)
    w.writeheader()
    for r in rows:
      w.writerow({k: r.get(k, '') for k in RESULT_COLUMNS})
    f.flush()
    os.fsync(f.fileno())
  os.replace(tmp, path)


def run_curves(workdir: str, runs: list[tuple[str, int]]) -> dict:
  """Per-run training curves (flops, tokens, loss) from metrics.jsonl, for Approach 1."""
  out = {}
  for name, params in runs:
    rows = read_jsonl(os.path.join(workdir, 'runs', name, 'metrics.jsonl'))
    rows = [r for r in rows if isinstance(r.get('loss_avg'), float)]
    out[name] = {'params': params, 'curve_flops': [r['flops'] for r in rows],
                 'curve_tokens': [r['tokens'] for r in rows],
                 'curve_loss': [r['loss_avg'] for r in rows]}
  return out


def wsd_curves(finished: list[tuple[RunSpec, dict]]) -> dict:
  """Per model size, the curve through its WSD branches' final losses (flops, tokens, eval
  loss at the end of each cooldown): each point is what a run of that length reaches, unlike
  the middle of one long run, whose learning rate has not decayed there."""
  by_size = {}
  for sp, summary in finished:
    by_size.setdefault((sp.n_layers, sp.d_model, sp.seed), []).append(summary)
  out = {}
  for (L, d, seed), runs in sorted(by_size.items()):
    runs.sort(key=lambda r: r['tokens'])
    out[f'L{L}_d{d}_s{seed}'] = {'params': runs[0]['params'],
                                 'curve_flops': [r['flops'] for r in runs],
                                 'curve_tokens': [r['tokens'] for r in runs],
                                 'curve_loss': [r['eval_loss'] for r in runs]}
  return out


def usable_curves(curves: dict | None) -> dict | None:
  """The curves Approach 1 can use (two or more points each), or None when fewer than two
  remain: a WSD sweep of one budget has one point per size, and its fit goes without Approach 1
  rather than failing on it."""
  kept = {k: v for k, v in (curves or {}).items() if len(v.get('curve_flops') or []) >= 2}
  return kept if len(kept) >= 2 else None
