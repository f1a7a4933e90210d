"""One hidden layer fixes XOR: a 2-H-1 MLP in JAX, trained from many seeds at once.

  python -m experiments.xor_mlp [--out=DIR]
"""
from absl import app
import jax
import jax.numpy as jnp
import numpy as np
import optax

from experiments import common
from lm.model.flops import count_params

NAME = 'xor_mlp'
X = jnp.array([[0, 0], [0, 1], [1, 0], [1, 1]], dtype=jnp.float32)
Y = jnp.array([0, 1, 1, 0], dtype=jnp.float32)


def init(key, width: int) -> dict:
  k1, k2 = jax.random.split(key)
  return {
      'hidden': {'w': jax.random.normal(k1, (2, width)), 'b': jnp.zeros(width)},
      'out': {'w': jax.random.normal(k2, (width,)), 'b': jnp.zeros(())},
  }


def logits(params: dict, x: jax.Array) -> jax.Array:
  h = jnp.tanh(x @ params['hidden']['w'] + params['hidden']['b'])
  return h @ params['out']['w'] + params['out']['b']


def loss_fn(params: dict) -> jax.Array:
  return optax.sigmoid_binary_cross_entropy(logits(params, X), Y).mean()


def train_many(width: int, n_seeds: int, steps: int, lr: float) -> tuple[dict, jax.Array]:
  """Trains one MLP per seed with full-batch Adam; returns the params and losses per seed."""
  opt = optax.adam(lr)

  def train_one(key):
    params = init(key, width)

    def step(carry, _):
      params, state = carry
      loss, grads = jax.value_and_grad(loss_fn)(params)
      updates, state = opt.update(grads, state)
      return (optax.apply_updates(params, updates), state), loss

    (params, _), losses = jax.lax.scan(step, (params, opt.init(params)), None, length=steps)
    return params, losses

  # vmap trains every seed in one compiled program: one compile per width.
  keys = jax.random.split(jax.random.key(0), n_seeds)
  return jax.jit(jax.vmap(train_one))(keys)


def accuracy(params: dict) -> jax.Array:
  return jnp.mean((logits(params, X) > 0) == (Y > 0.5))


def run(widths=(2, 4), n_seeds: int = 20, steps: int = 1000, lr: float = 0.05) -> dict:
  """Trains n_seeds MLPs per hidden width; reports how many seeds solve XOR."""
  result = {'n_seeds': n_seeds, 'steps': steps, 'widths': {}}
  for width in widths:
    params, losses = train_many(width, n_seeds, steps, lr)
    acc = np.asarray(jax.vmap(accuracy)(params))
    # The model shown: the first seed of the widest net that reaches 100%.
    solved = np.flatnonzero(acc == 1.0)
    result['widths'][width] = {
        'accuracy': acc,
        'solved': int(len(solved)),
        'n_params': count_params(jax.tree.map(lambda a: a[0], params)),
        'losses': np.asarray(losses),
        'params': params,
    }
  best_width = max(widths)
  w = result['widths'][best_width]
  seed = int(np.flatnonzero(w['accuracy'] == 1.0)[0]) if w['solved'] else 0
  chosen = jax.tree.map(lambda a: a[seed], w['params'])
  result.update(width=best_width, seed=seed, params=chosen, accuracy=float(accuracy(chosen)),
                probs=np.asarray(jax.nn.sigmoid(logits(chosen, X))))
  return result


def report(r: dict) -> None:
  print(f'XOR with a 2-H-1 tanh MLP, full-batch Adam, {r["steps"]} steps, {r["n_seeds"]} seeds:')
  for width, w in r['widths'].items():
    print(f'  H={width} ({w["n_params"]} parameters): {w["solved"]}/{r["n_seeds"]} seeds reach '
          f'100%; worst seed {w["accuracy"].min():.0%}')
    stuck = w['losses'][w['accuracy'] < 1, -1]
    if len(stuck):
      # Measured: 5,000 steps solve no more H=2 seeds than 1,000, so these are stuck, not slow.
      plateaus = ', '.join(f'{v:.3f}' for v in sorted(set(np.round(stuck, 3).tolist())))
      print(f'    the others stop on a plateau, final loss {plateaus} '
            '(ln 2 / 2 = 0.347: two points left at P = 0.5)')
  print(f'shown: H={r["width"]}, seed {r["seed"]}, accuracy {r["accuracy"]:.0%}')
  for x, p in zip(np.asarray(X).astype(int).tolist(), r['probs']):
    print(f'  input {x} -> P(1) = {p:.3f}')


def plot(r: dict, folder: str) -> list[str]:
  import matplotlib.pyplot as plt
  g = np.linspace(-0.5, 1.5, 201)
  grid = jnp.array(np.stack(np.meshgrid(g, g), -1).reshape(-1, 2), dtype=jnp.float32)
  fig, axes = plt.subplots(1, 2, figsize=(11, 4.5))
  ax = axes[0]
  surface = np.asarray(jax.nn.sigmoid(logits(r['params'], grid))).reshape(len(g), len(g))
  im = ax.contourf(g, g, surface, levels=20, cmap='RdBu_r', vmin=0, vmax=1)
  ax.contour(g, g, surface, levels=[0.5], colors='k')
  fig.colorbar(im, ax=ax, label='P(output = 1)')
  y = np.asarray(Y)
  for label, marker in ((0, 'o'), (1, 's')):
    pts = np.asarray(X)[y == label]
    ax.scatter(pts[:, 0], pts[:, 1], marker=marker, s=120, c='w', edgecolors='k',
               label=f'target {label}')
  ax.set(title=f'2-{r["width"]}-1 MLP on XOR (seed {r["seed"]}): {r["accuracy"]:.0%}',
         xlabel='x1', ylabel='x2')
  ax.legend(loc='lower left', fontsize=8)
  ax = axes[1]
  for width, w in r['widths'].items():
    for i, losses in enumerate(w['losses']):
      ax.plot(losses, color=f'C{list(r["widths"]).index(width)}', alpha=0.4,
              label=f'H={width}' if i == 0 else None)
  ax.set(title='training loss, every seed', xlabel='step', ylabel='cross-entropy', yscale='log')
  ax.legend()
  return [common.save(fig, folder, 'decision_surface.png')]


def main(argv):
  del argv
  common.main(NAME, run, report, plot)


if __name__ == '__main__':
  app.run(main)
