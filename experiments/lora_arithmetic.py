"""LoRA arithmetic: a 4096 x 4096 weight against rank-r adapters, counted from shape-only pytrees.

  python -m experiments.lora_arithmetic [--out=DIR]

A rank-r adapter replaces the update to W (d x d) by B @ A with A: d x r and B: r x d, so it
trains 2 d r numbers instead of d^2. jax.eval_shape traces the initialisers without running
them: the leaves are ShapeDtypeStructs and nothing of the 64 MB is allocated.
"""
from absl import app
import jax
import jax.numpy as jnp

from experiments import common
from lm.model.flops import count_params

NAME = 'lora_arithmetic'


def full_shapes(d: int):
  return jax.eval_shape(lambda k: {'w': jax.random.normal(k, (d, d))}, jax.random.key(0))


def lora_shapes(d: int, rank: int):
  def init(k):
    # B starts at zero so the adapted model starts out identical to the frozen one.
    return {'a': jax.random.normal(k, (d, rank)), 'b': jnp.zeros((rank, d))}
  return jax.eval_shape(init, jax.random.key(0))


def run(d: int = 4096, ranks=(1, 4, 16, 64)) -> dict:
  full = full_shapes(d)
  n_full = count_params(full)
  rows = []
  for r in ranks:
    n = count_params(lora_shapes(d, r))
    rows.append({'rank': r, 'params': n, 'fraction': n / n_full, 'mib': n * 4 / 2**20})
  return {'d': d, 'full_params': n_full, 'full_mib': n_full * 4 / 2**20,
          'leaf_type': type(full['w']).__name__, 'rows': rows}


def report(r: dict) -> None:
  print(f'full {r["d"]} x {r["d"]} matrix: {r["full_params"]:,} parameters '
        f'({r["full_mib"]:.0f} MiB in float32; counted from {r["leaf_type"]} leaves)')
  print('  rank   adapter params   share of full   float32 MiB')
  for row in r['rows']:
    print(f'  {row["rank"]:4d}   {row["params"]:14,}   {row["fraction"]:12.2%}   '
          f'{row["mib"]:11.2f}')


def plot(r: dict, folder: str) -> list[str]:
  import matplotlib.pyplot as plt
  fig, ax = plt.subplots(figsize=(7, 4.5))
  names = ['full'] + [f'rank {row["rank"]}' for row in r['rows']]
  values = [r['full_params']] + [row['params'] for row in r['rows']]
  bars = ax.bar(names, values, color=['C3'] + ['C0'] * len(r['rows']))
  for bar, row in zip(bars[1:], r['rows']):
    ax.annotate(f'{row["fraction"]:.2%}', (bar.get_x() + bar.get_width() / 2, bar.get_height()),
                ha='center', va='bottom')
  ax.set(yscale='log', xlabel='weights trained', ylabel='parameters (log scale)',
         title=f'a {r["d"]} x {r["d"]} matrix vs LoRA adapters (2 x {r["d"]} x rank)')
  return [common.save(fig, folder, 'lora_params.png')]


def main(argv):
  del argv
  common.main(NAME, run, report, plot)


if __name__ == '__main__':
  app.run(main)
