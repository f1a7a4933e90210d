"""A model file is its numbers: a 3-parameter perceptron, saved, loaded, trained, and stuck on XOR.

  python -m experiments.perceptron [--out=DIR]
"""
import json
import os
import tempfile

from absl import app
import numpy as np

from experiments import common

NAME = 'perceptron'
# The lesson's perceptron. On 0/1 inputs it happens to compute OR.
LESSON_PARAMS = {'w1': 0.6, 'w2': 0.4, 'b': -0.3}
INPUTS = np.array([[0, 0], [0, 1], [1, 0], [1, 1]], dtype=np.float64)
TARGETS = {
    'AND': np.array([0, 0, 0, 1]),
    'OR': np.array([0, 1, 1, 1]),
    'XOR': np.array([0, 1, 1, 0]),
}


def save_params(params: dict, path: str) -> int:
  """Writes the parameters as JSON and returns the file size in bytes."""
  with open(path, 'w') as f:
    f.write(json.dumps(params, indent=2) + '\n')
  return os.path.getsize(path)


def load_params(path: str) -> dict:
  with open(path) as f:
    return json.load(f)


def predict(params: dict, x: np.ndarray) -> np.ndarray:
  """Step activation: 1 where w1*x1 + w2*x2 + b > 0, else 0."""
  z = params['w1'] * x[..., 0] + params['w2'] * x[..., 1] + params['b']
  return (z > 0).astype(np.int64)


def train_perceptron(y: np.ndarray, epochs: int = 25, lr: float = 1.0) -> tuple[dict, float]:
  """Rosenblatt's rule (w += lr * (target - prediction) * x), one point at a time.

  Returns the final parameters and the best accuracy seen after any update: on XOR the
  weights cycle forever, so "best seen" is the fairest score to report.
  """
  w = np.zeros(2)
  b = 0.0
  best = 0.0
  for _ in range(epochs):
    for x, t in zip(INPUTS, y):
      err = t - int(w @ x + b > 0)
      w = w + lr * err * x
      b = b + lr * err
      params = {'w1': float(w[0]), 'w2': float(w[1]), 'b': float(b)}
      best = max(best, float(np.mean(predict(params, INPUTS) == y)))
  return params, best


def grid_search(y: np.ndarray, lo: float = -2.0, hi: float = 2.0, n: int = 41) -> dict:
  """Tries every (w1, w2, b) on an n^3 grid; counts the lines that classify all 4 points."""
  g = np.linspace(lo, hi, n)
  w1, w2, b = np.meshgrid(g, g, g, indexing='ij')
  # z has shape (n, n, n, 4): every grid point applied to every input.
  z = w1[..., None] * INPUTS[:, 0] + w2[..., None] * INPUTS[:, 1] + b[..., None]
  acc = ((z > 0) == y).mean(-1)
  return {'tried': int(acc.size), 'perfect': int((acc == 1).sum()),
          'best_accuracy': float(acc.max())}


def run(epochs: int = 25, grid_n: int = 41) -> dict:
  """Saves/loads the lesson's perceptron, trains on AND/OR/XOR and grid-searches each."""
  with tempfile.TemporaryDirectory() as tmp:
    path = os.path.join(tmp, 'perceptron.json')
    size = save_params(LESSON_PARAMS, path)
    with open(path) as f:
      text = f.read()
    loaded = load_params(path)
  result = {
      'file_text': text,
      'file_bytes': size,
      'loaded': loaded,
      'lesson_predictions': predict(loaded, INPUTS).tolist(),
      'trained': {},
      'grid': {},
  }
  for gate, y in TARGETS.items():
    params, best = train_perceptron(y, epochs=epochs)
    result['trained'][gate] = {'params': params, 'best_accuracy': best,
                               'final_accuracy': float(np.mean(predict(params, INPUTS) == y))}
    result['grid'][gate] = grid_search(y, n=grid_n)
  return result


def report(r: dict) -> None:
  print(f'perceptron file ({r["file_bytes"]} bytes):\n{r["file_text"]}', end='')
  print(f'loaded back: {r["loaded"]}')
  for x, p in zip(INPUTS.astype(int).tolist(), r['lesson_predictions']):
    print(f'  input {x} -> {p}')
  print('  (on 0/1 inputs these three numbers compute OR)')
  print('\nperceptron learning rule, best accuracy seen during training:')
  for gate, t in r['trained'].items():
    p = t['params']
    print(f'  {gate:3s}: {t["best_accuracy"]:.0%}  (final w1={p["w1"]:+g} w2={p["w2"]:+g} '
          f'b={p["b"]:+g}, final accuracy {t["final_accuracy"]:.0%})')
  print('\nbrute force over a grid of (w1, w2, b) in [-2, 2]^3:')
  for gate, g in r['grid'].items():
    print(f'  {gate:3s}: {g["perfect"]:6d} of {g["tried"]} lines classify all 4 points; '
          f'best accuracy {g["best_accuracy"]:.0%}')
  print('XOR is not linearly separable: 00->0 needs b <= 0, 01->1 and 10->1 need w2 + b > 0 and\n'
        'w1 + b > 0; adding those gives w1 + w2 + b > -b >= 0, so 11 would be classified 1, not 0.')


def plot(r: dict, folder: str) -> list[str]:
  import matplotlib.pyplot as plt
  panels = [('lesson (0.6, 0.4, -0.3) on OR', r['loaded'], TARGETS['OR'])]
  panels += [(f'{g} (trained)', r['trained'][g]['params'], y) for g, y in TARGETS.items()]
  fig, axes = plt.subplots(1, 4, figsize=(16, 4))
  g = np.linspace(-0.5, 1.5, 201)
  grid = np.stack(np.meshgrid(g, g), -1)
  for ax, (title, p, y) in zip(axes, panels):
    # Shading the predicted-1 region shows which side a point lying on the line falls on
    # (z = 0 counts as 0).
    ax.contourf(g, g, predict(p, grid), levels=[-0.5, 0.5, 1.5], colors=['#ffffff', '#ffe0b0'])
    ax.contour(g, g, p['w1'] * grid[..., 0] + p['w2'] * grid[..., 1] + p['b'], levels=[0],
               colors='k')
    for label, marker in ((0, 'o'), (1, 's')):
      pts = INPUTS[y == label]
      ax.scatter(pts[:, 0], pts[:, 1], marker=marker, s=120, label=f'target {label}', zorder=3)
    acc = float(np.mean(predict(p, INPUTS) == y))
    ax.set(title=f'{title}: {acc:.0%}', xlabel='x1', ylabel='x2')
    ax.legend(loc='lower left', fontsize=8)
  fig.suptitle('perceptron decision lines (shaded: predicts 1)')
  return [common.save(fig, folder, 'decision_lines.png')]


def main(argv):
  del argv
  common.main(NAME, run, report, plot)


if __name__ == '__main__':
  app.run(main)
