"""Learning-rate transfer across width, under SP and μP.

  python -m benchmarks.lr_transfer --out=docs/results/mup

For each width in --widths (n_heads fixed, as in benchmarks/coord_check.py) and each rate of a
2x grid (--lr_exps: powers of two), a model trains --steps steps with the project's AdamW
recipe (warmup then cosine to 10%, b2 0.99, weight decay 0.1, clipping 1.0) on the byte corpus
and is scored on fixed validation batches. Under μP (base width the smallest width) the best
rate should stay put as width grows (Yang et al. 2022, Fig. 1); under SP it falls. Rows are
appended to OUT/lr_transfer.json as they finish (a rerun skips them); OUT/lr_transfer.md holds
the best rate per width and OUT/lr_transfer.png the loss-against-rate curves.

  python -m benchmarks.lr_transfer --ablate --ablate_width=128 --out=docs/results/mup

trains one width at the μP base rate with one of μP's prescriptions at a time put back to SP's
(the logit multiplier 1, the hidden matrices' init std, the attention scale, an untied head),
beside plain μP and SP at SP's best rate: OUT/ablation.md says which prescription costs what at
this width and length.
"""
import argparse
import dataclasses
import json
import math
import os
import time

import jax
import jax.numpy as jnp
import numpy as np

from benchmarks.coord_check import dataset, model_config
from lm.model import parametrization as mup
from lm.model import transformer as model_lib
from lm.stages import pretrain as train_lib
from lm.training import optim


def train_one(mc, ds, lr: float, steps: int, batch: int, seq_len: int, seed: int,
              val_batches: int) -> dict:
  tc = optim.OptimizerConfig(steps=steps, lr=lr, warmup_steps=max(1, steps // 10))
  params = model_lib.init_params(mc, jax.random.PRNGKey(seed))
  opt = optim.make_optimizer(tc, params, model=mc)
  state = opt.init(params)
  loss_fn = lambda p, b: train_lib.next_token_loss(mc, p, b)

  @jax.jit
  def step(params, state, b):
    loss, grads = jax.value_and_grad(loss_fn)(params, b)
    updates, state = opt.update(grads, state, params)
    return jax.tree.map(jnp.add, params, updates), state, loss

  evaluate = jax.jit(loss_fn)
  t0 = time.perf_counter()
  losses = []
  for t in range(steps):
    params, state, loss = step(params, state, jnp.asarray(ds.batch('train', t, batch, seq_len,
                                                                   seed)))
    losses.append(loss)
  train_loss = float(np.mean([float(x) for x in losses[-max(1, steps // 10):]]))
  val = [float(evaluate(params, jnp.asarray(ds.batch('val', i, batch, seq_len, 0))))
         for i in range(val_batches)]
  val_loss = float(np.mean(val))
  return {'train_loss': train_loss if math.isfinite(train_loss) else None,
          'val_loss': val_loss if math.isfinite(val_loss) else None,
          'wall_s': time.perf_counter() - t0}


def ablation(args, ds) -> None:
  """μP at width --ablate_width and rate 2^--ablate_lr_exp with one prescription undone at a time
  (by replacing the function of lm/model/parametrization.py that sets it), and SP at its best."""
  w, base = args.ablate_width, int(args.widths.split(',')[0])
  mc = model_config(w, ds.tokenizer.vocab_size, 'mup', base, args.n_heads, args.n_layers,
                    args.seq_len)
  keep = {name: getattr(mup, name) for name in ('logit_multiplier', 'hidden_init_std')}
  variants = [('μP', mc, {}), ('μP, logits x 1 (no 1/m)', mc, {'logit_multiplier': lambda c: 1.0}),
              ('μP, hidden init std as SP', mc, {'hidden_init_std': lambda c: c.init_std}),
              ('μP, attention 1/sqrt(H) as SP', dataclasses.replace(mc, mup_base_head_dim=mc.head_dim), {}),
              ('μP, untied head', dataclasses.replace(mc, tie_embeddings=False), {}),
              ('μP, all three of logits, init and attention as SP',
               dataclasses.replace(mc, mup_base_head_dim=mc.head_dim),
               {'logit_multiplier': lambda c: 1.0, 'hidden_init_std': lambda c: c.init_std})]
  lines = [f'Width {w} (base {base}), {args.steps} steps, μP at 2^{args.ablate_lr_exp}; SP at '
           f'2^{args.ablate_sp_lr_exp}. Validation loss.', '', '| model | validation loss |',
           '|---|---|']
  rows = []
  for name, c, patch in variants:
    for k, f in patch.items():
      setattr(mup, k, f)
    try:
      r = train_one(c, ds, 2.0 ** args.ablate_lr_exp, args.steps, args.batch, args.seq_len,
                    args.seed, args.val_batches)
    finally:
      for k, f in keep.items():
        setattr(mup, k, f)
    rows.append(dict(r, name=name))
    print(f"{name}: {r['val_loss']:.4f}", flush=True)
  sp = model_config(w, ds.tokenizer.vocab_size, 'sp', base, args.n_heads, args.n_layers,
                    args.seq_len)
  r = train_one(sp, ds, 2.0 ** args.ablate_sp_lr_exp, args.steps, args.batch, args.seq_len,
                args.seed, args.val_batches)
  rows.append(dict(r, name=f'SP at 2^{args.ablate_sp_lr_exp}'))
  lines += [f"| {r['name']} | {r['val_loss']:.4f} |" for r in rows]
  os.makedirs(args.out, exist_ok=True)
  with open(os.path.join(args.out, 'ablation.md'), 'w') as f:
    f.write('\n'.join(lines) + '\n')
  with open(os.path.join(args.out, 'ablation.json'), 'w') as f:
    json.dump({'args': vars(args), 'rows': rows}, f, indent=1)
  print('\n'.join(lines))


def best_rates(rows: list) -> dict:
  """{parametrization: {width: (best lr exponent, its validation loss)}}."""
  out = {}
  for r in rows:
    if r['val_loss'] is None:
      continue
    cur = out.setdefault(r['parametrization'], {}).get(r['width'])
    if cur is None or r['val_loss'] < cur[1]:
      out[r['parametrization']][r['width']] = (r['lr_exp'], r['val_loss'])
  return out


def write(out_dir: str, rows: list, args) -> None:
  os.makedirs(out_dir, exist_ok=True)
  best = best_rates(rows)
  with open(os.path.join(out_dir, 'lr_transfer.json'), 'w') as f:
    json.dump({'args': vars(args), 'best': {p: {str(w): v for w, v in b.items()}
                                            for p, b in best.items()}, 'rows': rows}, f, indent=1)
  widths = sorted({r['width'] for r in rows})
  lines = [f'Best learning rate (2x grid, powers of two) by width after {args.steps} steps; '
           'validation loss at that rate.', '',
           '| parametrization | ' + ' | '.join(f'width {w}' for w in widths)
           + ' | moves (grid steps) |', '|---' * (len(widths) + 2) + '|']
  for p in ('sp', 'mup'):
    if p not in best:
      continue
    exps = [best[p][w][0] for w in widths if w in best[p]]
    cells = [f'2^{best[p][w][0]} = {2.0 ** best[p][w][0]:.3g} ({best[p][w][1]:.3f})'
             if w in best[p] else '-' for w in widths]
    lines.append(f"| {'SP' if p == 'sp' else 'μP'} | " + ' | '.join(cells)
                 + f' | {max(exps) - min(exps)} |')
  with open(os.path.join(out_dir, 'lr_transfer.md'), 'w') as f:
    f.write('\n'.join(lines) + '\n')
  plot(out_dir, rows, best)


def plot(out_dir: str, rows: list, best: dict) -> None:
  import matplotlib
  matplotlib.use('Agg')
  import matplotlib.pyplot as plt
  fig, axes = plt.subplots(1, 2, figsize=(10, 3.8), sharey=True)
  widths = sorted({r['width'] for r in rows})
  colors = plt.cm.viridis(np.linspace(0, 0.9, len(widths)))
  for ax, p in zip(axes, ('sp', 'mup')):
    for w, col in zip(widths, colors):
      pts = sorted((r['lr_exp'], r['val_loss']) for r in rows
                   if r['parametrization'] == p and r['width'] == w and r['val_loss'] is not None)
      if pts:
        ax.plot([2.0 ** e for e, _ in pts], [v for _, v in pts], marker='o', ms=3, lw=1,
                color=col, label=f'width {w}')
        if w in best.get(p, {}):
          e, v = best[p][w]
          ax.plot([2.0 ** e], [v], marker='*', ms=10, color=col)
    ax.set_xscale('log', base=2)
    ax.set(title='SP' if p == 'sp' else f'μP (base width {widths[0]})', xlabel='learning rate')
    ax.grid(alpha=0.3)
  axes[0].set_ylabel('validation loss (nats/byte)')
  lo = min(r['val_loss'] for r in rows if r['val_loss'] is not None)
  axes[0].set_ylim(lo - 0.05, lo + 1.0)
  axes[1].legend(fontsize=8)
  fig.tight_layout()
  fig.savefig(os.path.join(out_dir, 'lr_transfer.png'), dpi=120)
  plt.close(fig)


def main():
  ap = argparse.ArgumentParser(description=__doc__.split('\n')[0])
  ap.add_argument('--out', default='docs/results/mup')
  ap.add_argument('--widths', default='32,64,128,256,512')
  ap.add_argument('--lr_exps', default='-12,-11,-10,-9,-8,-7,-6,-5,-4,-3')
  ap.add_argument('--parametrizations', default='sp,mup')
  ap.add_argument('--steps', type=int, default=250)
  ap.add_argument('--batch', type=int, default=16)
  ap.add_argument('--seq_len', type=int, default=64)
  ap.add_argument('--n_heads', type=int, default=4)
  ap.add_argument('--n_layers', type=int, default=2)
  ap.add_argument('--val_batches', type=int, default=8)
  ap.add_argument('--seed', type=int, default=0)
  ap.add_argument('--ablate', action='store_true')
  ap.add_argument('--ablate_width', type=int, default=128)
  ap.add_argument('--ablate_lr_exp', type=int, default=-7)
  ap.add_argument('--ablate_sp_lr_exp', type=int, default=-9)
  args = ap.parse_args()
  if args.ablate:
    ablation(args, dataset())
    return
  widths = [int(w) for w in args.widths.split(',')]
  path = os.path.join(args.out, 'lr_transfer.json')
  rows = []
  if os.path.exists(path):
    with open(path) as f:
      rows = json.load(f)['rows']
  done = {(r['parametrization'], r['width'], r['lr_exp']) for r in rows}
  ds = dataset()
  for w in widths:
    for p in args.parametrizations.split(','):
      for e in (int(x) for x in args.lr_exps.split(',')):
        if (p, w, e) in done:
          continue
        mc = model_config(w, ds.tokenizer.vocab_size, p, widths[0], args.n_heads, args.n_layers,
                          args.seq_len)
        r = train_one(mc, ds, 2.0 ** e, args.steps, args.batch, args.seq_len, args.seed,
                      args.val_batches)
        r.update(parametrization=p, width=w, lr_exp=e, lr=2.0 ** e, steps=args.steps)
        rows.append(r)
        print(f"{p} width {w} lr 2^{e}: val {r['val_loss']}, {r['wall_s']:.0f} s", flush=True)
        write(args.out, rows, args)
  write(args.out, rows, args)
  for p, b in best_rates(rows).items():
    print(p, {w: f'2^{e}' for w, (e, _) in sorted(b.items())})


if __name__ == '__main__':
  main()
