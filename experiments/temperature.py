"""Sampling temperature: one real next-token distribution, sharpened and flattened.

  python -m experiments.temperature [--out=DIR] [--workdir=RUN]

Without --workdir it trains a tiny byte-level model (configs/tiny.py, fewer steps) into
OUT/tiny-STEPSsteps, which later runs reuse: lm.stages.pretrain.train returns a finished run at once.
The prompt is fed the way lm.eval.sample.generate feeds it (EOS first, as at the start of a document),
and the last position's logits z give the distribution p_T = softmax(z / T) at temperature T.
T = 0 is greedy decoding: all the mass on the argmax. T < 1 sharpens (lower entropy), T > 1
flattens. Top-p 0.9 (lm.eval.sample.apply_top_p) keeps the smallest set of most likely tokens whose
mass reaches 0.9 and renormalises within it.
"""
import os

from absl import app
from absl import flags
import jax.numpy as jnp
import numpy as np

from configs import tiny
from experiments import common
from lm.model import transformer as model_lib
from lm import runs
from lm.eval import sample as sample_lib
from lm.stages import pretrain as train_lib

NAME = 'temperature'
TEMPERATURES = (0.0, 0.7, 1.0, 1.5)
PROMPT = 'def __init__(self'

_WORKDIR = flags.DEFINE_string('workdir', None, 'A training run to sample from (default: train '
                               'a tiny one under the output folder, or reuse it).')


def tiny_config(steps: int = 200):
  """configs/tiny.py with fewer steps: enough for code-like bytes, about a minute on 2 cores."""
  cfg = tiny.get_config()
  cfg.train.steps = steps
  return cfg


def probs_at(logits: np.ndarray, temperature: float) -> np.ndarray:
  """softmax(logits / T) in float64; T = 0 is one-hot at the argmax."""
  if temperature == 0:
    return np.eye(len(logits))[np.argmax(logits)]
  z = logits.astype(np.float64) / temperature
  e = np.exp(z - z.max())
  return e / e.sum()


def entropy(p: np.ndarray) -> float:
  """In nats; 0 log 0 counts as 0."""
  nz = p[p > 0]
  return 0.0 - float((nz * np.log(nz)).sum())  # 0.0 - x: a one-hot gives 0.0, not -0.0


def top_p_kept(logits: np.ndarray, temperature: float, top_p: float) -> np.ndarray:
  """Which tokens lm.eval.sample's top-p filter keeps at this temperature (bool [V])."""
  if temperature == 0:
    return np.arange(len(logits)) == np.argmax(logits)
  scaled = jnp.asarray(logits, jnp.float32) / temperature  # as lm.eval.sample.sample_logits does
  return np.isfinite(np.asarray(sample_lib.apply_top_p(scaled, top_p)))


def token_label(tokenizer, i: int) -> str:
  """A token as a short visible string: whitespace escaped, specials named, raw bytes in hex."""
  i = int(i)
  specials = {tokenizer.eos_id: '<eos>', tokenizer.bos_id: '<bos>', tokenizer.pad_id: '<pad>'}
  if i in specials:
    return specials[i]
  if tokenizer.name == 'bytes' and i >= 128:  # one byte of a multi-byte UTF-8 character
    return f'\\x{i:02x}'
  s = tokenizer.decode([i])
  s = s.replace(' ', '\u2423').replace('\n', '\\n').replace('\t', '\\t').replace('\r', '\\r')
  return ''.join(c if c.isprintable() else repr(c)[1:-1] for c in s)


def run(workdir: str | None = None, cfg=None, run_dir: str | None = None, steps: int = 200,
        prompt: str = PROMPT, temperatures=TEMPERATURES, top_p: float = 0.9, n_top: int = 20,
        n_samples: int = 3, max_new_tokens: int = 60, seed: int = 0) -> dict:
  """The next-token distribution after `prompt` at each temperature, and sampled continuations.

  The model: the run in `workdir` (or --workdir) if given; else `cfg` (default tiny_config(steps))
  trained into run_dir (default OUT/tiny-STEPSsteps), reusing a finished run there.
  """
  if workdir is None and flags.FLAGS.is_parsed():
    workdir = _WORKDIR.value
  summary = None
  if workdir is None:
    cfg = cfg or tiny_config(steps)
    workdir = run_dir or os.path.join(common.out_dir(NAME), f'tiny-{cfg.train.steps}steps')
    summary = train_lib.train(cfg, workdir)
  mc, params, tok, _ = runs.load_model(workdir)

  ids = [tok.eos_id] + list(tok.encode(prompt))
  logits = np.asarray(model_lib.apply(mc, params, jnp.asarray([ids], jnp.int32))[0, -1])
  real = probs_at(logits, 1.0)
  order = np.argsort(-real)
  per_t = {}
  for t in temperatures:
    p = probs_at(logits, t)
    kept = top_p_kept(logits, t, top_p)
    per_t[t] = {'probs': p, 'entropy': entropy(p), 'top_p_kept': int(kept.sum())}
  kept = top_p_kept(logits, 1.0, top_p)
  renorm = np.where(kept, real, 0.0) / real[kept].sum()

  samples = {}
  if n_samples:
    for t in temperatures:
      samples[t] = sample_lib.generate(mc, params, tok, [prompt], max_new_tokens, temperature=t,
                                       seed=seed, num_samples=n_samples)
  # The temperature at which the filtered distribution is described is 1 (the model's own).
  return {'workdir': workdir, 'summary': summary, 'prompt': prompt, 'prompt_ids': ids,
          'logits': logits, 'probs': real, 'order': order[:n_top],
          'labels': {int(i): token_label(tok, i) for i in order[:max(n_top, int(kept.sum()))]},
          'argmax': int(order[0]), 'argmax_label': token_label(tok, order[0]),
          'temperatures': list(temperatures), 'per_t': per_t, 'top_p': top_p,
          'top_p_mask': kept, 'top_p_probs': renorm, 'samples': samples,
          'max_entropy': float(np.log(len(logits))), 'vocab_size': len(logits),
          'model': f'{mc.n_layers} layers, d_model {mc.d_model}, vocab {mc.vocab_size}'}


def report(r: dict) -> None:
  s = r['summary']
  trained = (f'; trained {s["steps"]} steps, eval loss {s["eval_loss"]:.3f} nats/byte'
             if s else '')
  print(f'model: {r["workdir"]} ({r["model"]}{trained})')
  print(f'prompt: {r["prompt"]!r}; argmax next token: {r["argmax_label"]!r} '
        f'(p = {r["probs"][r["argmax"]]:.3f})')
  print('top tokens at T = 1: ' + ', '.join(
      f'{r["labels"][int(i)]} {r["probs"][i]:.3f}' for i in r['order'][:8]))
  print(f'  temperature   entropy (nats)   p(argmax)   kept by top-p {r["top_p"]}   '
        f'(uniform over {r["vocab_size"]}: {r["max_entropy"]:.2f} nats)')
  for t in r['temperatures']:
    d = r['per_t'][t]
    print(f'  {t:11.1f}   {d["entropy"]:14.3f}   {d["probs"][r["argmax"]]:9.3f}   '
          f'{d["top_p_kept"]:17d}')
  kept = np.flatnonzero(r['top_p_mask'])
  kept = kept[np.argsort(-r['probs'][kept])]
  print(f'top-p {r["top_p"]} at T = 1 keeps {len(kept)} tokens holding '
        f'{r["probs"][kept].sum():.3f} of the mass; renormalised: ' +
        ', '.join(f'{r["labels"][int(i)]} {r["top_p_probs"][i]:.3f}' for i in kept))
  for t, texts in r['samples'].items():
    print(f'samples at T = {t}:')
    for text in texts:
      print(f'  {r["prompt"] + text!r}')  # repr: newlines escaped, trailing spaces visible


def plot(r: dict, folder: str) -> list[str]:
  import matplotlib.pyplot as plt
  paths = []
  order = r['order']
  x = np.arange(len(order))
  labels = [r['labels'][int(i)] for i in order]

  temps = r['temperatures']
  fig, axes = plt.subplots(len(temps), 1, figsize=(10, 2.4 * len(temps)), sharex=True)
  for ax, t in zip(np.atleast_1d(axes), temps):
    d = r['per_t'][t]
    ax.bar(x, d['probs'][order], color='C3' if t == 0 else 'C0')
    shown = d['probs'][order].sum()
    ax.set(ylim=(0, 1.05), ylabel='probability',
           title=f'T = {t:g}' + (' (greedy)' if t == 0 else '') +
                 f': entropy {d["entropy"]:.2f} nats; these {len(order)} tokens hold {shown:.1%}')
  ax.set_xticks(x, labels, fontsize=11)
  ax.set_xlabel(f'next token after {r["prompt"]!r} (the {len(order)} most likely at T = 1)')
  paths.append(common.save(fig, folder, 'distributions.png'))

  fig, ax = plt.subplots(figsize=(10, 4.5))
  kept = r['top_p_mask'][order]
  ax.bar(x - 0.2, r['probs'][order], width=0.4, color=np.where(kept, 'C0', 'lightgray'),
         label='p at T = 1 (grey: cut by top-p)')
  ax.bar(x + 0.2, r['top_p_probs'][order], width=0.4, color='C2',
         label=f'renormalised over the {int(r["top_p_mask"].sum())} kept tokens')
  ax2 = ax.twinx()
  ax2.plot(x, np.cumsum(r['probs'][order]), 'k.-', lw=1, label='cumulative p')
  ax2.axhline(r['top_p'], color='k', ls='--', lw=0.8)
  ax2.set(ylim=(0, 1.05), ylabel='cumulative probability')
  ax.set_xticks(x, labels, fontsize=11)
  ax.set(ylabel='probability', xlabel='next token, most likely first',
         title=f'top-p {r["top_p"]}: the smallest set of top tokens whose mass reaches '
               f'{r["top_p"]}')
  handles = ax.get_legend_handles_labels()
  handles2 = ax2.get_legend_handles_labels()
  ax.legend(handles[0] + handles2[0], handles[1] + handles2[1], loc='center right')
  paths.append(common.save(fig, folder, 'top_p.png'))

  fig, ax = plt.subplots(figsize=(7, 4.5))
  grid = np.linspace(0.05, 3.0, 120)
  ax.plot(grid, [entropy(probs_at(r['logits'], t)) for t in grid], color='C0')
  for t in temps:
    ax.plot(t, r['per_t'][t]['entropy'], 'o', color='C3')
    ax.annotate(f'T={t:g}: {r["per_t"][t]["entropy"]:.2f}', (t, r['per_t'][t]['entropy']),
                textcoords='offset points', xytext=(6, -12))
  ax.axhline(r['max_entropy'], color='gray', ls='--', label=f'uniform over {r["vocab_size"]}')
  ax.set(xlabel='temperature T', ylabel='entropy of softmax(z / T) (nats)',
         title=f'next token after {r["prompt"]!r}')
  ax.legend()
  paths.append(common.save(fig, folder, 'entropy.png'))
  return paths


def main(argv):
  del argv
  common.main(NAME, run, report, plot)


if __name__ == '__main__':
  app.run(main)
