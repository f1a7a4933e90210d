"""Activation functions, their derivatives, and why a network needs one between linear layers.

  python -m experiments.activations [--out=DIR]
"""
from absl import app
import jax
import jax.numpy as jnp
import numpy as np

from experiments import common

NAME = 'activations'
ACTIVATIONS = {
    'sigmoid': jax.nn.sigmoid,
    'tanh': jnp.tanh,
    'ReLU': jax.nn.relu,
    'GELU (erf, exact)': lambda x: jax.nn.gelu(x, approximate=False),
    'GELU (tanh approx.)': lambda x: jax.nn.gelu(x, approximate=True),
}


def curves(lo: float = -5.0, hi: float = 5.0, n: int = 1001) -> dict:
  """Each activation and its derivative (by jax.grad) on a grid."""
  x = jnp.linspace(lo, hi, n)
  out = {'x': np.asarray(x)}
  for name, f in ACTIVATIONS.items():
    out[name] = (np.asarray(f(x)), np.asarray(jax.vmap(jax.grad(f))(x)))
  return out


def collapse(seed: int = 0, d_in: int = 3, d_hidden: int = 16, d_out: int = 2,
             n: int = 512) -> dict:
  """Two linear layers equal one linear layer; with a ReLU between them they do not.

  "Do not" is measured as the best any single affine map can do: a least-squares fit of
  y = A x + c to the two-layer network's outputs on n random inputs.
  """
  k = jax.random.split(jax.random.key(seed), 5)
  w1 = jax.random.normal(k[0], (d_hidden, d_in))
  b1 = jax.random.normal(k[1], (d_hidden,))
  w2 = jax.random.normal(k[2], (d_out, d_hidden))
  b2 = jax.random.normal(k[3], (d_out,))
  x = jax.random.normal(k[4], (n, d_in))
  stacked = (x @ w1.T + b1) @ w2.T + b2
  merged = x @ (w2 @ w1).T + (w2 @ b1 + b2)
  with_relu = jax.nn.relu(x @ w1.T + b1) @ w2.T + b2

  def affine_fit_error(y):
    # The best single affine map (least squares on [x, 1]), relative to the output's spread.
    xa = np.concatenate([np.asarray(x, np.float64), np.ones((n, 1))], 1)
    y = np.asarray(y, np.float64)
    coef, *_ = np.linalg.lstsq(xa, y, rcond=None)
    return float(np.sqrt(np.mean((xa @ coef - y) ** 2)) / np.std(y))

  return {
      'max_diff_linear': float(jnp.max(jnp.abs(stacked - merged))),
      'max_diff_relu': float(jnp.max(jnp.abs(with_relu - merged))),
      'fit_error_linear': affine_fit_error(stacked),
      'fit_error_relu': affine_fit_error(with_relu),
  }


def run() -> dict:
  c = curves()
  gelu_gap = np.abs(c['GELU (erf, exact)'][0] - c['GELU (tanh approx.)'][0])
  return {'curves': c, 'gelu_max_diff': float(gelu_gap.max()),
          'gelu_argmax': float(c['x'][gelu_gap.argmax()]), **collapse()}


def report(r: dict) -> None:
  c = r['curves']
  print('activation values at x = -2, 0, 2:')
  picks = [int(np.argmin(np.abs(c['x'] - v))) for v in (-2, 0, 2)]
  for name in ACTIVATIONS:
    print(f'  {name:20s} ' + '  '.join(f'{c[name][0][i]:+.4f}' for i in picks))
  print(f'max |GELU_exact - GELU_tanh| on [-5, 5] = {r["gelu_max_diff"]:.2e} '
        f'(at x = {r["gelu_argmax"]:+.2f})')
  print('\nW2 (W1 x + b1) + b2  vs  (W2 W1) x + (W2 b1 + b2):')
  print(f'  no activation: max abs diff {r["max_diff_linear"]:.1e}; the best single affine map '
        f'misses by {r["fit_error_linear"]:.1e}\n'
        '    (relative RMS): the two layers are one linear layer')
  print(f'  ReLU between : max abs diff {r["max_diff_relu"]:.2f}; the best single affine map '
        f'misses by {r["fit_error_relu"]:.2f}\n    (relative RMS): no linear layer can replace it')


def plot(r: dict, folder: str) -> list[str]:
  import matplotlib.pyplot as plt
  c = r['curves']
  paths = []
  for which, ylabel, filename in ((0, 'f(x)', 'activations.png'),
                                  (1, "f'(x)", 'derivatives.png')):
    fig, ax = plt.subplots(figsize=(7, 4.5))
    for name in ACTIVATIONS:
      ax.plot(c['x'], c[name][which], label=name, ls='--' if 'approx' in name else '-')
    ax.axhline(0, color='k', lw=0.5)
    ax.axvline(0, color='k', lw=0.5)
    ax.set(xlabel='x', ylabel=ylabel, title='activations' if which == 0 else 'their derivatives',
           ylim=(-1.2, 3) if which == 0 else (-0.3, 1.3))
    ax.legend()
    paths.append(common.save(fig, folder, filename))
  return paths


def main(argv):
  del argv
  common.main(NAME, run, report, plot)


if __name__ == '__main__':
  app.run(main)
