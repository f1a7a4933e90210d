"""The hand-traced forward pass (2 -> 2 ReLU -> 1 sigmoid) and one gradient step, by hand and JAX.

  python -m experiments.forward_pass [--out=DIR]
"""
from absl import app
import jax
import jax.numpy as jnp
import numpy as np

from experiments import common
from lm.model.flops import count_params

NAME = 'forward_pass'
X = [1.0, 2.0]
TARGET = 1.0
# Row i of hidden.w holds the weights of hidden neuron i.
PARAMS = {
    'hidden': {'w': [[0.5, -0.3], [0.2, 0.4]], 'b': [0.3, -0.1]},
    'out': {'w': [1.0, -1.0], 'b': 0.5},
}


def forward(params: dict, x: jax.Array) -> dict:
  """Every intermediate of the forward pass, by name."""
  z_hidden = params['hidden']['w'] @ x + params['hidden']['b']
  h = jax.nn.relu(z_hidden)
  z = params['out']['w'] @ h + params['out']['b']
  return {'z_hidden': z_hidden, 'h': h, 'z': z, 'out': jax.nn.sigmoid(z)}


def loss_fn(params: dict, x: jax.Array, target: float) -> jax.Array:
  return (forward(params, x)['out'] - target) ** 2


def hand_gradients(params: dict, x: np.ndarray, target: float) -> tuple[dict, list[str]]:
  """The chain rule one factor at a time (float64 numpy); returns the grads and a printed trace."""
  w_h = np.asarray(params['hidden']['w'], np.float64)
  b_h = np.asarray(params['hidden']['b'], np.float64)
  w_o = np.asarray(params['out']['w'], np.float64)
  b_o = float(params['out']['b'])
  z_h = w_h @ x + b_h
  h = np.maximum(z_h, 0)
  z = w_o @ h + b_o
  out = 1 / (1 + np.exp(-z))
  dl_dout = 2 * (out - target)          # L = (out - t)^2
  dout_dz = out * (1 - out)             # sigmoid'(z)
  dl_dz = dl_dout * dout_dz
  dl_dw_o = dl_dz * h                   # dz/dw_out = h
  dl_db_o = dl_dz                       # dz/db_out = 1
  dl_dh = dl_dz * w_o                   # dz/dh = w_out
  dh_dz_h = (z_h > 0).astype(np.float64)  # ReLU'(z) = 1[z > 0]
  dl_dz_h = dl_dh * dh_dz_h
  dl_dw_h = np.outer(dl_dz_h, x)        # dz_hidden_i/dw_ij = x_j
  dl_db_h = dl_dz_h                     # dz_hidden_i/db_i = 1
  trace = [
      f'dL/dout        = 2(out - t)        = 2({out:.4f} - {target}) = {dl_dout:.4f}',
      f'dout/dz        = out(1 - out)      = {dout_dz:.4f}',
      f'dL/dz          = dL/dout * dout/dz = {dl_dz:.4f}',
      f'dL/dw_out      = dL/dz * h         = {np.round(dl_dw_o, 4).tolist()}',
      f'dL/db_out      = dL/dz             = {dl_db_o:.4f}',
      f'dL/dh          = dL/dz * w_out     = {np.round(dl_dh, 4).tolist()}',
      f'dh/dz_hidden   = 1[z_hidden > 0]   = {dh_dz_h.tolist()}',
      f'dL/dz_hidden   = dL/dh * dh/dz_hid = {np.round(dl_dz_h, 4).tolist()}',
      f'dL/dw_hidden   = outer(dL/dz_hidden, x) = {np.round(dl_dw_h, 4).tolist()}',
      f'dL/db_hidden   = dL/dz_hidden      = {np.round(dl_db_h, 4).tolist()}',
  ]
  grads = {'hidden': {'w': dl_dw_h, 'b': dl_db_h}, 'out': {'w': dl_dw_o, 'b': dl_db_o}}
  return grads, trace


def run(lr: float = 1.0) -> dict:
  """Traces the forward pass, compares hand and jax.grad gradients, takes one SGD step."""
  params = jax.tree.map(lambda v: jnp.asarray(v, jnp.float32), PARAMS,
                        is_leaf=lambda v: not isinstance(v, dict))
  x = jnp.asarray(X, jnp.float32)
  fwd = {k: np.asarray(v) for k, v in forward(params, x).items()}
  loss, auto = jax.value_and_grad(loss_fn)(params, x, TARGET)
  hand, trace = hand_gradients(PARAMS, np.asarray(X), TARGET)
  flat_hand = np.concatenate([np.ravel(v) for v in jax.tree.leaves(hand)])
  flat_auto = np.concatenate([np.ravel(v) for v in jax.tree.leaves(auto)])
  names = [jax.tree_util.keystr(path) + ''.join(f'[{i}]' for i in index)
           for path, leaf in jax.tree_util.tree_leaves_with_path(hand)
           for index in np.ndindex(np.shape(leaf))]
  new_params = jax.tree.map(lambda p, g: p - lr * g, params, auto)
  new_out = float(forward(new_params, x)['out'])
  return {
      **fwd, 'loss': float(loss), 'n_params': count_params(params), 'trace': trace,
      'grad_names': names, 'grad_hand': flat_hand, 'grad_jax': flat_auto,
      'max_grad_diff': float(np.max(np.abs(flat_hand - flat_auto))),
      'lr': lr, 'new_out': new_out,
      'new_loss': float(loss_fn(new_params, x, TARGET)),
  }


def report(r: dict) -> None:
  (w11, w12), (w21, w22) = PARAMS['hidden']['w']
  b1, b2 = PARAMS['hidden']['b']
  v1, v2 = PARAMS['out']['w']
  x1, x2 = X
  z1, z2 = r['z_hidden']
  h1, h2 = r['h']
  print(f'input x = {X}')
  print(f'z1 = {w11}*{x1} + ({w12})*{x2} + {b1} = {z1:.4f}   h1 = relu(z1) = {h1:.4f}')
  print(f'z2 = {w21}*{x1} + {w22}*{x2} + ({b2}) = {z2:.4f}   h2 = relu(z2) = {h2:.4f}')
  print(f'z  = {v1}*h1 + ({v2})*h2 + {PARAMS["out"]["b"]} = {r["z"]:.4f}')
  print(f'output = sigmoid(z) = {r["out"]:.4f}')
  print(f'parameters (counted from the pytree): {r["n_params"]}')
  print(f'\nloss = (output - {TARGET})^2 = {r["loss"]:.4f}; the chain rule by hand:')
  for line in r['trace']:
    print('  ' + line)
  print('\n  parameter              by hand    jax.grad')
  for name, a, b in zip(r['grad_names'], r['grad_hand'], r['grad_jax']):
    print(f'  {name:22s} {a:+.6f}  {b:+.6f}')
  print(f'max |hand - jax.grad| = {r["max_grad_diff"]:.1e}')
  print(f'\none step, lr {r["lr"]}: output {r["out"]:.4f} -> {r["new_out"]:.4f} '
        f'(target {TARGET}); loss {r["loss"]:.4f} -> {r["new_loss"]:.4f}')


def plot(r: dict, folder: str) -> list[str]:
  import matplotlib.pyplot as plt
  fig, ax = plt.subplots(figsize=(9, 4))
  idx = np.arange(len(r['grad_names']))
  ax.bar(idx - 0.2, r['grad_hand'], 0.4, label='by hand (chain rule)')
  ax.bar(idx + 0.2, r['grad_jax'], 0.4, label='jax.grad')
  ax.axhline(0, color='k', lw=0.5)
  ax.set_xticks(idx, r['grad_names'], rotation=30, ha='right', fontsize=8)
  ax.set(xlabel='parameter', ylabel='dL/dparameter',
         title=f'the 9 gradients agree (max diff {r["max_grad_diff"]:.0e})')
  ax.legend()
  return [common.save(fig, folder, 'gradients.png')]


def main(argv):
  del argv
  common.main(NAME, run, report, plot)


if __name__ == '__main__':
  app.run(main)
