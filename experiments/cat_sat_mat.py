"""A tiny next-word network learns "the cat sat on the mat": embeddings, a hidden layer, a softmax.

  python -m experiments.cat_sat_mat [--out=DIR]

Vocabulary: the sentence's five words, <bos>/<eos>, and five distractor words that never occur,
12 in all as in the lesson, so chance is 1/12 = 8.3%. The context is the two previous tokens:
with only one, "the" would have to be followed by both "cat" and "mat", and no model could
reach 100%. With two, every context in the sentence has exactly one right next word.

Parameters: 232, not the lesson's "about 100": the 12 x 8 embedding table alone is 96, and a
hidden layer that reads two 8-wide embeddings adds 16 x 8 + 8 = 136. The output layer reuses
the embedding table (tied, as in lm's transformer by default), so it adds none.
"""
from absl import app
import jax
import jax.numpy as jnp
import numpy as np
import optax

from experiments import common
from lm.model.flops import count_params

NAME = 'cat_sat_mat'
SENTENCE = 'the cat sat on the mat'
VOCAB = ['<bos>', '<eos>', 'the', 'cat', 'sat', 'on', 'mat', 'a', 'dog', 'ran', 'under', 'rug']
CONTEXT = 2
D_EMBED = 8
D_HIDDEN = 8  # Equal to D_EMBED so the output layer can reuse (tie) the embedding table.


def examples(sentence: str = SENTENCE) -> tuple[np.ndarray, np.ndarray]:
  """(context, next token) pairs; the context before the sentence is padded with <bos>."""
  ids = [VOCAB.index(w) for w in ['<bos>'] * CONTEXT + sentence.split() + ['<eos>']]
  contexts = np.array([ids[i - CONTEXT:i] for i in range(CONTEXT, len(ids))])
  return contexts, np.array(ids[CONTEXT:])


def init(key) -> dict:
  k1, k2 = jax.random.split(key)
  d_in = CONTEXT * D_EMBED
  # Small embeddings give near-zero logits, so training starts from the uniform guess (chance).
  return {
      'embed': 0.1 * jax.random.normal(k1, (len(VOCAB), D_EMBED)),
      'hidden': {'w': jax.random.normal(k2, (d_in, D_HIDDEN)) / np.sqrt(d_in),
                 'b': jnp.zeros(D_HIDDEN)},
  }


def apply(params: dict, contexts: jax.Array) -> tuple[jax.Array, jax.Array]:
  """Logits over the vocabulary and the hidden activations, for a batch of contexts."""
  # The context's embeddings side by side: (batch, CONTEXT * D_EMBED).
  x = params['embed'][contexts].reshape(contexts.shape[0], -1)
  h = jnp.tanh(x @ params['hidden']['w'] + params['hidden']['b'])
  # Tied output: a word's logit is the hidden state's dot product with that word's embedding.
  return h @ params['embed'].T, h


def loss_fn(params, contexts, targets):
  logits, _ = apply(params, contexts)
  return optax.softmax_cross_entropy_with_integer_labels(logits, targets).mean()


def p_correct(params, contexts, targets):
  """Mean probability the model gives the right next word."""
  probs = jax.nn.softmax(apply(params, contexts)[0])
  return jnp.take_along_axis(probs, targets[:, None], 1).mean()


def train(params, opt, contexts, targets, steps: int):
  """Full-batch training; records loss, mean P(right word) and the embedding of "cat" each step."""
  cat = VOCAB.index('cat')

  def step(carry, _):
    params, state = carry
    loss, grads = jax.value_and_grad(loss_fn)(params, contexts, targets)
    trace = {'loss': loss, 'p_correct': p_correct(params, contexts, targets),
             'cat': params['embed'][cat]}
    updates, state = opt.update(grads, state, params)
    return (optax.apply_updates(params, updates), state), trace

  @jax.jit
  def fit(params):
    (params, _), trace = jax.lax.scan(step, (params, opt.init(params)), None, length=steps)
    return params, trace

  return fit(params)


def top_k(params, context_words: list[str], k: int = 3) -> list[tuple[str, float]]:
  ids = jnp.array([[VOCAB.index(w) for w in context_words[-CONTEXT:]]])
  probs = np.asarray(jax.nn.softmax(apply(params, ids)[0][0]))
  return [(VOCAB[i], float(probs[i])) for i in np.argsort(-probs)[:k]]


def run(steps: int = 600, lr: float = 0.01, seed: int = 0, sgd_steps: int = 20_000) -> dict:
  """Trains with Adam; then, for comparison, plain SGD at the same lr for sgd_steps (0: skip)."""
  contexts, targets = examples()
  contexts, targets = jnp.asarray(contexts), jnp.asarray(targets)
  params0 = init(jax.random.key(seed))
  params, trace = train(params0, optax.adam(lr), contexts, targets, steps)
  result = {
      'n_params': count_params(params0),
      'n_params_by_part': {k: count_params(v) for k, v in params0.items()},
      'contexts': np.asarray(contexts), 'targets': np.asarray(targets), 'steps': steps, 'lr': lr,
      'params_before': params0, 'params': params,
      'trace': {k: np.asarray(v) for k, v in trace.items()},
      'p_start': float(p_correct(params0, contexts, targets)),
      'p_end': float(p_correct(params, contexts, targets)),
      'probs_before': np.asarray(jax.nn.softmax(apply(params0, contexts)[0])),
      'probs_after': np.asarray(jax.nn.softmax(apply(params, contexts)[0])),
      'hidden': np.asarray(apply(params, contexts)[1]),
      'top3': top_k(params, 'the cat sat on the'.split()),
  }
  result['steps_to_99'] = first_step_above(result['trace']['p_correct'], 0.99)
  if sgd_steps:
    _, sgd_trace = train(params0, optax.sgd(lr), contexts, targets, sgd_steps)
    sgd_p = np.asarray(sgd_trace['p_correct'])
    # trace[i] is measured after i updates.
    result['sgd'] = {'steps': sgd_steps, 'p_at_adam_steps': float(sgd_p[min(steps, sgd_steps - 1)]),
                     'steps_to_99': first_step_above(sgd_p, 0.99), 'p_end': float(sgd_p[-1])}
  return result


def first_step_above(values: np.ndarray, threshold: float) -> int | None:
  above = np.flatnonzero(values > threshold)
  return int(above[0]) if len(above) else None


def context_label(ids) -> str:
  return ' '.join(VOCAB[i] for i in ids)


def report(r: dict) -> None:
  print(f'sentence: "{SENTENCE}"; vocabulary of {len(VOCAB)}: {" ".join(VOCAB)}')
  print(f'{len(r["targets"])} training examples (two previous tokens -> next):')
  for c, t in zip(r['contexts'], r['targets']):
    print(f'  {context_label(c):12s} -> {VOCAB[t]}')
  parts = ', '.join(f'{k} {v}' for k, v in r['n_params_by_part'].items())
  print(f'parameters: {r["n_params"]} ({parts}; the output layer reuses the embedding table)')
  print(f'mean P(right next word): start {r["p_start"]:.1%} (chance 1/{len(VOCAB)} = '
        f'{1 / len(VOCAB):.1%}) -> after {r["steps"]} Adam steps at lr {r["lr"]}: {r["p_end"]:.2%}')
  print(f'Adam passes 99% after {r["steps_to_99"]} steps')
  if 'sgd' in r:
    g = r['sgd']
    reached = (f'passes 99% after {g["steps_to_99"]} steps' if g['steps_to_99'] is not None
               else f'is at {g["p_end"]:.1%} after {g["steps"]} steps')
    print(f'plain SGD at the same lr: {g["p_at_adam_steps"]:.1%} after {r["steps"]} steps; '
          f'{reached}')
  print(f'loss: {r["trace"]["loss"][0]:.3f} -> {r["trace"]["loss"][-1]:.4f}')
  print('after "the cat sat on the", top 3: ' +
        ', '.join(f'{w} {p:.1%}' for w, p in r['top3']))


def plot(r: dict, folder: str) -> list[str]:
  import matplotlib.pyplot as plt
  paths = []
  labels = [f'{context_label(c)} -> {VOCAB[t]}' for c, t in zip(r['contexts'], r['targets'])]

  fig, ax = plt.subplots(1, 2, figsize=(11, 4))
  ax[0].plot(r['trace']['loss'])
  ax[0].set(xlabel='step', ylabel='cross-entropy loss', yscale='log', title='training loss')
  ax[1].plot(r['trace']['p_correct'])
  ax[1].axhline(1 / len(VOCAB), color='gray', ls='--', label='chance (1/12)')
  ax[1].set(xlabel='step', ylabel='mean P(right next word)', title='probability of the right word')
  ax[1].legend()
  paths.append(common.save(fig, folder, 'loss.png'))

  fig, axes = plt.subplots(1, 2, figsize=(13, 4.5))
  for ax, key, title in ((axes[0], 'probs_before', f'before training ({r["p_start"]:.1%})'),
                         (axes[1], 'probs_after', f'after training ({r["p_end"]:.1%})')):
    im = ax.imshow(r[key], vmin=0, vmax=1, cmap='viridis', aspect='auto')
    ax.set_xticks(range(len(VOCAB)), VOCAB, rotation=45, ha='right')
    ax.set_yticks(range(len(labels)), labels if ax is axes[0] else [])
    ax.set(xlabel='next word', title=f'P(next word), {title}')
  axes[0].set_ylabel('context -> right word')
  fig.colorbar(im, ax=axes, label='probability')
  paths.append(common.save(fig, folder, 'next_word_probs.png', tight_layout=False))

  fig, ax = plt.subplots(figsize=(7, 4))
  for i, component in enumerate(r['trace']['cat'].T):
    ax.plot(component, label=f'dim {i}')
  ax.set(xlabel='step', ylabel='value', title='the embedding of "cat" during training')
  ax.legend(ncol=2, fontsize=8)
  paths.append(common.save(fig, folder, 'cat_embedding.png'))

  fig, ax = plt.subplots(figsize=(7, 4))
  im = ax.imshow(r['hidden'], cmap='RdBu_r', vmin=-1, vmax=1, aspect='auto')
  ax.set_yticks(range(len(labels)), labels)
  ax.set_xticks(range(r['hidden'].shape[1]))
  ax.set(xlabel='hidden unit', ylabel='context -> right word', title='hidden activations (tanh)')
  fig.colorbar(im, ax=ax, label='activation')
  paths.append(common.save(fig, folder, 'hidden_activations.png'))
  return paths


def main(argv):
  del argv
  common.main(NAME, run, report, plot)


if __name__ == '__main__':
  app.run(main)
