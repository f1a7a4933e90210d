"""μP's coordinate check: how large each layer's activations are after a few steps, by width.

  python -m benchmarks.coord_check --out=docs/results/mup

Models of widths --widths (n_heads fixed, so the head dim grows with width and μP's attention
scaling is exercised) train --steps steps of Adam at one learning rate (constant, no clipping or
decay, so nothing but the parametrisation couples to width) on the project's byte corpus, under
SP and under μP with base width the smallest width. At every step the RMS of each module's
output on that step's batch is recorded: each block's attention and MLP outputs, the residual
stream after each block, and the logits. Under SP the updates of the hidden matrices grow with
width, and with them the activations; under μP they should not (Yang et al. 2021, Fig. 5).
Writes OUT/coord_check.json (every row), OUT/coord_check.md (max/min over widths per layer at
the last step) and OUT/coord_check.png.
"""
import argparse
import json
import os
import time

import jax
import jax.numpy as jnp
import numpy as np

from configs import tiny
from lm.config import ModelConfig
from lm.data import tokens as data_lib
from lm.model import transformer as model_lib
from lm.stages import pretrain as train_lib
from lm.training import optim


def dataset(max_bytes: int = 8_000_000):
  """The tiny config's corpus (bytes of the Python standard library), prepared once."""
  cfg = tiny.get_config()
  cfg.data.max_bytes = max_bytes
  return data_lib.prepare(cfg.data, progress=False)


def model_config(width: int, vocab: int, parametrization: str, base_width: int, n_heads: int,
                 n_layers: int, seq_len: int) -> ModelConfig:
  mup = {} if parametrization == 'sp' else dict(
      mup_base_width=base_width, mup_base_head_dim=base_width // n_heads)
  return ModelConfig(vocab_size=vocab, n_layers=n_layers, d_model=width, n_heads=n_heads,
                     n_kv_heads=n_heads, d_ff=4 * width, max_len=seq_len,
                     parametrization=parametrization, **mup)


def activation_rms(mc: ModelConfig, params, x_BT) -> dict:
  """{module: RMS of its output} for each block's attention, MLP and output, and the logits."""
  logits, state = model_lib.Transformer(mc).apply(
      {'params': params}, x_BT, capture_intermediates=True, mutable=['intermediates'])
  inter = state['intermediates']
  rms = lambda a: jnp.sqrt(jnp.mean(jnp.square(a.astype(jnp.float32))))
  out = {}
  for i in range(mc.n_layers):
    block = inter[f'layer_{i}']
    out[f'layer {i} attention'] = rms(block['attn']['__call__'][0][0])
    out[f'layer {i} MLP'] = rms(block['mlp']['__call__'][0])
    out[f'layer {i} residual'] = rms(block['__call__'][0][0])
  out['logits'] = rms(logits)
  return out


def trace(mc: ModelConfig, ds, steps: int, lr: float, seed: int, batch: int, seq_len: int):
  """[(step, {module: rms})] for steps 0..steps: activations on each step's batch, measured
  before that step's update (step `steps` after the last update)."""
  tc = optim.OptimizerConfig(steps=max(steps, 2), lr=lr, warmup_steps=0, schedule='constant',
                             weight_decay=0.0, grad_clip=0.0)
  params = model_lib.init_params(mc, jax.random.PRNGKey(seed))
  opt = optim.make_optimizer(tc, params, model=mc)
  state = opt.init(params)

  @jax.jit
  def step(params, state, b):
    grads = jax.grad(lambda p: train_lib.next_token_loss(mc, p, b))(params)
    updates, state = opt.update(grads, state, params)
    return jax.tree.map(jnp.add, params, updates), state

  measure = jax.jit(lambda p, x: activation_rms(mc, p, x))
  out = []
  for t in range(steps + 1):
    b = jnp.asarray(ds.batch('train', t, batch, seq_len, seed))
    out.append((t, {k: float(v) for k, v in measure(params, b[:, :-1]).items()}))
    if t < steps:
      params, state = step(params, state, b)
  return out


def summarise(rows: list, steps: int) -> dict:
  """{parametrization: {module: max/min over widths of the seed-mean RMS at the last step}}."""
  out = {}
  for p in sorted({r['parametrization'] for r in rows}):
    last = [r for r in rows if r['parametrization'] == p and r['step'] == steps]
    out[p] = {}
    for module in sorted({r['module'] for r in last}):
      by_width = {}
      for r in last:
        if r['module'] == module:
          by_width.setdefault(r['width'], []).append(r['rms'])
      means = {w: float(np.mean(v)) for w, v in by_width.items()}
      out[p][module] = {'by_width': means, 'ratio': max(means.values()) / min(means.values())}
  return out


def write(out_dir: str, rows: list, summary: dict, args) -> None:
  os.makedirs(out_dir, exist_ok=True)
  with open(os.path.join(out_dir, 'coord_check.json'), 'w') as f:
    json.dump({'args': vars(args), 'summary': summary, 'rows': rows}, f, indent=1)
  widths = sorted({r['width'] for r in rows})
  lines = [f'Activation RMS after {args.steps} Adam steps at lr {args.lr:g} (mean of '
           f'{len(args.seeds.split(","))} seeds), widths {widths[0]}-{widths[-1]}; '
           'max/min is the spread over widths.', '',
           '| module | ' + ' | '.join(f'SP {w}' for w in widths) + ' | SP max/min | '
           + ' | '.join(f'μP {w}' for w in widths) + ' | μP max/min |',
           '|---' * (2 * len(widths) + 3) + '|']
  for module in summary['sp']:
    cells = [module]
    for p in ('sp', 'mup'):
      s = summary[p][module]
      cells += [f"{s['by_width'][w]:.3g}" for w in widths] + [f"{s['ratio']:.2f}"]
    lines.append('| ' + ' | '.join(cells) + ' |')
  with open(os.path.join(out_dir, 'coord_check.md'), 'w') as f:
    f.write('\n'.join(lines) + '\n')
  plot(out_dir, rows, args)


def plot(out_dir: str, rows: list, args) -> None:
  import matplotlib
  matplotlib.use('Agg')
  import matplotlib.pyplot as plt
  show = sorted({0, 1, args.steps // 2, args.steps})
  modules = sorted({r['module'] for r in rows})
  fig, axes = plt.subplots(2, len(show), figsize=(3.6 * len(show), 6.4), sharey='row',
                           squeeze=False)
  for i, p in enumerate(('sp', 'mup')):
    for j, t in enumerate(show):
      ax = axes[i, j]
      for m in modules:
        pts = {}
        for r in rows:
          if r['parametrization'] == p and r['step'] == t and r['module'] == m:
            pts.setdefault(r['width'], []).append(r['rms'])
        w = sorted(pts)
        ax.plot(w, [np.mean(pts[x]) for x in w], marker='o', ms=3, lw=1, label=m)
      ax.set_xscale('log', base=2)
      ax.set_yscale('log')
      ax.set_title(f"{'SP' if p == 'sp' else 'μP'}, step {t}")
      ax.grid(alpha=0.3)
      if i == 1:
        ax.set_xlabel('width (d_model)')
      if j == 0:
        ax.set_ylabel('activation RMS')
  axes[0, -1].legend(fontsize=7)
  fig.tight_layout()
  fig.savefig(os.path.join(out_dir, 'coord_check.png'), dpi=120)
  plt.close(fig)


def main():
  ap = argparse.ArgumentParser(description=__doc__.split('\n')[0])
  ap.add_argument('--out', default='docs/results/mup')
  ap.add_argument('--widths', default='64,128,256,512,1024')
  ap.add_argument('--steps', type=int, default=10)
  ap.add_argument('--lr', type=float, default=0.01)
  ap.add_argument('--seeds', default='0,1,2')
  ap.add_argument('--n_heads', type=int, default=4)
  ap.add_argument('--n_layers', type=int, default=2)
  ap.add_argument('--batch', type=int, default=8)
  ap.add_argument('--seq_len', type=int, default=64)
  args = ap.parse_args()
  widths = [int(w) for w in args.widths.split(',')]
  ds = dataset()
  rows = []
  for p in ('sp', 'mup'):
    for w in widths:
      for seed in (int(s) for s in args.seeds.split(',')):
        t0 = time.perf_counter()
        mc = model_config(w, ds.tokenizer.vocab_size, p, widths[0], args.n_heads,
                          args.n_layers, args.seq_len)
        for t, acts in trace(mc, ds, args.steps, args.lr, seed, args.batch, args.seq_len):
          rows += [{'parametrization': p, 'width': w, 'seed': seed, 'step': t, 'module': m,
                    'rms': v} for m, v in acts.items()]
        print(f'{p} width {w} seed {seed}: logits RMS {acts["logits"]:.3g}, '
              f'{time.perf_counter() - t0:.0f} s', flush=True)
  summary = summarise(rows, args.steps)
  write(args.out, rows, summary, args)
  for p in ('sp', 'mup'):
    worst = max(summary[p].items(), key=lambda kv: kv[1]['ratio'])
    print(f'{p}: largest max/min over widths {worst[1]["ratio"]:.2f} ({worst[0]})')


if __name__ == '__main__':
  main()
