"""From RNNs to attention: a GRU language model against the project's transformer.

  python -m experiments.rnn_vs_attention [--out=DIR]

Both models read the same byte-level Python stdlib windows (lm.data.tokens, the same batches in the same
order), have about the same number of parameters (the GRU's hidden width is chosen to match the
transformer's count) and train for the same steps with the same AdamW settings: warmup then cosine
decay, weight decay on weight matrices only, gradient clipping at 1. Only the peak learning rate
differs, each the better of 3e-3 and 1e-2 at the default settings (eval loss over 256 windows:
transformer 1.87 at 3e-3, 2.33 at 1e-2; GRU 1.95 at 3e-3, 1.83 at 1e-2).

Three comparisons:
  * eval loss on fixed validation windows;
  * training tokens/s: the median step time after compilation. The transformer processes all T
    positions of a window at once; the GRU must step through them one after another, because
    h_t needs h_{t-1}. How much that matters depends on the hardware: a 2-core CPU has little
    parallelism to offer, and there the GRU measured faster;
  * eval loss at each position of the window: position t sees only the t + 1 tokens before it
    in the window, so a model that uses context gets better with position.
"""
import time

from absl import app
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax

from configs import base
from experiments import common
from lm.data import tokens as data_lib
from lm.model import transformer as model_lib
from lm.training import optim
from lm.stages import pretrain as train_lib
from lm.config import ModelConfig
from lm.model.flops import count_params

NAME = 'rnn_vs_attention'


class GruLM(nn.Module):
  """tokens [B, T] -> logits [B, T, V]: embedding, one GRU layer scanned over time, projection."""
  vocab_size: int
  d_embed: int
  d_hidden: int

  @nn.compact
  def __call__(self, tokens_BT):
    x_BTE = nn.Embed(self.vocab_size, self.d_embed, name='embed')(tokens_BT)
    h_BTH = nn.RNN(nn.GRUCell(self.d_hidden), name='gru')(x_BTE)
    return nn.Dense(self.vocab_size, name='head')(h_BTH)


def gru_params(vocab_size: int, d_embed: int, d_hidden: int, seed: int = 0):
  model = GruLM(vocab_size, d_embed, d_hidden)
  return model.init(jax.random.key(seed), jnp.zeros((1, 2), jnp.int32))['params']


def gru_count(vocab_size: int, d_embed: int, d_hidden: int) -> int:
  shapes = jax.eval_shape(lambda: gru_params(vocab_size, d_embed, d_hidden))
  return count_params(shapes)


def matched_hidden(target: int, vocab_size: int, d_embed: int) -> int:
  """The GRU hidden width whose parameter count is closest to `target` (counts grow with it)."""
  lo, hi = 1, 8 * d_embed
  while hi - lo > 1:
    mid = (lo + hi) // 2
    if gru_count(vocab_size, d_embed, mid) < target:
      lo = mid
    else:
      hi = mid
  return min((lo, hi), key=lambda h: abs(gru_count(vocab_size, d_embed, h) - target))


def make_optimizer(tc: train_lib.TrainConfig, params) -> optax.GradientTransformation:
  """lm.stages.pretrain's AdamW for any parameter tree: its schedule and settings, and weight decay on
  matrices except the embedding (for the transformer this is exactly lm.training.optim.decay_mask)."""
  def decay(path, x):
    names = [str(getattr(k, 'key', k)) for k in path]
    return x.ndim >= 2 and 'embed' not in names
  mask = jax.tree_util.tree_map_with_path(decay, params)
  adamw = optax.adamw(optim.learning_rate_schedule(tc), b1=tc.b1, b2=tc.b2, eps=tc.eps,
                      weight_decay=tc.weight_decay, mask=mask)
  return optax.chain(optax.clip_by_global_norm(tc.grad_clip), adamw)


def token_losses(logits_fn, params, batch_BT1):
  """Cross-entropy of every next-token prediction in windows [B, T+1]: [B, T]."""
  logits = logits_fn(params, batch_BT1[:, :-1])
  return optax.softmax_cross_entropy_with_integer_labels(logits, batch_BT1[:, 1:])


def train_model(logits_fn, params, tc, batches, eval_batches, warm_steps: int = 3) -> dict:
  """Trains on `batches` (one per step); returns losses, step times and eval loss by position."""
  opt = make_optimizer(tc, params)

  @jax.jit
  def step(params, opt_state, batch):
    loss, grads = jax.value_and_grad(lambda p: token_losses(logits_fn, p, batch).mean())(params)
    updates, opt_state = opt.update(grads, opt_state, params)
    return optax.apply_updates(params, updates), opt_state, loss

  opt_state = opt.init(params)
  losses, times = [], []
  for batch in batches:
    start = time.perf_counter()
    params, opt_state, loss = step(params, opt_state, batch)
    jax.block_until_ready((params, loss))  # dispatch is asynchronous: time the work, not the call
    times.append(time.perf_counter() - start)
    losses.append(float(loss))

  eval_fn = jax.jit(lambda p, b: token_losses(logits_fn, p, b).mean(0))
  by_position = np.mean([np.asarray(eval_fn(params, b)) for b in eval_batches], axis=0)
  # The first call compiles; the next few can still warm caches. The median shrugs off spikes
  # from other work on a shared machine.
  steady = times[min(warm_steps, len(times) - 1):]
  step_s = float(np.median(steady))
  tokens = batches[0].shape[0] * (batches[0].shape[1] - 1)
  return {'loss': np.array(losses), 'step_times': np.array(times), 'compile_s': times[0],
          'step_s': step_s, 'tokens_per_s': tokens / step_s, 'loss_by_position': by_position,
          'eval_loss': float(by_position.mean()), 'params': params}


def run(steps: int = 300, batch_size: int = 16, seq_len: int = 128, d_model: int = 128,
        n_layers: int = 2, n_heads: int = 4, lr_transformer: float = 3e-3, lr_rnn: float = 1e-2,
        warmup_steps: int = 20, eval_batches: int = 48, max_bytes: int = 2_000_000,
        cache_dir: str = '', seed: int = 0) -> dict:
  """Trains both models on the same batches; d_hidden of the GRU matches the parameter count."""
  cfg = base.get_config()
  cfg.data.max_bytes = max_bytes
  cfg.data.cache_dir = cache_dir
  ds = data_lib.prepare(data_lib.DataConfig.from_config(cfg.data))
  vocab = ds.tokenizer.vocab_size
  cfg.model.update(d_model=d_model, n_layers=n_layers, n_heads=n_heads, max_len=seq_len)
  mc = ModelConfig.from_config(cfg.model, vocab)

  tf_params = model_lib.init_params(mc, jax.random.key(seed))
  n_tf = count_params(tf_params)
  d_hidden = matched_hidden(n_tf, vocab, d_model)
  gru = GruLM(vocab, d_model, d_hidden)
  gru_p = gru_params(vocab, d_model, d_hidden, seed)

  batches = [jnp.asarray(ds.batch('train', i, batch_size, seq_len, seed)) for i in range(steps)]
  evals = [jnp.asarray(b) for b in ds.eval_batches(eval_batches, batch_size, seq_len)]

  def train_cfg(lr):
    return train_lib.TrainConfig(steps=steps, batch_size=batch_size, seq_len=seq_len, lr=lr,
                                 warmup_steps=min(warmup_steps, steps - 1))

  models = {
      'transformer': train_model(lambda p, x: model_lib.apply(mc, p, x), tf_params,
                                 train_cfg(lr_transformer), batches, evals),
      'GRU': train_model(lambda p, x: gru.apply({'params': p}, x), gru_p, train_cfg(lr_rnn),
                         batches, evals),
  }
  models['transformer'].update(n_params=n_tf, lr=lr_transformer,
                               shape=f'{n_layers} layers, d_model {d_model}, {n_heads} heads, '
                                     f'd_ff {mc.d_ff}, {mc.pos} positions')
  models['GRU'].update(n_params=count_params(gru_p), lr=lr_rnn,
                       shape=f'1 GRU layer, embedding {d_model}, hidden {d_hidden}')
  return {'models': models, 'steps': steps, 'batch_size': batch_size, 'seq_len': seq_len,
          'd_hidden': d_hidden, 'eval_windows': eval_batches * batch_size,
          'train_tokens': len(ds.train), 'epochs': ds.epochs(steps, batch_size, seq_len),
          'device': jax.devices()[0].device_kind}


def report(r: dict) -> None:
  tf, rnn = r['models']['transformer'], r['models']['GRU']
  tokens = r['steps'] * r['batch_size'] * r['seq_len']
  print(f'data: Python stdlib, byte tokens; {r["train_tokens"]:,} training tokens. Both models see '
        f'the same {r["steps"]} batches of {r["batch_size"]} x {r["seq_len"]} '
        f'({tokens:,} tokens, {r["epochs"]:.2f} epochs)')
  for name, m in r['models'].items():
    print(f'  {name:11s} {m["n_params"]:9,} params  ({m["shape"]})')
  print(f'parameter ratio GRU / transformer: {rnn["n_params"] / tf["n_params"]:.3f}')
  print(f'AdamW, warmup + cosine, lr {tf["lr"]:g} (transformer) and {rnn["lr"]:g} (GRU)')
  print(f'              first loss  last loss  eval loss  compile s  step ms  tokens/s  ({r["device"]})')
  for name, m in r['models'].items():
    print(f'  {name:11s} {m["loss"][0]:10.3f} {m["loss"][-1]:10.3f} {m["eval_loss"]:10.3f} '
          f'{m["compile_s"]:10.1f} {1e3 * m["step_s"]:8.1f} {m["tokens_per_s"]:9,.0f}')
  print(f'transformer / GRU tokens/s: {tf["tokens_per_s"] / rnn["tokens_per_s"]:.2f}x')
  T = r['seq_len']
  shown = sorted({0, 1, 3, 7, 15, 31, 63, T - 1} & set(range(T)))
  print(f'eval loss by position in the window (mean over {r["eval_windows"]} windows):')
  print('  position    ' + ''.join(f'{t:>7d}' for t in shown))
  for name, m in r['models'].items():
    print(f'  {name:11s} ' + ''.join(f'{m["loss_by_position"][t]:7.3f}' for t in shown))


def smooth(x: np.ndarray, width: int = 10) -> np.ndarray:
  width = max(1, min(width, len(x)))
  return np.convolve(x, np.ones(width) / width, mode='valid')


def plot(r: dict, folder: str) -> list[str]:
  import matplotlib.pyplot as plt
  paths = []
  colors = {'transformer': 'C0', 'GRU': 'C3'}
  labels = {name: f'{name} ({m["n_params"]:,} params)' for name, m in r['models'].items()}

  fig, ax = plt.subplots(figsize=(7.5, 4.5))
  for name, m in r['models'].items():
    ax.plot(m['loss'], color=colors[name], alpha=0.25, lw=0.8)
    w = min(10, len(m['loss']))
    ax.plot(np.arange(w - 1, len(m['loss'])), smooth(m['loss'], w), color=colors[name],
            label=labels[name])
  ax.set(xlabel='step', ylabel='training loss (nats/byte)',
         title=f'same batches, same optimizer ({r["batch_size"]} x {r["seq_len"]} tokens/step)')
  ax.legend()
  paths.append(common.save(fig, folder, 'training_loss.png'))

  fig, axes = plt.subplots(1, 2, figsize=(13, 4.5))
  context = np.arange(1, r['seq_len'] + 1)
  for name, m in r['models'].items():
    axes[0].plot(context, m['loss_by_position'], color=colors[name], label=labels[name])
  # A log axis spreads out the first few positions, where context helps most.
  axes[0].set(xscale='log', xlabel='tokens of context seen (position in the window + 1)',
              ylabel='eval loss (nats/byte)',
              title=f'loss by position, mean over {r["eval_windows"]} validation windows')
  axes[0].legend()
  # Both models read the same windows, so the content's ups and downs cancel in the difference.
  diff = r['models']['GRU']['loss_by_position'] - r['models']['transformer']['loss_by_position']
  axes[1].plot(context, diff, color='gray', lw=0.8)
  w = min(8, len(diff))
  axes[1].plot(context[w - 1:], smooth(diff, w), color='k', label=f'mean over {w} positions')
  axes[1].axhline(0, color='gray', ls='--', lw=0.8)
  axes[1].set(xlabel='tokens of context seen', ylabel='GRU loss - transformer loss',
              title='GRU minus transformer (above 0: the transformer is better)')
  axes[1].legend()
  paths.append(common.save(fig, folder, 'loss_by_position.png'))

  fig, ax = plt.subplots(figsize=(6, 4.5))
  names = list(r['models'])
  values = [r['models'][n]['tokens_per_s'] for n in names]
  bars = ax.bar(names, values, color=[colors[n] for n in names])
  for bar, n in zip(bars, names):
    ax.annotate(f'{bar.get_height():,.0f}\n({1e3 * r["models"][n]["step_s"]:.0f} ms/step)',
                (bar.get_x() + bar.get_width() / 2, bar.get_height()), ha='center', va='bottom')
  ax.set_ylim(0, 1.2 * max(values))
  ax.set(ylabel='training tokens/s (after compile)', title=f'training throughput on {r["device"]}')
  paths.append(common.save(fig, folder, 'tokens_per_s.png'))
  return paths


def main(argv):
  del argv
  common.main(NAME, run, report, plot)


if __name__ == '__main__':
  app.run(main)
