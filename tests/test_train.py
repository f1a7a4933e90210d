"""Training: learning, determinism, exact resume, grad accumulation, schedules, FLOPs, configs, errors."""
import glob
import importlib
import json
import os
import shutil

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest

from configs import base
from lm.model import attention as attention_lib
from lm.training import checkpoint as ckpt_lib
from lm.model import flops as flops_lib
from lm.model import transformer as model_lib
from lm.training import optim
from lm.stages import pretrain as train_lib
from lm.config import ModelConfig
from lm.errors import UserError

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def small_config(cache_dir, **train):
  c = base.get_config()
  c.model.n_layers, c.model.d_model, c.model.n_heads, c.model.max_len = 2, 32, 4, 64
  c.data.max_bytes = 400_000
  c.data.cache_dir = cache_dir
  t = dict(steps=12, batch_size=8, seq_len=32, lr=3e-3, warmup_steps=2, eval_every=6,
           eval_batches=2, log_every=2, checkpoint_every=4, progress='none')
  t.update(train)
  for k, v in t.items():
    c.train[k] = v
  return c


def read_metrics(workdir):
  with open(os.path.join(workdir, 'metrics.jsonl')) as f:
    return [json.loads(line) for line in f]


def final_params(workdir):
  cfg_steps = max(int(os.path.basename(p)) for p in glob.glob(f'{workdir}/checkpoints/[0-9]*'))
  mngr = ckpt_lib.Checkpoints(os.path.join(workdir, 'checkpoints'), 5)
  import orbax.checkpoint as ocp
  state = mngr.manager.restore(cfg_steps, args=ocp.args.StandardRestore())
  mngr.close()
  return state['params']


@pytest.fixture(scope='module')
def reference_run(cache_dir, tmp_path_factory):
  """One uninterrupted 12-step run shared by the tests below."""
  workdir = str(tmp_path_factory.mktemp('ref'))
  summary = train_lib.train(small_config(cache_dir), workdir)
  return workdir, summary


def test_workdir_holds_everything(reference_run):
  workdir, summary = reference_run
  for name in ('config.json', 'manifest.json', 'metrics.jsonl', 'summary.json', 'tokenizer'):
    assert os.path.exists(os.path.join(workdir, name)), name
  assert glob.glob(f'{workdir}/tensorboard/events.out.tfevents.*')
  assert sorted(os.listdir(f'{workdir}/checkpoints')) == ['12', '8']   # keep_checkpoints = 2
  rows = read_metrics(workdir)
  for key in ('step', 'loss', 'lr', 'grad_norm', 'tokens', 'flops', 'tokens_per_s'):
    assert all(key in r for r in rows), key
  evals = [r for r in rows if 'eval_loss' in r]
  assert [r['step'] for r in evals] == [6, 12]
  assert all('eval_bpb' in r and 'eval_ppl' in r for r in evals)
  m = json.load(open(os.path.join(workdir, 'manifest.json')))
  assert m['params'] == summary['params'] and m['params_nonembed'] < m['params']
  assert m['flops_per_token']['6n'] == 6 * m['params']
  assert m['data']['corpus_hash'] and m['data']['tokenizer_hash']
  assert m['mesh'] == {'data': 1, 'fsdp': 1, 'tensor': 1}
  assert set(m['versions']) >= {'python', 'jax', 'flax', 'optax', 'orbax_checkpoint'}


def train_and_resume(config, tmp_path, stop_at: int = 5) -> list:
  """Trains config() whole and, in another folder, stopped at stop_at and resumed: asserts the
  two end bitwise equal; returns the whole run's metrics rows."""
  ref = train_lib.train(config(), str(tmp_path / 'ref'))
  assert ref['finished']
  workdir = str(tmp_path / 'resumed')
  assert train_lib.train(config(), workdir, stop_at=stop_at)['finished'] is False
  assert train_lib.train(config(), workdir)['final_loss'] == ref['final_loss']
  for a, b in zip(jax.tree.leaves(final_params(str(tmp_path / 'ref'))),
                  jax.tree.leaves(final_params(workdir))):
    np.testing.assert_array_equal(a, b)
  return read_metrics(str(tmp_path / 'ref'))


def test_loss_decreases(reference_run):
  rows = read_metrics(reference_run[0])
  assert rows[-1]['loss'] < rows[0]['loss'] - 0.5   # bytes: from ~ln 259 = 5.6 downwards
  assert rows[-1]['eval_loss'] < 5.0


def test_same_seed_same_numbers_and_exact_resume(cache_dir, reference_run, tmp_path):
  """A run killed at step 5 and resumed ends bitwise equal to the uninterrupted run."""
  ref_dir, ref_summary = reference_run
  workdir = str(tmp_path / 'resumed')
  cfg = small_config(cache_dir)
  partial = train_lib.train(cfg, workdir, stop_at=5)
  assert partial['finished'] is False and not os.path.exists(f'{workdir}/summary.json')
  resumed = train_lib.train(cfg, workdir)
  assert resumed['finished'] and resumed['final_loss'] == ref_summary['final_loss']
  for a, b in zip(jax.tree.leaves(final_params(ref_dir)), jax.tree.leaves(final_params(workdir))):
    np.testing.assert_array_equal(a, b)
  # The resumed metrics file has every step once, identical to the reference.
  strip = lambda rows: [{k: v for k, v in r.items() if k in ('step', 'loss', 'eval_loss')}
                        for r in rows]
  assert strip(read_metrics(workdir)) == strip(read_metrics(ref_dir))
  # A finished run is not trained again.
  assert train_lib.train(cfg, workdir)['final_loss'] == ref_summary['final_loss']


def test_run_killed_after_its_final_checkpoint_completes_its_summary(reference_run, tmp_path,
                                                                     cache_dir):
  """The last checkpoint was written, the summary was not: rerunning evaluates that checkpoint
  and writes a complete summary instead of one without losses."""
  ref_dir, ref_summary = reference_run
  workdir = str(tmp_path / 'died')
  shutil.copytree(ref_dir, workdir)
  os.remove(f'{workdir}/summary.json')
  summary = train_lib.train(small_config(cache_dir), workdir)
  assert summary['finished'] and summary['steps'] == 12
  assert summary['final_loss'] == ref_summary['final_loss']
  assert summary['eval_loss'] == pytest.approx(ref_summary['eval_loss'], rel=1e-6)
  assert json.load(open(f'{workdir}/summary.json'))['eval_loss'] is not None
  assert [r['step'] for r in read_metrics(workdir)] == [r['step'] for r in read_metrics(ref_dir)]


@pytest.mark.slow   # a second training run; same-seed determinism stays in the default suite
def test_other_seed_other_numbers(cache_dir, reference_run, tmp_path):
  cfg = small_config(cache_dir, steps=2, eval_every=2, warmup_steps=1)
  cfg.seed = 1
  other = train_lib.train(cfg, str(tmp_path / 'seed1'))
  first = read_metrics(reference_run[0])[0]
  assert read_metrics(str(tmp_path / 'seed1'))[0]['loss'] != first['loss']
  assert other['finished']


def test_gradient_accumulation_equals_full_batch():
  """With SGD(lr=1) the update is the gradient itself: 4 micro-batches equal the full batch."""
  import optax
  mc = ModelConfig(vocab_size=50, n_layers=2, d_model=32, n_heads=4, n_kv_heads=4, d_ff=64,
                   max_len=32)
  batch = jax.random.randint(jax.random.PRNGKey(0), (8, 17), 0, 50)
  results = []
  for accum in (1, 4):
    tc = train_lib.TrainConfig(steps=10, batch_size=8, seq_len=16, grad_accum=accum,
                               warmup_steps=0)
    params = model_lib.init_params(mc, jax.random.PRNGKey(1))
    opt = optax.sgd(1.0)
    state = {'params': params, 'opt_state': opt.init(params), 'step': jnp.zeros((), jnp.int32)}
    step = jax.jit(train_lib.make_train_step(mc, tc, opt, seed=0))
    state, m = step(state, batch)
    results.append((jax.tree.map(jnp.subtract, params, state['params']), m))
  (p1, m1), (p4, m4) = results
  assert abs(float(m1['loss']) - float(m4['loss'])) < 1e-6
  assert abs(float(m1['grad_norm']) - float(m4['grad_norm'])) < 1e-5
  for a, b in zip(jax.tree.leaves(p1), jax.tree.leaves(p4)):
    np.testing.assert_allclose(a, b, atol=1e-6)
  assert max(float(jnp.abs(g).max()) for g in jax.tree.leaves(p1)) > 1e-3  # not all ~zero


def test_cpu_micro_batches_equal_the_whole_batch(monkeypatch):
  """train.micro_batch_tokens splits a CPU step into micro-batches: AdamW's step over 4 of them
  equals the whole batch at once (micro_batch_tokens=0) to float rounding, whether they are
  computed one at a time (one core) or two side by side (two cores)."""
  mc = ModelConfig(vocab_size=50, n_layers=2, d_model=32, n_heads=4, n_kv_heads=4, d_ff=64,
                   max_len=32)
  batch = jax.random.randint(jax.random.PRNGKey(0), (8, 17), 0, 50)
  results = []
  for tokens, cores in ((0, 1), (32, 1), (32, 2)):
    monkeypatch.setattr(optim, 'host_cores', lambda: cores)
    tc = train_lib.TrainConfig(steps=10, batch_size=8, seq_len=16, warmup_steps=0,
                               micro_batch_tokens=tokens)
    A = optim.micro_batches(tc, 8)
    assert (A, optim.side_by_side(A)) == ((1, 1) if tokens == 0 else (4, cores))   # really split
    params = model_lib.init_params(mc, jax.random.PRNGKey(1))
    opt = train_lib.make_optimizer(tc, params)
    state = {'params': params, 'opt_state': opt.init(params), 'step': jnp.zeros((), jnp.int32)}
    step = jax.jit(train_lib.make_train_step(mc, tc, opt, seed=0))
    for _ in range(3):
      state, m = step(state, batch)
    results.append((state['params'], m))
  (p_whole, m_whole), (p_micro, m_micro), (p_pair, m_pair) = results
  assert abs(float(m_whole['loss']) - float(m_micro['loss'])) < 1e-5
  assert abs(float(m_whole['grad_norm']) - float(m_micro['grad_norm'])) < 1e-4
  for a, b in zip(jax.tree.leaves(p_whole), jax.tree.leaves(p_micro)):
    np.testing.assert_allclose(a, b, atol=2e-6)
  # Side by side, the micro-batch sums are added in the same order: equal to float rounding.
  assert abs(float(m_pair['loss']) - float(m_micro['loss'])) < 1e-6
  for a, b in zip(jax.tree.leaves(p_micro), jax.tree.leaves(p_pair)):
    np.testing.assert_allclose(a, b, atol=1e-6)


def test_micro_batch_rule():
  tc = lambda B, T, **kw: train_lib.TrainConfig(batch_size=B, seq_len=T, **kw)
  assert optim.micro_batches(tc(16, 128), 16) == 4                   # 4 rows = 512 tokens
  assert optim.micro_batches(tc(16, 256), 16) == 8                   # 2 rows
  assert optim.micro_batches(tc(8, 1024), 8) == 8                    # one row: the least there is
  assert optim.micro_batches(tc(6, 128), 6) == 2                     # a divisor of the rows
  assert optim.micro_batches(tc(16, 128, grad_accum=8), 16) == 8     # never fewer than grad_accum
  assert optim.micro_batches(tc(16, 128, grad_accum=2), 16) == 4     # a multiple of it
  assert optim.micro_batches(tc(16, 128), 16, shards=8) == 1         # 2 rows per shard fit
  assert optim.micro_batches(tc(32, 128), 32, shards=2) == 4         # 4 rows per shard
  assert optim.micro_batches(tc(16, 128), 16, platform='gpu') == 1   # accelerators: grad_accum
  assert optim.micro_batches(tc(16, 128, micro_batch_tokens=0), 16) == 1
  # Micro-batches side by side: the largest divisor within the cores per batch shard.
  assert optim.side_by_side(4, cores=2) == 2
  assert optim.side_by_side(4, cores=1) == 1                        # one core: one at a time
  assert optim.side_by_side(6, cores=4) == 3
  assert optim.side_by_side(8, shards=2, cores=2) == 1              # shards already fill the cores
  assert optim.side_by_side(8, shards=2, cores=8) == 4
  assert optim.side_by_side(1, cores=8) == 1
  assert optim.side_by_side(8, platform='gpu', cores=8) == 1


def lr_at(steps, **kw):
  tc = train_lib.TrainConfig(steps=steps, lr=1.0, **kw)
  s = optim.learning_rate_schedule(tc)
  return lambda i: float(s(i))


def test_schedules_at_their_corner_steps():
  cos = lr_at(100, warmup_steps=10, schedule='cosine', final_lr_fraction=0.1)
  assert cos(0) == pytest.approx(0.1)          # peak / warmup at the first step
  assert cos(9) == pytest.approx(1.0)          # peak at the end of warmup
  assert cos(10) == pytest.approx(1.0)
  assert cos(10 + 89 / 2) == pytest.approx(0.55, abs=1e-6)   # half way: (1 + 0.1) / 2
  assert cos(99) == pytest.approx(0.1)         # exactly final_lr_fraction at the last step
  wsd = lr_at(100, warmup_steps=10, schedule='wsd', decay_fraction=0.2, final_lr_fraction=0.0)
  assert wsd(10) == wsd(79) == pytest.approx(1.0)
  assert wsd(80) == pytest.approx(1.0) and wsd(99) == pytest.approx(0.0, abs=1e-7)
  const = lr_at(50, warmup_steps=0, schedule='constant')
  assert const(0) == const(49) == 1.0
  nowarm = lr_at(20, warmup_steps=0, final_lr_fraction=0.1)
  assert nowarm(0) == pytest.approx(1.0) and nowarm(19) == pytest.approx(0.1)


def test_weight_decay_mask():
  mc = ModelConfig(vocab_size=50, n_layers=1, d_model=16, n_heads=2, n_kv_heads=2, d_ff=32,
                   max_len=8, use_bias=True, norm='layernorm', tie_embeddings=False)
  mask = optim.decay_mask(model_lib.param_shapes(mc), decay_embeddings=False)
  assert mask['embed'] is False and mask['head'] is True
  layer = mask['layer_0']
  assert layer['attn']['wq'] and layer['mlp']['wi'] and layer['attn']['wo']
  assert not layer['attn']['wq_bias'] and not layer['norm1']['scale'] and not layer['mlp']['bi']
  assert optim.decay_mask(model_lib.param_shapes(mc), True)['embed'] is True


def test_flops_against_hand_count():
  mc = ModelConfig(vocab_size=100, n_layers=2, d_model=64, n_heads=4, n_kv_heads=4, d_ff=256,
                   max_len=128)
  T = 128
  t = flops_lib.chinchilla_forward_flops(mc, T)
  # Per layer: qkv 2*T*3*D*D, logits 2*T*T*D, softmax 3*H*T*T, values 2*T*T*D, out 2*T*D*D,
  # mlp 2*T*2*D*F; plus embeddings and logits 2*T*V*D each.
  D, F, V, H = 64, 256, 100, 4
  layer = (2 * T * 3 * D * D + 2 * T * T * D + 3 * H * T * T + 2 * T * T * D + 2 * T * D * D
           + 2 * T * 2 * D * F)
  assert t['total'] == 2 * layer + 2 * (2 * T * V * D)
  per_token = flops_lib.flops_per_token(mc, T, 1000)
  assert per_token['chinchilla'] == 3 * t['total'] / T and per_token['6n'] == 6000


def test_profile_steps_write_a_trace_and_change_nothing(reference_run, cache_dir, tmp_path):
  workdir = str(tmp_path / 'profiled')
  train_lib.train(small_config(cache_dir, profile_steps='3:5'), workdir)
  traces = glob.glob(f'{workdir}/profile/plugins/profile/*/*.xplane.pb')
  assert len(traces) == 1 and os.path.getsize(traces[0]) > 0
  ref = [r['loss'] for r in read_metrics(reference_run[0])]
  assert [r['loss'] for r in read_metrics(workdir)] == ref
  for bad in ('5:3', '3', '0:13', 'a:b'):
    with pytest.raises(UserError, match="train.profile_steps=.* must be 'A:B'"):
      train_lib.TrainConfig(steps=12, warmup_steps=2, profile_steps=bad)


def test_adam_stored_as_float32_is_optax_adam():
  """The moment-dtype transformation in float32 is optax's Adam to float32 noise."""
  import optax
  params = {'w': jnp.linspace(-1.0, 1.0, 12).reshape(3, 4), 'b': jnp.ones((4,))}
  mine = optim.scale_by_adam_stored_as(0.9, 0.99, 1e-8, jnp.float32)
  ref = optax.scale_by_adam(0.9, 0.99, 1e-8)
  sm, sr = mine.init(params), ref.init(params)
  for i in range(5):
    g = jax.tree.map(lambda p: jnp.sin(p * (i + 1)), params)
    um, sm = mine.update(g, sm, params)
    ur, sr = ref.update(g, sr, params)
    for a, b in zip(jax.tree.leaves(um), jax.tree.leaves(ur)):
      np.testing.assert_allclose(a, b, rtol=1e-6, atol=1e-7)


def test_bfloat16_moments_halve_the_state_and_train_like_float32(reference_run, cache_dir,
                                                                  tmp_path):
  workdir = str(tmp_path / 'bf16')
  train_lib.train(small_config(cache_dir, opt_dtype='bfloat16'), workdir)
  ref = read_metrics(reference_run[0])
  got = read_metrics(workdir)
  ref_eval = [r['eval_loss'] for r in ref if 'eval_loss' in r]
  got_eval = [r['eval_loss'] for r in got if 'eval_loss' in r]
  assert got_eval != ref_eval                                     # the moments did differ
  np.testing.assert_allclose(got_eval, ref_eval, rtol=0.01)      # ... and training did not
  mc = ModelConfig(vocab_size=263, n_layers=2, d_model=64, n_heads=4, max_len=64)
  shapes = model_lib.param_shapes(mc)
  nbytes = lambda t: sum(x.size * x.dtype.itemsize for x in jax.tree.leaves(t))
  states = {d: jax.eval_shape(train_lib.make_optimizer(
      train_lib.TrainConfig(steps=10, warmup_steps=1, opt_dtype=d), shapes).init, shapes)
      for d in ('float32', 'bfloat16')}
  moments = 2 * nbytes(shapes)                                    # mu and nu in float32
  assert nbytes(states['float32']) - nbytes(states['bfloat16']) == moments // 2


def test_attention_implementation_choice():
  choose = attention_lib.choose_implementation
  assert choose('auto', 'bfloat16', 'gpu', 64, 'rope')[0] == 'cudnn'
  assert choose('auto', 'float16', 'gpu', 128, 'learned')[0] == 'cudnn'
  for args in (('float32', 'gpu', 64, 'rope'), ('bfloat16', 'cpu', 64, 'rope'),
               ('bfloat16', 'gpu', 12, 'rope'), ('bfloat16', 'gpu', 256, 'rope'),
               ('bfloat16', 'gpu', 64, 'alibi'), ('bfloat16', 'tpu', 64, 'rope')):
    impl, why = choose('auto', *args)
    assert impl == 'xla' and why.startswith('auto: cuDNN not used because'), args
  assert choose('xla', 'bfloat16', 'gpu', 64, 'rope')[0] == 'xla'
  with pytest.raises(UserError, match=r'cudnn cannot run: it needs a GPU \(this is cpu\); it '
                     r'needs model.dtype bfloat16 or float16 \(not float32\)\. Use auto'):
    choose('cudnn', 'float32', 'cpu', 64, 'rope')


def test_an_impossible_attention_choice_is_refused_before_the_data(tmp_path):
  cfg = small_config(str(tmp_path / 'never_built'))
  cfg.model.attention_impl = 'cudnn'
  with pytest.raises(UserError, match='model.attention_impl=cudnn cannot run'):
    train_lib.build(cfg)
  assert not os.path.exists(tmp_path / 'never_built')            # no data was prepared


def test_manifest_records_the_attention_used(reference_run):
  m = json.load(open(os.path.join(reference_run[0], 'manifest.json')))
  assert m['attention']['requested'] == 'auto' and m['attention']['used'] == 'xla'
  assert 'needs a GPU' in m['attention']['why']


@pytest.mark.skipif(jax.default_backend() != 'gpu', reason='needs a GPU')
def test_auto_lowers_to_cudnn_on_a_gpu():
  mc = ModelConfig(vocab_size=256, n_layers=1, d_model=128, n_heads=2, n_kv_heads=2,
                   max_len=128, dtype='bfloat16', attention_impl='cudnn')
  params = model_lib.init_params(mc, jax.random.PRNGKey(0))
  hlo = jax.jit(lambda p, x: model_lib.apply(mc, p, x)).lower(
      params, jnp.zeros((2, 128), jnp.int32)).as_text()
  assert 'cudnn' in hlo.lower()


def test_model_flops_and_mfu_against_hand_count():
  mc = ModelConfig(vocab_size=100, n_layers=2, d_model=64, n_heads=4, n_kv_heads=4, d_ff=256,
                   max_len=128)
  n = flops_lib.param_counts(model_lib.param_shapes(mc))
  # PaLM App. B: 6 N_nonembed + 12 L H Q T; causal attention counts half of the attention term.
  full = 6 * n['nonembed'] + 12 * 2 * 4 * 16 * 128
  assert flops_lib.model_flops_per_token(mc, 128, n['nonembed'], causal=False) == full
  causal = 6 * n['nonembed'] + 6 * 2 * 64 * 128
  assert flops_lib.flops_per_token(mc, 128, n['total'], n['nonembed'])['model'] == causal
  # MFU: tokens/s x model FLOPs per token over the peak, e.g. 100K tokens/s on an H100 in bf16.
  peak = flops_lib.peak_flops('NVIDIA H100 80GB HBM3', 'bfloat16')
  assert peak == 989e12 and 1e5 * causal / peak == pytest.approx(1e5 * causal / 989e12)


def test_device_names_match_exactly():
  assert flops_lib.peak_flops('NVIDIA L4', 'bfloat16') == 121e12
  assert flops_lib.peak_flops('NVIDIA L40S', 'bfloat16') == 362e12      # not the L4's
  assert flops_lib.peak_flops('NVIDIA A100-SXM4-80GB', 'float32') == 19.5e12
  assert flops_lib.peak_flops('TPU v5 lite', 'bfloat16') == 197e12
  assert flops_lib.peak_flops('NVIDIA H100 80GB HBM3 (made up)', 'bfloat16') == 0.0
  assert flops_lib.peak_flops('made up', 'bfloat16', override=5e12) == 5e12
  note = flops_lib.unknown_device_note('NVIDIA B300', 'gpu')
  assert note.startswith("unknown device 'NVIDIA B300'") and 'train.peak_flops' in note
  assert flops_lib.unknown_device_note('cpu', 'cpu') is None
  assert flops_lib.unknown_device_note('TPU v4', 'tpu') is None


def test_flops_close_to_xla_cost_analysis():
  """The matmul terms of App. F (x3 for training) are within a few % of XLA's count of the step.

  XLA counts the embedding lookup as a gather (no FLOPs) and the softmax as several elementwise
  ops, so those two terms are left out of the comparison; elementwise work (norms, GELU, AdamW)
  is the few % that remain.
  """
  mc = ModelConfig(vocab_size=512, n_layers=2, d_model=256, n_heads=4, n_kv_heads=4,
                   d_ff=1024, max_len=128)
  tc = train_lib.TrainConfig(steps=10, batch_size=4, seq_len=128, warmup_steps=0)
  params = model_lib.param_shapes(mc)
  opt = train_lib.make_optimizer(tc, params)
  state = jax.eval_shape(lambda p: {'params': p, 'opt_state': opt.init(p),
                                    'step': jnp.zeros((), jnp.int32)}, params)
  batch = jax.ShapeDtypeStruct((4, 129), jnp.int32)
  compiled = jax.jit(train_lib.make_train_step(mc, tc, opt, 0)).lower(state, batch).compile()
  cost = compiled.cost_analysis()
  xla = (cost[0] if isinstance(cost, (list, tuple)) else cost)['flops']
  t = flops_lib.chinchilla_forward_flops(mc, 128)
  ours = 4 * 3 * (t['total'] - t['embeddings'] - t['attention_softmax'])
  assert abs(xla / ours - 1) < 0.05, (xla, ours)


@pytest.mark.parametrize('path', sorted(glob.glob(os.path.join(REPO, 'configs', '*.py'))))
def test_every_config_file_builds(path):
  name = os.path.basename(path)[:-3]
  if name == '__init__':
    return
  cfg = importlib.import_module(f'configs.{name}').get_config()
  if 'pipeline' in cfg:    # every stage's section is a config of its own
    from lm import pipeline
    configs = pipeline.stage_configs(cfg, '/tmp/any')
    assert list(configs) == ['pretrain', 'sft', 'reward', 'ppo', 'grpo', 'dpo']
    for section in configs.values():
      _check_config(section)
    _check_config(ml_collections.ConfigDict({'eval': cfg.eval}))
    return
  _check_config(cfg)


def _check_config(cfg):
  if 'eval' in cfg:        # run.py eval: the tasks it names exist
    from lm.eval import tasks
    if cfg.eval.tasks != 'auto':
      tasks.resolve(cfg.eval.tasks)
    assert cfg.eval.format in ('auto',) + tasks.FORMATS
    return
  if 'finetune' in cfg:    # fine-tuning configs take their model from the base run
    from lm.stages import finetune as finetune_lib
    cfg.finetune.init_from = 'runs/any'
    finetune_lib.FinetuneConfig.from_config(cfg)
    train_lib.TrainConfig.from_config(cfg.train)
    return
  if any(k in cfg for k in ('reward', 'dpo', 'ppo', 'grpo')):   # model from the SFT run
    from lm.align import common, dpo, grpo, ppo, reward
    for section in ('reward', 'dpo', 'ppo', 'grpo'):
      if section in cfg:
        for key in ('init_from', 'reward_from', 'pairs'):
          if key in cfg[section]:
            cfg[section][key] = 'runs/any'
    if 'reward' in cfg:
      reward.RewardConfig.from_config(cfg.reward)
    if 'dpo' in cfg:
      dpo.DpoConfig.from_config(cfg.dpo)
    if 'ppo' in cfg:
      ppo.PpoConfig.from_config(cfg.ppo, cfg.train.batch_size)
    if 'grpo' in cfg:
      if cfg.grpo.reward != 'model':
        cfg.grpo.reward_from = ''
      grpo.GrpoConfig.from_config(cfg.grpo, cfg.train.batch_size)
    common.PolicyLora.from_config(cfg)
    train_lib.TrainConfig.from_config(cfg.train)
    return
  if 'model' not in cfg:   # sweep configs carry their base under `base`
    cfg = cfg.base
  mc = ModelConfig.from_config(cfg.model, 259)
  small = ModelConfig.from_config(
      dict(cfg.model, d_model=32, n_layers=min(mc.n_layers, 2), d_ff=0,
           n_heads=4 if mc.n_heads % 4 == 0 else 2,
           n_kv_heads=min(mc.n_kv_heads, 2) if cfg.model.n_kv_heads else 0), 259)
  train_lib.TrainConfig.from_config(cfg.train)
  tokens = jnp.zeros((1, 8), jnp.int32)
  logits = model_lib.apply(small, model_lib.init_params(small, jax.random.PRNGKey(0)), tokens)
  assert logits.shape == (1, 8, small.vocab_size)
  # The full-size shape is valid too (no allocation: shapes only).
  assert flops_lib.param_counts(model_lib.param_shapes(mc))['total'] > 0


@pytest.mark.parametrize('key,value,needle', [
    ('steps', 0, 'train.steps=0'),
    ('batch_size', -4, 'train.batch_size=-4'),
    ('lr', 0.0, 'train.lr=0.0'),
    ('grad_accum', 3, 'grad_accum=3 does not divide'),
    ('micro_batch_tokens', -1, 'micro_batch_tokens=-1'),
    ('schedule', 'linear', "schedule='linear'"),
    ('warmup_steps', 500, 'warmup_steps=500'),
])
def test_bad_train_values(key, value, needle):
  c = base.get_config()
  c.train[key] = value
  with pytest.raises(UserError, match=needle.replace('(', r'\(')):
    train_lib.TrainConfig.from_config(c.train)


def test_seq_len_beyond_max_len(cache_dir, tmp_path):
  cfg = small_config(cache_dir, seq_len=128)
  with pytest.raises(UserError, match='train.seq_len=128 is longer than model.max_len=64'):
    train_lib.train(cfg, str(tmp_path / 'x'))


def test_incompatible_workdir_is_refused_and_left_alone(cache_dir, reference_run, tmp_path):
  workdir = str(tmp_path / 'copy')
  shutil.copytree(reference_run[0], workdir)
  before = {p: os.path.getmtime(p) for p in glob.glob(f'{workdir}/**', recursive=True)}
  cfg = small_config(cache_dir)
  cfg.model.d_model = 64
  with pytest.raises(UserError, match=r'model.d_model \(32 -> 64\)'):
    train_lib.train(cfg, workdir)
  after = {p: os.path.getmtime(p) for p in glob.glob(f'{workdir}/**', recursive=True)}
  assert before == after


def test_corrupt_latest_checkpoint_falls_back(cache_dir, reference_run, tmp_path, capsys):
  workdir = str(tmp_path / 'corrupt')
  shutil.copytree(reference_run[0], workdir)
  os.remove(os.path.join(workdir, 'summary.json'))
  # Damage every data file of the newest checkpoint (step 12).
  for f in glob.glob(f'{workdir}/checkpoints/12/**/*', recursive=True):
    if os.path.isfile(f) and not f.endswith('.json'):
      with open(f, 'wb') as fh:
        fh.write(b'garbage')
  shutil.rmtree(f'{workdir}/checkpoints/12/state/_METADATA', ignore_errors=True)
  summary = train_lib.train(small_config(cache_dir), workdir)
  assert 'falling back' in capsys.readouterr().out
  assert summary['finished'] and summary['steps'] == 12
  for a, b in zip(jax.tree.leaves(final_params(reference_run[0])),
                  jax.tree.leaves(final_params(workdir))):
    np.testing.assert_array_equal(a, b)


def test_nan_loss_stops_with_the_step_and_keeps_the_checkpoint(cache_dir, tmp_path):
  workdir = str(tmp_path / 'nan')
  cfg = small_config(cache_dir, lr=1e30, grad_clip=0.0, warmup_steps=0, steps=12)
  with pytest.raises(UserError, match=r'The loss became (nan|inf) at step \d+'):
    train_lib.train(cfg, workdir)
  assert not os.path.exists(os.path.join(workdir, 'summary.json'))


def test_sigterm_saves_and_stops_cleanly(cache_dir, reference_run, tmp_path, monkeypatch):
  """SIGTERM mid-run: the loop checkpoints at the next step and returns; a rerun finishes it."""
  import signal
  workdir = str(tmp_path / 'term')
  real_get_batch = train_lib.get_batch

  def get_batch(run, split, index):
    if split == 'train' and index == 3:
      signal.raise_signal(signal.SIGTERM)
    return real_get_batch(run, split, index)
  monkeypatch.setattr(train_lib, 'get_batch', get_batch)
  cfg = small_config(cache_dir)
  partial = train_lib.train(cfg, workdir)
  assert partial['finished'] is False and partial['steps'] == 4
  assert os.listdir(f'{workdir}/checkpoints') == ['4']
  monkeypatch.setattr(train_lib, 'get_batch', real_get_batch)
  resumed = train_lib.train(cfg, workdir)
  assert resumed['final_loss'] == reference_run[1]['final_loss']


def test_a_config_written_before_a_key_existed_still_resumes():
  from lm.training import loop
  new = base.get_config().to_dict()
  old = json.loads(json.dumps(new))
  del old['train']['init_from'], old['data']['tokenizer_path']
  assert loop.config_changes(old, new) == []
  new['train']['init_from'] = 'runs/other'
  assert loop.config_changes(old, new) == [('train.init_from', None, 'runs/other')]
  with pytest.raises(UserError, match='different config'):
    loop.check_resumable(old, new)


def test_bfloat16_params_halve_the_weights_and_still_train(reference_run, cache_dir, tmp_path):
  """model.param_dtype=bfloat16 stores the weights in bfloat16 (float32 moments beside them
  unless train.opt_dtype says otherwise); 12 tiny steps stay close to float32's losses."""
  cfg = small_config(cache_dir)
  cfg.model.param_dtype = 'bfloat16'
  workdir = str(tmp_path / 'bf16p')
  train_lib.train(cfg, workdir)
  params = final_params(workdir)
  assert {x.dtype for x in jax.tree.leaves(params)} == {jnp.dtype('bfloat16')}
  ref_eval = [r['eval_loss'] for r in read_metrics(reference_run[0]) if 'eval_loss' in r]
  got_eval = [r['eval_loss'] for r in read_metrics(workdir) if 'eval_loss' in r]
  assert got_eval != ref_eval
  np.testing.assert_allclose(got_eval, ref_eval, rtol=0.02)
  mc = ModelConfig(vocab_size=263, n_layers=2, d_model=64, n_heads=4, max_len=64,
                   param_dtype='bfloat16')
  shapes = model_lib.param_shapes(mc)
  state = jax.eval_shape(train_lib.make_optimizer(
      train_lib.TrainConfig(steps=10, warmup_steps=1), shapes).init, shapes)
  assert {x.dtype for x in jax.tree.leaves(state) if x.ndim} == {jnp.dtype('float32')}


KILL_DURING_SAVE = r'''
import json, os, signal, sys, threading, time
import ml_collections
from lm.stages import pretrain as train_lib
cfg = ml_collections.ConfigDict(json.loads(sys.argv[1]))
ckdir = os.path.join(sys.argv[2], 'checkpoints')

def watch():   # SIGKILL the moment a save after the first ones is being written
  while True:
    names = os.listdir(ckdir) if os.path.isdir(ckdir) else []
    if any('.orbax-checkpoint-tmp' in n and int(n.split('.')[0]) >= 6 for n in names):
      os.kill(os.getpid(), signal.SIGKILL)
    time.sleep(0.0002)
threading.Thread(target=watch, daemon=True).start()
train_lib.train(cfg, sys.argv[2])
'''


def test_sigkill_during_an_async_save_keeps_the_previous_checkpoint(reference_run, cache_dir,
                                                                    tmp_path):
  """Killed with SIGKILL (no handler runs) while the background thread writes a checkpoint: only
  complete steps count as checkpoints, the newest of them restores, and the resumed run ends on
  the uninterrupted run's losses."""
  import subprocess
  import sys
  cfg = small_config(cache_dir, checkpoint_every=2, keep_checkpoints=10)
  workdir = str(tmp_path / 'killed')
  repo = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
  proc = subprocess.run([sys.executable, '-c', KILL_DURING_SAVE, cfg.to_json(), workdir],
                        cwd=repo, env=dict(os.environ, PYTHONPATH=repo), capture_output=True,
                        text=True, timeout=300)
  assert proc.returncode == -9, proc.stdout[-2000:] + proc.stderr[-2000:]
  names = os.listdir(os.path.join(workdir, 'checkpoints'))
  partial = [n for n in names if '.orbax-checkpoint-tmp' in n]
  assert partial, names                                   # it died in the middle of a save
  killed_at = int(partial[0].split('.')[0])
  ckpts = ckpt_lib.Checkpoints(os.path.join(workdir, 'checkpoints'), 10)
  complete = ckpts.steps()
  ckpts.close()
  assert complete and max(complete) == killed_at - 2      # the previous save, whole
  assert not os.path.exists(os.path.join(workdir, 'summary.json'))
  summary = train_lib.train(cfg, workdir)
  assert summary['finished']
  ref = [r['eval_loss'] for r in read_metrics(reference_run[0]) if 'eval_loss' in r]
  got = [r['eval_loss'] for r in read_metrics(workdir) if 'eval_loss' in r]
  np.testing.assert_allclose(got, ref, rtol=1e-6)
