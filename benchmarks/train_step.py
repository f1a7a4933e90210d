"""Training throughput: python -m benchmarks.train_step [--size=ref] [--batch=...] [--compare]
[--torch] [--unblocked] [--whole_batch] [--one_device] [--one_at_a_time]
[--micro_tokens=256,1024] [--host_devices=K]
[--noall_variants], or one row for a training config:
python -m benchmarks.train_step --config=configs/gpt2_small.py [--config.train.batch_size=8].

--config times that config's own jitted step as `lm.stages.pretrain.build` makes it (its mesh, shardings,
dtype, attention choice, optimizer), on random tokens, so no corpus is prepared: tokens/s, step
time, MFU by the model-FLOPs count (PaLM App. B, `lm.model.flops.model_flops_per_token`) and by the
Chinchilla App. F count the budgets use, compile time, the train state's bytes, XLA's own
estimate of the step's memory, and the device's peak memory where the backend reports it.

--torch adds an equivalent PyTorch eager step (optional dependency), and the ratio column is
then against it; --unblocked adds the project's step with causal attention over the whole
T x T square (no query blocks); --whole_batch adds the step computed over the whole batch at
once (train.micro_batch_tokens=0) instead of in the micro-batches a CPU step uses;
--one_device adds the step on one device instead of the host's devices (below), its
micro-batches side by side on the cores (lm.training.optim.side_by_side); --one_at_a_time adds it on
one device with its micro-batches one after another;
--micro_tokens adds the step at other micro-batch sizes. On a CPU the process splits itself
into host devices as `run.py train` does (mesh.cpu_devices, lm.model.sharding.split_host: one per
core), and the project's candidates run on the data mesh a training run would use, so the
batch is split over them; --host_devices=K sets that count instead (1: one device).
Measurements and the breakdown of the step: benchmarks/README.md.

Times the project's jitted training step (`lm.stages.pretrain.make_train_step` with `make_optimizer`) on
random tokens with every model feature off (LayerNorm, GELU, no bias, dropout, remat or scan),
in four variants: learned or RoPE positions, gradient clipping at 1.0 or off. At --size=ref
(or with --compare) it also times a plain Flax GPT of the same shape: nn.Embed, learned
positions, pre-LN blocks of nn.LayerNorm and nn.Dense (with their default biases), explicit
causal softmax attention, a 4x GELU MLP, the output tied through `embed.attend`, and optax
AdamW without clipping or a decay mask, in a jax.jit'd value_and_grad step.

Each candidate is compiled, warmed up for --warmup steps, then timed over --rounds rounds of
--steps steps each (blocking once at the end of its turn). The candidates take turns within
each round, so a slow spell on a shared machine hits all of them. The table gives the median
tokens/s over rounds, the median per-round ratio to the plain Flax step, and this process's
CPU seconds per step (less disturbed than wall time by other loads on the machine). FLOPs per
token are the Chinchilla App. F count (`lm.model.flops.flops_per_token`); MFU needs a peak
(--peak_flops, else the device table in lm/model/flops.py) and shows n/a on CPUs.
"""
import contextlib
import dataclasses
import statistics
import time

from absl import app
from absl import flags
from ml_collections import config_flags
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax

from lm.model import attention as attention_lib
from lm.model import flops as flops_lib
from lm.model import transformer as model_lib
from lm.training import optim
from lm.model import sharding as shard_lib
from lm.stages import pretrain as train_lib
from lm.config import ModelConfig

# Shapes: (n_layers, d_model, n_heads, d_ff, vocab, max_len) and the default batch, seq_len, dtype.
SIZES = {
    'ref': dict(n_layers=4, d_model=256, n_heads=4, d_ff=1024, vocab=4096, max_len=256,
                batch=16, seq_len=256, dtype='float32'),
    'tiny': dict(n_layers=2, d_model=128, n_heads=4, d_ff=512, vocab=259, max_len=128,
                 batch=16, seq_len=128, dtype='float32'),
    # A sweep-sized point with a SentencePiece-sized vocabulary.
    'sweep': dict(n_layers=4, d_model=128, n_heads=4, d_ff=512, vocab=2048, max_len=128,
                  batch=32, seq_len=128, dtype='float32'),
    'small': dict(n_layers=8, d_model=512, n_heads=8, d_ff=2048, vocab=4096, max_len=256,
                  batch=16, seq_len=256, dtype='float32'),
    'gpt2_small': dict(n_layers=12, d_model=768, n_heads=12, d_ff=3072, vocab=32768,
                       max_len=1024, batch=8, seq_len=1024, dtype='bfloat16'),
}

FLAGS = flags.FLAGS
flags.DEFINE_enum('size', 'ref', list(SIZES), 'Named model shape.')
flags.DEFINE_integer('batch', 0, 'Sequences per step (0: the size default).')
flags.DEFINE_integer('seq_len', 0, 'Tokens per sequence (0: the size default).')
flags.DEFINE_integer('steps', 5, 'Timed steps per candidate per round.')
flags.DEFINE_integer('rounds', 3, 'Interleaved rounds; the median round is reported.')
flags.DEFINE_integer('warmup', 2, 'Untimed steps after the first (compiling) one.')
flags.DEFINE_enum('dtype', None, ['float32', 'bfloat16'], 'Compute dtype (default: the size).')
flags.DEFINE_bool('compare', False, 'Also time the plain Flax GPT (always on at --size=ref).')
flags.DEFINE_float('peak_flops', 0.0, 'Peak FLOP/s of one device for MFU (0: look it up).')
flags.DEFINE_bool('all_variants', True, 'Time learned and RoPE positions with clipping on and off '
                  '(else learned positions with clipping alone).')
flags.DEFINE_bool('unblocked', False, 'Also time the step with causal attention over the whole '
                  'T x T square (no query blocks).')
flags.DEFINE_list('micro_tokens', [], 'Also time the step with these train.micro_batch_tokens '
                  '(e.g. 256,1024), one candidate each.')
flags.DEFINE_integer('host_devices', 0, 'CPU devices the process splits itself into, as '
                     'mesh.cpu_devices does for run.py train (0: one per core; 1: one device). '
                     'The project\'s candidates run on the data mesh a run would use.')
flags.DEFINE_bool('one_device', False, 'Also time the step on one device, its CPU micro-batches '
                  'side by side on the cores.')
flags.DEFINE_bool('one_at_a_time', False, 'Also time the step on one device with its CPU '
                  'micro-batches computed one at a time rather than side by side.')
flags.DEFINE_bool('whole_batch', False, 'Also time the step over the whole batch at once '
                  '(train.micro_batch_tokens=0, no CPU micro-batches).')
flags.DEFINE_bool('torch', False, 'Also time an equivalent PyTorch eager GPT (needs torch).')
flags.DEFINE_integer('torch_threads', 0, 'torch.set_num_threads for --torch (0: its default).')
config_flags.DEFINE_config_file('config', None, 'A training config (configs/*.py): time its own '
                                'step and print one row (the other flags but --steps, --rounds, '
                                '--warmup and --peak_flops are then ignored).', lock_config=False)


class _Block(nn.Module):
  """Pre-LN GPT block: x + attn(ln(x)), then x + mlp(ln(x))."""
  n_heads: int
  d_ff: int
  dtype: jnp.dtype

  @nn.compact
  def __call__(self, x):
    B, T, D = x.shape
    H = D // self.n_heads
    h = nn.LayerNorm(dtype=self.dtype)(x)
    q, k, v = (nn.Dense(D, dtype=self.dtype, name=n)(h).reshape(B, T, self.n_heads, H)
               for n in ('q', 'k', 'v'))
    logits = jnp.einsum('bqnh,bknh->bnqk', q, k) / np.sqrt(H)
    causal = jnp.tril(jnp.ones((T, T), bool))
    logits = jnp.where(causal, logits, jnp.finfo(logits.dtype).min)
    att = jax.nn.softmax(logits.astype(jnp.float32), axis=-1).astype(self.dtype)
    o = jnp.einsum('bnqk,bknh->bqnh', att, v).reshape(B, T, D)
    x = x + nn.Dense(D, dtype=self.dtype, name='out')(o)
    h = nn.LayerNorm(dtype=self.dtype)(x)
    h = nn.Dense(D, dtype=self.dtype)(nn.gelu(nn.Dense(self.d_ff, dtype=self.dtype)(h)))
    return x + h


class PlainGPT(nn.Module):
  """The reference: a GPT written the plain Flax way, with no options."""
  vocab: int
  n_layers: int
  d_model: int
  n_heads: int
  d_ff: int
  max_len: int
  dtype: jnp.dtype = jnp.float32

  @nn.compact
  def __call__(self, tokens):
    embed = nn.Embed(self.vocab, self.d_model, dtype=self.dtype)
    pos = nn.Embed(self.max_len, self.d_model, dtype=self.dtype)
    x = embed(tokens) + pos(jnp.arange(tokens.shape[1]))[None]
    for _ in range(self.n_layers):
      x = _Block(self.n_heads, self.d_ff, self.dtype)(x)
    x = nn.LayerNorm(dtype=self.dtype)(x)
    return embed.attend(x).astype(jnp.float32)


def plain_candidate(s, dtype, batch_BT1):
  """(run(n) -> last loss, n_params) for the plain Flax GPT and AdamW."""
  model = PlainGPT(s['vocab'], s['n_layers'], s['d_model'], s['n_heads'], s['d_ff'],
                   s['max_len'], jnp.dtype(dtype))
  params = model.init(jax.random.PRNGKey(0), batch_BT1[:1, :-1])['params']
  opt = optax.adamw(3e-3, b1=0.9, b2=0.99, weight_decay=0.1)

  def loss_fn(params, batch):
    logits = model.apply({'params': params}, batch[:, :-1])
    return optax.softmax_cross_entropy_with_integer_labels(logits, batch[:, 1:]).mean()

  @jax.jit
  def step(params, opt_state, batch):
    loss, grads = jax.value_and_grad(loss_fn)(params, batch)
    updates, opt_state = opt.update(grads, opt_state, params)
    return optax.apply_updates(params, updates), opt_state, loss

  state = [params, opt.init(params)]

  def run(n):
    for _ in range(n):
      state[0], state[1], loss = step(state[0], state[1], batch_BT1)
    return loss
  return run, flops_lib.count_params(params)


def torch_candidate(s, dtype, batch_BT1, threads: int):
  """(run(n) -> last loss, n_params) for an equivalent PyTorch eager GPT and torch.optim.AdamW:
  learned positions, pre-LN blocks of nn.LayerNorm and nn.Linear (with biases),
  F.scaled_dot_product_attention(is_causal=True), a 4x GELU(tanh) MLP, a head tied to the
  embedding. torch is optional (not in requirements.txt): pip install torch==2.13.0."""
  try:
    import torch
    from torch import nn as tnn
    from torch.nn import functional as F
  except ImportError as e:
    raise SystemExit('--torch needs PyTorch, which is not installed; pip install torch==2.13.0 '
                     '(the CPU build).') from e
  if dtype != 'float32':
    raise SystemExit('--torch compares float32 steps only; drop --dtype or use --dtype=float32.')
  if threads:
    torch.set_num_threads(threads)
  torch.manual_seed(0)
  D, N = s['d_model'], s['n_heads']

  class Block(tnn.Module):
    def __init__(self):
      super().__init__()
      self.ln1, self.ln2 = tnn.LayerNorm(D), tnn.LayerNorm(D)
      self.qkv, self.out = tnn.Linear(D, 3 * D), tnn.Linear(D, D)
      self.up, self.down = tnn.Linear(D, s['d_ff']), tnn.Linear(s['d_ff'], D)

    def forward(self, x):
      B, T, _ = x.shape
      q, k, v = self.qkv(self.ln1(x)).view(B, T, 3, N, D // N).permute(2, 0, 3, 1, 4)
      o = F.scaled_dot_product_attention(q, k, v, is_causal=True)
      x = x + self.out(o.transpose(1, 2).reshape(B, T, D))
      return x + self.down(F.gelu(self.up(self.ln2(x)), approximate='tanh'))

  class GPT(tnn.Module):
    def __init__(self):
      super().__init__()
      self.embed = tnn.Embedding(s['vocab'], D)
      self.pos = tnn.Embedding(s['max_len'], D)
      self.blocks = tnn.ModuleList(Block() for _ in range(s['n_layers']))
      self.ln = tnn.LayerNorm(D)

    def forward(self, tokens):
      x = self.embed(tokens) + self.pos(torch.arange(tokens.shape[1]))
      for b in self.blocks:
        x = b(x)
      return self.ln(x) @ self.embed.weight.T

  model = GPT()
  opt = torch.optim.AdamW(model.parameters(), lr=3e-3, betas=(0.9, 0.99), weight_decay=0.1)
  batch = torch.from_numpy(np.array(batch_BT1)).long()
  inputs, targets = batch[:, :-1], batch[:, 1:]

  def run(n):
    loss = None
    for _ in range(n):
      logits = model(inputs)
      loss = F.cross_entropy(logits.reshape(-1, logits.shape[-1]), targets.reshape(-1))
      opt.zero_grad(set_to_none=True)
      loss.backward()
      opt.step()
    return jnp.asarray(loss.item())
  return run, sum(p.numel() for p in model.parameters())


def project_config(s, dtype, pos):
  return ModelConfig(vocab_size=s['vocab'], n_layers=s['n_layers'], d_model=s['d_model'],
                     n_heads=s['n_heads'], n_kv_heads=s['n_heads'], d_ff=s['d_ff'],
                     max_len=s['max_len'], pos=pos, norm='layernorm', mlp='gelu',
                     use_bias=False, dropout=0.0, dtype=dtype, remat=False, scan_layers=False)


@contextlib.contextmanager
def patched(obj, name, value):
  """obj.name = value for the duration of the block (e.g. while a variant compiles)."""
  old = getattr(obj, name)
  setattr(obj, name, value)
  try:
    yield
  finally:
    setattr(obj, name, old)


def project_candidate(mc, tc, batch_BT1, unblocked: bool = False, devices: int = 1,
                      one_at_a_time: bool = False):
  """(run(n) -> last loss, n_params) for lm.stages.pretrain's step, jitted as lm.stages.pretrain.build does.

  unblocked: compiled with causal attention over the whole T x T square (no query blocks,
  lm/model/attention.py), to show what the blocks buy in the same run. devices > 1: on a mesh whose
  data axis is the first `devices` devices (params replicated, the batch split).
  one_at_a_time: compiled as if on one core, so its micro-batches run one after another.
  """
  params = jax.jit(model_lib.init_params, static_argnums=0)(mc, jax.random.PRNGKey(0))
  optimizer = train_lib.make_optimizer(tc, params)
  state = [{'params': params, 'opt_state': optimizer.init(params),
            'step': jnp.zeros((), jnp.int32)}]
  fn = train_lib.make_train_step(mc, tc, optimizer, seed=0)
  if devices > 1:
    mesh = shard_lib.make_mesh(shard_lib.MeshConfig(data=devices), jax.devices()[:devices])
    rep = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec())
    split = shard_lib.batch_sharding(mesh)
    batch_BT1 = jax.device_put(batch_BT1, split)
    state[0] = jax.device_put(state[0], rep)
    step = jax.jit(shard_lib.with_activation_constraints(fn, mesh), donate_argnums=0,
                   in_shardings=(rep, split), out_shardings=(rep, rep))
  else:
    step = jax.jit(fn, donate_argnums=0)
  # Compiled here, under the switch (the "1st step" column is then one step).
  if unblocked:
    with patched(attention_lib, 'causal_blocks', lambda T: 1):
      step = step.lower(state[0], batch_BT1).compile()
  elif one_at_a_time:
    with patched(optim, 'host_cores', lambda: 1):
      step = step.lower(state[0], batch_BT1).compile()

  def run(n):
    for _ in range(n):
      state[0], m = step(state[0], batch_BT1)
    return m['loss']
  return run, flops_lib.count_params(params)


def config_vocab(cfg) -> int:
  """The vocabulary a config's run would have, without building its tokenizer."""
  from lm.data import tokenizer as tokenizer_lib
  d = cfg.data
  if cfg.model.vocab_size:
    return int(cfg.model.vocab_size)
  if d.tokenizer == 'bytes':
    return tokenizer_lib.ByteTokenizer(chat=d.chat_tokens).vocab_size
  if d.tokenizer == 'sentencepiece':
    return int(d.vocab_size)
  if d.tokenizer == 'file' and d.tokenizer_path:
    return tokenizer_lib.load_tokenizer(d.tokenizer_path).vocab_size
  raise SystemExit(f'cannot tell the vocabulary of data.tokenizer={d.tokenizer!r} without '
                   'preparing the data; set --config.model.vocab_size.')


def _mib(n) -> str:
  return 'n/a' if n is None else f'{n / 2 ** 20:,.0f} MiB'


def config_row(cfg) -> dict:
  """Times the config's own train step; returns (and prints) its row."""
  from lm.model import sharding as shard_lib
  run = train_lib.build(cfg, vocab_size=config_vocab(cfg))
  mc, tc = run.model, run.train
  B, T = tc.batch_size, tc.seq_len
  state = run.init_state(jax.random.PRNGKey(int(cfg.seed)))
  rows = np.random.default_rng(0).integers(0, mc.vocab_size, (B // jax.process_count(), T + 1))
  batch = shard_lib.global_batch(rows.astype(np.int32), run.mesh)
  t = time.perf_counter()
  step = run.train_step.lower(state, batch).compile()
  compile_s = time.perf_counter() - t
  mem = step.memory_analysis()
  xla_bytes = None if mem is None else (mem.argument_size_in_bytes + mem.output_size_in_bytes
                                        + mem.temp_size_in_bytes - mem.alias_size_in_bytes)
  state_bytes = sum(x.size * x.dtype.itemsize for x in jax.tree.leaves(run.abstract_state))

  def steps(n):
    nonlocal state
    for _ in range(n):
      state, m = step(state, batch)
    return m['loss']
  jax.block_until_ready(steps(1 + FLAGS.warmup))
  times = []
  for _ in range(FLAGS.rounds):
    t = time.perf_counter()
    jax.block_until_ready(steps(FLAGS.steps))
    times.append((time.perf_counter() - t) / FLAGS.steps)
  step_s = statistics.median(times)
  dev = jax.devices()[0]
  n_dev = len(run.mesh.devices.flat)
  stats = dev.memory_stats() if hasattr(dev, 'memory_stats') else None
  peak_bytes = (stats or {}).get('peak_bytes_in_use')
  peak = flops_lib.peak_flops(dev.device_kind, mc.dtype, FLAGS.peak_flops) * n_dev
  tps = B * T / step_s
  fpt = run.flops_per_token
  row = {'config': FLAGS['config'].config_filename if hasattr(FLAGS['config'], 'config_filename')
         else '', 'device': f'{n_dev} x {dev.device_kind}', 'params': run.n_params['total'],
         'dtype': mc.dtype, 'param_dtype': mc.param_dtype, 'opt_dtype': tc.opt_dtype,
         'attention': mc.attention_impl, 'batch': B, 'seq_len': T, 'tokens_per_s': tps,
         'step_s': step_s, 'compile_s': compile_s,
         'mfu': tps * fpt['model'] / peak if peak else None,
         'mfu_appf': tps * fpt['chinchilla'] / peak if peak else None,
         'state_bytes': state_bytes, 'xla_step_bytes': xla_bytes, 'peak_bytes': peak_bytes}
  pct = lambda x: 'n/a' if x is None else f'{100 * x:.1f}%'
  print(f"{row['device']}: {row['params']:,} params, {mc.dtype} compute, {mc.param_dtype} params, "
        f"{tc.opt_dtype} moments, attention {mc.attention_impl}, batch {B} x {T}")
  print(f"{'tokens/s':>10} {'step':>9} {'MFU':>6} {'MFU AppF':>8} {'compile':>8} "
        f"{'state':>10} {'XLA step':>10} {'peak':>10}")
  print(f"{tps:>10,.0f} {1e3 * step_s:>7.1f}ms {pct(row['mfu']):>6} {pct(row['mfu_appf']):>8} "
        f"{compile_s:>7.1f}s {_mib(state_bytes):>10} {_mib(xla_bytes):>10} {_mib(peak_bytes):>10}")
  note = flops_lib.unknown_device_note(dev.device_kind, dev.platform)
  if note:
    print(note)
  return row


def main(argv):
  del argv
  if FLAGS.config is not None:
    config_row(FLAGS.config)
    return
  s = SIZES[FLAGS.size]
  B = FLAGS.batch or s['batch']
  # Before anything else starts the backend: the devices and mesh `run.py train` would use.
  mesh = shard_lib.make_mesh(shard_lib.MeshConfig(cpu_devices=FLAGS.host_devices), batch_size=B)
  n_dev = mesh.devices.size
  T = FLAGS.seq_len or s['seq_len']
  dtype = FLAGS.dtype or s['dtype']
  s = dict(s, max_len=max(s['max_len'], T))
  batch = jax.device_put(jnp.asarray(np.random.default_rng(0).integers(
      0, s['vocab'], (B, T + 1)), jnp.int32))
  # The LR schedule spans the steps taken here; its shape does not change a step's cost.
  steps_total = 1 + FLAGS.warmup + FLAGS.rounds * FLAGS.steps

  cands = {}
  if FLAGS.compare or FLAGS.size == 'ref':
    cands['plain flax'] = plain_candidate(s, dtype, batch)
  if FLAGS.torch:
    cands['torch eager'] = torch_candidate(s, dtype, batch, FLAGS.torch_threads)
  mcs = {}
  for pos in ('learned', 'rope') if FLAGS.all_variants else ('learned',):
    for clip in (1.0, 0.0) if FLAGS.all_variants else (1.0,):
      mc = project_config(s, dtype, pos)
      tc = train_lib.TrainConfig(steps=steps_total, batch_size=B, seq_len=T, warmup_steps=0,
                                 grad_clip=clip, grad_accum=1)
      name = f'lm {pos} clip {clip:g}'
      cands[name] = project_candidate(mc, tc, batch, devices=n_dev)
      mcs[name] = mc
      variants = {}
      if FLAGS.unblocked:
        variants[' unblk'] = dict(tc=tc, unblocked=True, devices=n_dev)
      if FLAGS.one_device and n_dev > 1:
        variants[' 1dev'] = dict(tc=tc)
      if FLAGS.one_at_a_time:
        variants[' 1at1'] = dict(tc=tc, one_at_a_time=True)
      if FLAGS.whole_batch:
        variants[' whole'] = dict(tc=dataclasses.replace(tc, micro_batch_tokens=0), devices=n_dev)
      for m in FLAGS.micro_tokens:
        variants[f' mt{int(m)}'] = dict(tc=dataclasses.replace(tc, micro_batch_tokens=int(m)),
                                        devices=n_dev)
      for suffix, kw in variants.items():
        cands[name + suffix] = project_candidate(mc, kw.pop('tc'), batch, **kw)
        mcs[name + suffix] = mc

  dev = jax.devices()[0]
  A = optim.micro_batches(tc, B, n_dev, dev.platform)
  peak = flops_lib.peak_flops(dev.device_kind, dtype, FLAGS.peak_flops)
  print(f'{dev.device_kind} ({dev.platform}), size {FLAGS.size}: {s["n_layers"]} layers, '
        f'd_model {s["d_model"]}, {s["n_heads"]} heads, d_ff {s["d_ff"]}, vocab {s["vocab"]}; '
        f'batch {B} x {T}, {dtype}; on {n_dev} device(s), the step in {A} micro-batches, '
        f'{optim.side_by_side(A, n_dev, dev.platform)} side by side ({optim.host_cores()} '
        'cores)', flush=True)

  compile_s = {}
  for name, (run, _) in cands.items():
    t = time.perf_counter()
    jax.block_until_ready(run(1))   # compiles, so this shows the compile cost
    compile_s[name] = time.perf_counter() - t
    if FLAGS.warmup:
      jax.block_until_ready(run(FLAGS.warmup))

  tps = {name: [] for name in cands}
  cpu = {name: [] for name in cands}
  for r in range(FLAGS.rounds):
    # Rotating the order keeps any one candidate from always running first after a pause.
    names = list(cands)[r % len(cands):] + list(cands)[:r % len(cands)]
    for name in names:
      t, c = time.perf_counter(), time.process_time()
      jax.block_until_ready(cands[name][0](FLAGS.steps))
      tps[name].append(FLAGS.steps * B * T / (time.perf_counter() - t))
      # This process's CPU time: steadier than wall time when others load the machine.
      cpu[name].append((time.process_time() - c) / FLAGS.steps)

  # Ratios are against the PyTorch step when it runs, else against the plain Flax step.
  ref_name = 'torch eager' if 'torch eager' in tps else 'plain flax'
  plain = tps.get(ref_name)
  print(f"{'candidate':<24} {'params':>9} {'1st step':>8} {'tokens/s':>8} {'per round':>17} "
        f"{'vs ' + ref_name.split()[0]:>8} {'cpu s/step':>10} {'FLOPs/tok':>9} {'FLOP/s':>7} {'MFU':>6}")
  for name, (_, n_params) in cands.items():
    med = statistics.median(tps[name])
    mc = mcs.get(name) or project_config(s, dtype, 'learned')
    fpt = flops_lib.flops_per_token(mc, T, n_params)['chinchilla']
    mfu = f'{100 * med * fpt / peak:5.1f}%' if peak else 'n/a'
    rounds = '/'.join(f'{x / 1e3:.2f}' for x in tps[name]) + 'K'
    # Paired per round, so a slow spell shared by both candidates cancels.
    ratio = (f'{statistics.median(a / b for a, b in zip(tps[name], plain)):.3f}x' if plain
             else '-')
    print(f'{name:<24} {n_params:>9,} {compile_s[name]:>7.1f}s {med:>8,.0f} {rounds:>17} '
          f'{ratio:>8} {statistics.median(cpu[name]):>10.3f} {fpt / 1e6:>8.2f}M '
          f'{med * fpt / 1e9:>6.1f}G {mfu:>6}')


if __name__ == '__main__':
  app.run(main)
