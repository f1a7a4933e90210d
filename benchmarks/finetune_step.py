"""Full fine-tuning against LoRA: step time and memory, measured in one process.

  python -m benchmarks.finetune_step [--layers=4 --d_model=128 --batch=16 --seq_len=128]
                                     [--ranks=4,16] [--targets=q,k,v,o,up,down]

Builds the fine-tuning step that `run.py finetune` uses (lm/training/loop.py's step over lm/data/sft.py's masked
loss, AdamW from lm/training/optim.py) for full fine-tuning and for LoRA at each rank, on the same packed
batch of random examples, and times them in interleaved rounds (so a slow spell on a shared
machine hits all of them); the median round is reported. Memory is counted from the trees
themselves: trainable numbers, optimizer-state bytes and gradient bytes (what the step keeps
besides the frozen base, which both hold once).
"""
import time

from absl import app
from absl import flags
import jax
import jax.numpy as jnp
import numpy as np

from lm.model import lora as lora_lib
from lm.training import loop
from lm.model import transformer as model_lib
from lm.training import optim
from lm.data import sft
from lm.config import ModelConfig

FLAGS = flags.FLAGS
flags.DEFINE_integer('layers', 4, 'Transformer layers.')
flags.DEFINE_integer('d_model', 128, 'Model width.')
flags.DEFINE_integer('vocab', 263, 'Vocabulary size (263: bytes with chat tokens).')
flags.DEFINE_integer('batch', 16, 'Packed rows per step.')
flags.DEFINE_integer('seq_len', 128, 'Tokens per row.')
flags.DEFINE_string('ranks', '4,16', 'LoRA ranks to compare with full fine-tuning.')
flags.DEFINE_string('targets', 'q,k,v,o,up,down', 'LoRA target matrices.')
flags.DEFINE_integer('steps', 10, 'Timed steps per candidate per round.')
flags.DEFINE_integer('rounds', 5, 'Interleaved rounds.')


def _batch(vocab: int, batch: int, seq_len: int):
  """Rows packed from random examples of 20-60 tokens, half of each the counted response."""
  rng = np.random.default_rng(0)
  rows = {k: np.zeros((batch, seq_len), np.int32) for k in ('tokens', 'targets', 'segments',
                                                             'positions')}
  rows['weights'] = np.zeros((batch, seq_len), np.float32)
  for r in range(batch):
    at, seg = 0, 1
    while True:
      n = int(rng.integers(20, 60))
      if at + n > seq_len:
        break
      ids = rng.integers(0, vocab, n + 1)
      rows['tokens'][r, at:at + n], rows['targets'][r, at:at + n] = ids[:-1], ids[1:]
      rows['weights'][r, at + n // 2:at + n] = 1
      rows['segments'][r, at:at + n], rows['positions'][r, at:at + n] = seg, np.arange(n)
      at, seg = at + n, seg + 1
  return {k: jnp.asarray(v) for k, v in rows.items()}


def candidates():
  base = ModelConfig(vocab_size=FLAGS.vocab, n_layers=FLAGS.layers, d_model=FLAGS.d_model,
                     n_heads=max(1, FLAGS.d_model // 32), d_ff=4 * FLAGS.d_model,
                     max_len=FLAGS.seq_len)
  params = model_lib.init_params(base, jax.random.PRNGKey(0))
  tc = optim.TrainConfig(steps=1000, warmup_steps=10)
  out = {}
  opt = optim.make_optimizer(tc, params)
  step = loop.make_step(lambda tr, _, b, r: sft.masked_loss(base, tr, b, None, r), tc, opt, 0)
  # The full step donates (and so deletes) its state: give it its own copy of the weights.
  out['full'] = (jax.jit(step, donate_argnums=0), None, jax.tree.map(jnp.copy, params), opt, base)
  targets = tuple(t for t in FLAGS.targets.split(',') if t)
  for r in (int(x) for x in FLAGS.ranks.split(',') if x):
    mc = ModelConfig(**{**base.__dict__, 'lora_rank': r, 'lora_targets': targets})
    adapters = model_lib.init_variables(mc, jax.random.PRNGKey(1))['lora']
    opt = optim.make_optimizer(tc, adapters)
    step = loop.make_step(lambda tr, fr, b, rng, mc=mc: sft.masked_loss(mc, fr, b, tr, rng), tc,
                          opt, 0)
    out[f'lora r={r}'] = (jax.jit(step, donate_argnums=0), params, adapters, opt, mc)
  return out


def main(argv):
  del argv
  batch = _batch(FLAGS.vocab, FLAGS.batch, FLAGS.seq_len)
  cands = candidates()
  states, times, info = {}, {k: [] for k in cands}, {}
  for name, (step, frozen, trainable, opt, mc) in cands.items():
    state = {'params': trainable, 'opt_state': opt.init(trainable),
             'step': jnp.zeros((), jnp.int32)}
    info[name] = {'trainable': lora_lib.tree_size(trainable),
                  'opt_bytes': lora_lib.tree_bytes(state['opt_state']),
                  'grad_bytes': lora_lib.tree_bytes(trainable)}
    for _ in range(3):                                   # compile and warm up
      state, m = step(state, frozen, batch)
    jax.block_until_ready(m)
    states[name] = state
  for _ in range(FLAGS.rounds):
    for name, (step, frozen, *_rest) in cands.items():
      state = states[name]
      t0 = time.perf_counter()
      for _ in range(FLAGS.steps):
        state, m = step(state, frozen, batch)
      jax.block_until_ready(m)
      times[name].append((time.perf_counter() - t0) / FLAGS.steps)
      states[name] = state
  n_base = info['full']['trainable']
  full_t = float(np.median(times['full']))
  print(f'{FLAGS.layers} layers, d_model {FLAGS.d_model}, batch {FLAGS.batch} x {FLAGS.seq_len}, '
        f'{jax.devices()[0].device_kind}; median of {FLAGS.rounds} rounds of {FLAGS.steps} steps')
  print(f"{'':12s}{'trainable':>12s}{'share':>9s}{'optimizer state':>17s}{'gradients':>12s}"
        f"{'step':>10s}{'vs full':>9s}")
  for name in cands:
    t = float(np.median(times[name]))
    i = info[name]
    print(f"{name:12s}{i['trainable']:>12,d}{i['trainable'] / n_base:>9.2%}"
          f"{i['opt_bytes'] / 1e6:>14.2f} MB{i['grad_bytes'] / 1e6:>9.2f} MB"
          f"{1e3 * t:>8.1f} ms{t / full_t:>9.2f}")


if __name__ == '__main__':
  app.run(main)
