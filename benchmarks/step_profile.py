"""Where a training step's time goes: python -m benchmarks.step_profile [--size=tiny] [--trace].

Ablations of the project's jitted step (lm.stages.pretrain.make_train_step, AdamW with clipping), timed in
interleaved rounds like benchmarks/train_step.py, each as milliseconds per step and as a share of
the whole step:

  step             the whole training step (forward, backward, clipping, AdamW)
  fwd+bwd          value_and_grad of the loss alone (no optimizer)
  forward          the loss alone
  optimizer        clipping + AdamW update + apply on fixed gradients
  no attention     the step with the attention core (scores, mask, softmax, weighted sum)
                   replaced by passing v through; the q/k/v/o projections stay
  no mlp           the step with each block's MLP removed
  head+loss alone  the tied output projection and cross-entropy, forward and backward, on
                   random hidden states (what the vocabulary costs)

The ablations swap pieces of lm.model.attention / lm.model.transformer for the duration of one compile; the
shares are differences, so they are only as steady as the machine.

--trace instead records a jax.profiler trace of the whole step and sums the time of every XLA
kernel by kind (matrix multiplies, copies and transposes, reductions, other elementwise
fusions), with the busiest kernels named and the time no kernel was running on any thread.
"""
import statistics
import time

from absl import app
from absl import flags
import jax
import jax.numpy as jnp
import numpy as np
import optax

from benchmarks.train_step import SIZES, patched, project_config
from lm.model import transformer as model_lib
from lm.stages import pretrain as train_lib

FLAGS = flags.FLAGS
# --size, --steps and --rounds are benchmarks/train_step.py's flags (imported with it).
flags.DEFINE_enum('pos', 'learned', ['learned', 'rope'], 'Positional encoding.')
flags.DEFINE_bool('trace', False, 'Per-kernel breakdown of the step from a profiler trace.')
flags.DEFINE_string('kernels_of', '', 'With --trace: list every kernel of the places whose name '
                    'contains this (e.g. "forward norm").')


def kernel_kind(name: str) -> str:
  """A kernel's kind from its XLA name (ynn_fusion: a dot XLA:CPU hands to its matmul library)."""
  base = name.split('.')[0]
  if base.startswith(('ynn', 'xnn', 'dot', 'onednn')) or 'dot' in base or 'convolution' in base:
    return 'matmul'
  if base.startswith(('copy', 'transpose')) or base.endswith('transpose_fusion'):
    return 'copy/transpose'
  if 'reduce' in base:
    return 'reduction'
  return 'elementwise'


def hlo_ops(compiled_text: str) -> dict:
  """{instruction name: (result shape, op_name metadata)} of a compiled module's text."""
  import re
  out = {}
  for m in re.finditer(r'^\s*%?([\w.-]+) = (\S+) .*?op_name="([^"]*)"', compiled_text, re.M):
    out[m.group(1)] = (m.group(2), m.group(3))
  return out


def where(op_name: str) -> str:
  """A coarse place in the model for an op_name: pass (forward / backward) and part."""
  backward = 'transpose(' in op_name
  if 'optimizer' in op_name or ('jvp(' not in op_name and 'transpose(' not in op_name):
    return 'optimizer and the rest'
  if '/attn/' in op_name:
    part = 'attn projections' if ('btd,dnh' in op_name or 'btnh,nhd' in op_name) else 'attn core'
  elif '/mlp/' in op_name:
    part = 'mlp'
  elif 'norm' in op_name:
    part = 'norm'
  else:
    part = 'embed/head/loss'
  return f"{'backward' if backward else 'forward'} {part}"


def trace_breakdown(step, state, batch, n: int = 10):
  """{kind: ms per step}, [(kernel, ms per step)] busiest first, and the wall ms per step."""
  import collections
  import glob
  import tempfile
  from jax.profiler import ProfileData
  for _ in range(3):
    state, m = step(state, batch)
  jax.block_until_ready(m)
  with tempfile.TemporaryDirectory() as d:
    t = time.perf_counter()
    with jax.profiler.trace(d):
      for _ in range(n):
        state, m = step(state, batch)
      jax.block_until_ready(m)
    wall = (time.perf_counter() - t) / n
    data = ProfileData.from_file(glob.glob(f'{d}/**/*.xplane.pb', recursive=True)[0])
    kernels = collections.Counter()
    spans = []
    for plane in data.planes:
      for line in plane.lines:
        if 'XLAEigen' not in line.name:        # the threads that run XLA's kernels
          continue
        for ev in line.events:
          if ev.name.startswith(('ThunkExecutor', 'Thunk')):
            continue
          kernels[ev.name] += ev.duration_ns / 1e6 / n
          spans.append((ev.start_ns, ev.start_ns + ev.duration_ns))
  # Time covered by at least one kernel on some thread; the rest of the wall time is runtime
  # (dispatch, scheduling, waiting) with no kernel running.
  covered, end = 0.0, -1.0
  for a, b in sorted(spans):
    if b > end:
      covered += b - max(a, end)
      end = b
  kinds = collections.Counter()
  places = collections.Counter()
  ops = hlo_ops(step.lower(state, batch).compile().as_text())
  for name, ms in kernels.items():
    kinds[kernel_kind(name)] += ms
    places[where(ops[name][1]) if name in ops else 'runtime'] += ms
  top = [(name, ms, *ops.get(name, ('', ''))) for name, ms in kernels.most_common()]
  return kinds, places, top, 1e3 * wall, covered / 1e6 / n


def _no_attention(q, k, v, **_):
  # The shape of the real output, without the scores: GQA repeats the kv heads, and a query
  # block (lm/model/attention.py) sees a longer key prefix than its own rows.
  return jnp.repeat(v[:, :q.shape[1]], q.shape[2] // v.shape[2], axis=2)


def _no_mlp(self, x_BTD):
  return jnp.zeros_like(x_BTD)


def main(argv):
  del argv
  s = SIZES[FLAGS.size]
  B, T, dtype = s['batch'], s['seq_len'], s['dtype']
  mc = project_config(s, dtype, FLAGS.pos)
  tc = train_lib.TrainConfig(steps=1000, batch_size=B, seq_len=T, warmup_steps=0, grad_clip=1.0)
  batch = jnp.asarray(np.random.default_rng(0).integers(0, s['vocab'], (B, T + 1)), jnp.int32)
  params = jax.jit(model_lib.init_params, static_argnums=0)(mc, jax.random.PRNGKey(0))
  opt = train_lib.make_optimizer(tc, params)
  opt_state = opt.init(params)
  loss = lambda p: train_lib.next_token_loss(mc, p, batch)

  def whole_step():
    step = jax.jit(train_lib.make_train_step(mc, tc, opt, 0))
    state = {'params': params, 'opt_state': opt_state, 'step': jnp.zeros((), jnp.int32)}
    return lambda: step(state, batch)[1]['loss']

  def head_alone():
    # The tied output projection and the cross-entropy on random final hidden states, with
    # gradients for both: what the vocabulary costs, measured on its own.
    x = jax.random.normal(jax.random.PRNGKey(1), (B, T, s['d_model']), jnp.float32)

    def head_loss(x, embed):
      logits = jnp.einsum('btd,vd->btv', x, embed)
      return optax.softmax_cross_entropy_with_integer_labels(logits, batch[:, 1:]).mean()
    g = jax.jit(jax.value_and_grad(head_loss, argnums=(0, 1)))
    return lambda: g(x, params['embed'])[0]

  if FLAGS.trace:
    state = {'params': params, 'opt_state': opt_state, 'step': jnp.zeros((), jnp.int32)}
    step = jax.jit(train_lib.make_train_step(mc, tc, opt, 0), donate_argnums=0)
    kinds, places, top, wall, covered = trace_breakdown(step, state, batch)
    busy = sum(kinds.values())
    print(f"{jax.devices()[0].device_kind}, size {FLAGS.size}, batch {B} x {T}: {wall:.1f} ms "
          f"a step (wall, while traced); kernels {busy:.1f} ms of thread time; some kernel "
          f"running {covered:.1f} ms, none {max(wall - covered, 0):.1f} ms")
    for kind, ms in kinds.most_common():
      print(f'  {kind:<16} {ms:8.2f} ms  {100 * ms / busy:5.1f}% of kernel time')
    print('by place:')
    for place, ms in places.most_common():
      print(f'  {place:<28} {ms:8.2f} ms  {100 * ms / busy:5.1f}%')
      if FLAGS.kernels_of and FLAGS.kernels_of in place:
        for name, k_ms, shape, op in top:
          if op and where(op) == place:
            print(f'      {name:<26} {k_ms:6.2f} ms  {shape:<22} {op[-60:]}')
    print('busiest kernels:')
    for name, ms, shape, op in top[:15]:
      print(f'  {name:<26} {ms:6.2f} ms  {shape:<22} {op[-70:]}')
    return

  fwd = jax.jit(loss)
  fwd_bwd = jax.jit(jax.value_and_grad(loss))
  grads = fwd_bwd(params)[1]

  @jax.jit
  def opt_only(grads, opt_state, params):
    updates, new_state = opt.update(grads, opt_state, params)
    return optax.apply_updates(params, updates), new_state

  variants = {'step': whole_step(),
              'fwd+bwd': lambda: fwd_bwd(params)[0],
              'forward': lambda: fwd(params),
              'optimizer': lambda: opt_only(grads, opt_state, params)[0]}
  with patched(jax.nn, 'dot_product_attention', _no_attention):   # what lm/model/attention.py calls
    variants['no attention'] = whole_step()
    jax.block_until_ready(variants['no attention']())      # compiled while patched
  with patched(model_lib.Mlp, '__call__', _no_mlp):
    variants['no mlp'] = whole_step()
    jax.block_until_ready(variants['no mlp']())
  variants['head+loss alone'] = head_alone()

  for run in variants.values():
    for _ in range(3):
      jax.block_until_ready(run())
  times = {k: [] for k in variants}
  for r in range(FLAGS.rounds):
    names = list(variants)[r % len(variants):] + list(variants)[:r % len(variants)]
    for name in names:
      t = time.perf_counter()
      for _ in range(FLAGS.steps):
        out = variants[name]()
      jax.block_until_ready(out)
      times[name].append((time.perf_counter() - t) / FLAGS.steps)
  full = statistics.median(times['step'])
  print(f"{jax.devices()[0].device_kind}, size {FLAGS.size} ({s['n_layers']} layers, d_model "
        f"{s['d_model']}, vocab {s['vocab']}, batch {B} x {T}, {dtype}, pos {FLAGS.pos})")
  print(f"{'variant':<20} {'ms/step':>8} {'of step':>8}")
  for name, ts in times.items():
    med = statistics.median(ts)
    print(f'{name:<20} {1e3 * med:>8.2f} {100 * med / full:>7.0f}%')
  print(f"{'-> attention core':<20} {1e3 * (full - statistics.median(times['no attention'])):>8.2f}"
        f" {100 * (1 - statistics.median(times['no attention']) / full):>7.0f}%")
  print(f"{'-> mlp':<20} {1e3 * (full - statistics.median(times['no mlp'])):>8.2f}"
        f" {100 * (1 - statistics.median(times['no mlp']) / full):>7.0f}%")


if __name__ == '__main__':
  app.run(main)
