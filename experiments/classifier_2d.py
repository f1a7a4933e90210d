"""A 16-unit Flax MLP learns a 2-D pattern (label 1 where x0 * x1 > 0) with Adam and mini-batches.

  python -m experiments.classifier_2d [--out=DIR]
"""
from absl import app
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax

from experiments import common
from lm.model.flops import count_params

NAME = 'classifier_2d'


class MLP(nn.Module):
  """2 -> hidden (ReLU) -> 1 logit."""
  hidden: int = 16

  @nn.compact
  def __call__(self, x):
    return nn.Dense(1)(nn.relu(nn.Dense(self.hidden)(x)))[..., 0]


def make_data(n: int, seed: int) -> tuple[jax.Array, jax.Array]:
  """n points uniform in [-1, 1]^2; label 1 in the quadrants where x0 and x1 share a sign."""
  x = jax.random.uniform(jax.random.key(seed), (n, 2), minval=-1.0, maxval=1.0)
  return x, (x[:, 0] * x[:, 1] > 0).astype(jnp.float32)


def train(model: MLP, x, y, epochs: int, batch_size: int, lr: float, seed: int):
  """Adam on shuffled mini-batches; the whole run is one jitted scan over epochs."""
  opt = optax.adam(lr)
  init_key, shuffle_key = jax.random.split(jax.random.key(seed))
  params = model.init(init_key, x[:1])
  n_batches = len(x) // batch_size  # The few points left over change with each shuffle.

  def loss_fn(params, xb, yb):
    return optax.sigmoid_binary_cross_entropy(model.apply(params, xb), yb).mean()

  def batch_step(carry, batch):
    params, state = carry
    loss, grads = jax.value_and_grad(loss_fn)(params, *batch)
    updates, state = opt.update(grads, state)
    return (optax.apply_updates(params, updates), state), loss

  def epoch(carry, key):
    order = jax.random.permutation(key, len(x))[:n_batches * batch_size]
    batches = (x[order].reshape(n_batches, batch_size, 2), y[order].reshape(n_batches, batch_size))
    carry, losses = jax.lax.scan(batch_step, carry, batches)
    return carry, losses.mean()

  @jax.jit
  def fit(params):
    keys = jax.random.split(shuffle_key, epochs)
    (params, _), losses = jax.lax.scan(epoch, (params, opt.init(params)), keys)
    return params, losses

  return fit(params)


def run(n_train: int = 1000, n_test: int = 1000, hidden: int = 16, epochs: int = 100,
        batch_size: int = 32, lr: float = 1e-2, seed: int = 0) -> dict:
  """Trains on n_train points and scores on n_test fresh points from the same distribution."""
  x, y = make_data(n_train, seed)
  x_test, y_test = make_data(n_test, seed + 1)
  model = MLP(hidden)
  params, losses = train(model, x, y, epochs, batch_size, lr, seed)

  def accuracy(xs, ys):
    return float(jnp.mean((model.apply(params, xs) > 0) == (ys > 0.5)))

  return {
      'model': model, 'params': params, 'n_params': count_params(params),
      'epochs': epochs, 'batch_size': batch_size, 'steps': epochs * (n_train // batch_size),
      'losses': np.asarray(losses), 'x': np.asarray(x), 'y': np.asarray(y),
      'train_accuracy': accuracy(x, y), 'test_accuracy': accuracy(x_test, y_test),
      'n_test': n_test,
  }


def report(r: dict) -> None:
  print(f'MLP 2-{r["model"].hidden}-1 (ReLU), {r["n_params"]} parameters; Adam lr 1e-2, '
        f'{r["epochs"]} epochs of mini-batches of {r["batch_size"]} ({r["steps"]} steps)')
  print(f'loss: epoch 1 {r["losses"][0]:.4f} -> epoch {r["epochs"]} {r["losses"][-1]:.4f}')
  print(f'train accuracy    {r["train_accuracy"]:.1%} ({len(r["x"])} points)')
  print(f'held-out accuracy {r["test_accuracy"]:.1%} ({r["n_test"]} fresh points)')


def plot(r: dict, folder: str) -> list[str]:
  import matplotlib.pyplot as plt
  g = np.linspace(-1, 1, 201)
  grid = jnp.asarray(np.stack(np.meshgrid(g, g), -1).reshape(-1, 2), jnp.float32)
  prob = np.asarray(jax.nn.sigmoid(r['model'].apply(r['params'], grid))).reshape(len(g), len(g))
  fig, axes = plt.subplots(1, 2, figsize=(11, 4.5))
  ax = axes[0]
  im = ax.contourf(g, g, prob, levels=20, cmap='RdBu_r', vmin=0, vmax=1, alpha=0.35)
  ax.contour(g, g, prob, levels=[0.5], colors='k')
  fig.colorbar(im, ax=ax, label='P(label = 1)')
  for label, color in ((0, 'navy'), (1, 'darkred')):
    pts = r['x'][r['y'] == label]
    ax.scatter(pts[:, 0], pts[:, 1], s=5, color=color, label=f'label {label}')
  ax.legend(loc='lower left', fontsize=8, framealpha=0.9)
  ax.set(xlabel='x0', ylabel='x1', title=f'decision boundary (train {r["train_accuracy"]:.1%}, '
         f'held-out {r["test_accuracy"]:.1%})')
  ax = axes[1]
  ax.plot(np.arange(1, r['epochs'] + 1), r['losses'])
  ax.set(xlabel='epoch', ylabel='mean training loss (cross-entropy)', yscale='log',
         title='training loss')
  return [common.save(fig, folder, 'decision_boundary.png')]


def main(argv):
  del argv
  common.main(NAME, run, report, plot)


if __name__ == '__main__':
  app.run(main)
