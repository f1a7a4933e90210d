"""The transformer: shapes, causality, positional encodings, GQA, remat/scan, counts, validation."""
import itertools
import math

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from lm.model import flops, transformer as model
from lm.model.attention import alibi_slopes, apply_rope, sinusoidal_table
from lm.config import ModelConfig
from lm.errors import UserError

V = 37


def tiny(**kw) -> ModelConfig:
  base = dict(vocab_size=V, n_layers=2, d_model=16, n_heads=4, n_kv_heads=4, d_ff=32, max_len=32)
  base.update(kw)
  return ModelConfig(**base)


def tokens(b=2, t=12, seed=1):
  return jax.random.randint(jax.random.PRNGKey(seed), (b, t), 0, V)


@pytest.mark.parametrize('pos,norm,mlp,block', list(itertools.product(
    ('learned', 'sinusoidal', 'rope', 'alibi', 'none'), ('layernorm', 'rmsnorm'),
    ('gelu', 'swiglu'), ('prenorm', 'postnorm'))))
def test_every_combination_runs(pos, norm, mlp, block):
  cfg = tiny(n_layers=1, pos=pos, norm=norm, mlp=mlp, block=block)
  params = model.init_params(cfg, jax.random.PRNGKey(0))
  logits = model.apply(cfg, params, tokens())
  assert logits.shape == (2, 12, V) and logits.dtype == jnp.float32
  assert bool(jnp.all(jnp.isfinite(logits)))


@pytest.mark.parametrize('pos', ('learned', 'sinusoidal', 'rope', 'alibi', 'none'))
def test_causality(pos):
  """Changing token t changes no logit before t, and does change the logits at t."""
  cfg = tiny(pos=pos)
  params = model.init_params(cfg, jax.random.PRNGKey(0))
  x = tokens(b=1, t=10)
  t = 6
  y = x.at[0, t].set((x[0, t] + 1) % V)
  a, b = model.apply(cfg, params, x), model.apply(cfg, params, y)
  np.testing.assert_array_equal(np.asarray(a[:, :t]), np.asarray(b[:, :t]))
  assert float(jnp.abs(a[:, t:] - b[:, t:]).max()) > 1e-6


def test_rope_scores_depend_only_on_relative_position():
  k1, k2 = jax.random.split(jax.random.PRNGKey(0))
  q = jax.random.normal(k1, (1, 6, 2, 8))
  k = jax.random.normal(k2, (1, 6, 2, 8))
  pos = jnp.arange(6)[None]

  def scores(shift):
    qr, kr = apply_rope(q, pos + shift, 10000.0), apply_rope(k, pos + shift, 10000.0)
    return jnp.einsum('btnh,bsnh->bnts', qr, kr)
  np.testing.assert_allclose(scores(0), scores(37), atol=1e-4)
  np.testing.assert_allclose(scores(0), scores(1000), atol=1e-3)
  # ...and the rotation does change the scores (it is not the identity).
  assert float(jnp.abs(scores(0) - jnp.einsum('btnh,bsnh->bnts', q, k)).max()) > 1e-2


def test_sinusoidal_matches_formula():
  d, positions = 8, np.arange(5)
  table = np.asarray(sinusoidal_table(jnp.asarray(positions), d))
  for p in positions:
    for i in range(d // 2):
      angle = p / 10000 ** (2 * i / d)
      assert table[p, 2 * i] == pytest.approx(math.sin(angle), abs=1e-5)
      assert table[p, 2 * i + 1] == pytest.approx(math.cos(angle), abs=1e-5)


def test_alibi_bias_is_one_array_for_the_batch_in_training():
  from lm.model.attention import alibi_bias
  slots = jnp.arange(5)[None]
  bias = alibi_bias(4, slots, slots)
  assert bias.shape == (1, 4, 5, 5) and bias.dtype == jnp.float32
  m = alibi_slopes(4)
  np.testing.assert_allclose(bias[0, 1, 4, 1], -m[1] * 3, rtol=1e-6)
  np.testing.assert_allclose(bias[0, :, 2, 2], 0.0)
  # Decoding: each row at its own position against its own keys.
  rows = alibi_bias(4, jnp.array([[7], [3]]), jnp.array([[0, 5, 7], [0, 1, 3]]))
  assert rows.shape == (2, 4, 1, 3)
  np.testing.assert_allclose(rows[1, 0, 0], -m[0] * np.array([3, 2, 0]), rtol=1e-6)


def test_alibi_slopes_follow_the_paper():
  np.testing.assert_allclose(alibi_slopes(8), [2 ** -(i + 1) for i in range(8)], rtol=1e-6)
  # 6 heads: the 4-head slopes, then every other slope of the 8-head sequence.
  expected = [2 ** -2, 2 ** -4, 2 ** -6, 2 ** -8, 2 ** -1, 2 ** -3]
  np.testing.assert_allclose(alibi_slopes(6), expected, rtol=1e-6)


def test_positional_variants_are_different_functions():
  """With identical weights, alibi, sinusoidal, rope and none give different logits."""
  x = tokens()
  params = model.init_params(tiny(pos='none'), jax.random.PRNGKey(0))
  outs = {p: model.apply(tiny(pos=p), params, x) for p in ('none', 'alibi', 'sinusoidal', 'rope')}
  learned = tiny(pos='learned')
  lp = dict(params, pos_embed=model.init_params(learned, jax.random.PRNGKey(0))['pos_embed'])
  outs['learned'] = model.apply(learned, lp, x)
  for a, b in itertools.combinations(outs, 2):
    assert float(jnp.abs(outs[a] - outs[b]).max()) > 1e-4, (a, b)


def test_initial_loss_is_log_vocab():
  cfg = tiny(vocab_size=256, d_model=32)
  params = model.init_params(cfg, jax.random.PRNGKey(0))
  x = jax.random.randint(jax.random.PRNGKey(3), (8, 33), 0, 256)
  logits = model.apply(cfg, params, x[:, :-1])
  loss = optax.softmax_cross_entropy_with_integer_labels(logits, x[:, 1:]).mean()
  assert abs(float(loss) - math.log(256)) < 0.05


def _reference_attention(cfg, p, x_BTD, positions):
  """Plain multi-head attention written out: n_heads separate k/v heads, explicit softmax."""
  q = jnp.einsum('btd,dnh->btnh', x_BTD, p['wq'])
  rep = cfg.n_heads // cfg.n_kv_heads
  k = jnp.repeat(jnp.einsum('btd,dnh->btnh', x_BTD, p['wk']), rep, axis=2)
  v = jnp.repeat(jnp.einsum('btd,dnh->btnh', x_BTD, p['wv']), rep, axis=2)
  q, k = apply_rope(q, positions, cfg.rope_base), apply_rope(k, positions, cfg.rope_base)
  s = jnp.einsum('btnh,bsnh->bnts', q, k) / math.sqrt(cfg.head_dim)
  T = x_BTD.shape[1]
  s = jnp.where(jnp.tril(jnp.ones((T, T), bool)), s, -jnp.inf)
  o = jnp.einsum('bnts,bsnh->btnh', jax.nn.softmax(s, -1), v)
  return jnp.einsum('btnh,nhd->btd', o, p['wo'])


@pytest.mark.parametrize('n_kv', (4, 2, 1))
def test_grouped_query_attention_matches_plain_multi_head(n_kv):
  """GQA equals multi-head attention whose k/v heads repeat the shared ones (n_kv=4: plain MHA)."""
  from lm.model.attention import Attention
  cfg = tiny(n_kv_heads=n_kv)
  x = jax.random.normal(jax.random.PRNGKey(0), (2, 9, 16))
  pos = jnp.broadcast_to(jnp.arange(9), (2, 9))
  variables = Attention(cfg).init(jax.random.PRNGKey(1), x, pos)
  p = jax.tree.map(lambda b: getattr(b, 'value', b), variables['params'],
                   is_leaf=lambda b: hasattr(b, 'value'))
  out, _ = Attention(cfg).apply({'params': p}, x, pos)
  np.testing.assert_allclose(out, _reference_attention(cfg, p, x, pos), atol=1e-5)


def _stack_layers(params, n_layers):
  """Per-layer params {'layer_i': ...} -> the scanned layout {'layers': stacked}."""
  out = {k: v for k, v in params.items() if not k.startswith('layer_')}
  out['layers'] = jax.tree.map(lambda *xs: jnp.stack(xs),
                               *[params[f'layer_{i}'] for i in range(n_layers)])
  return out


def _loss_and_grads(cfg, params, x):
  def loss(p):
    logits = model.apply(cfg, p, x[:, :-1])
    return optax.softmax_cross_entropy_with_integer_labels(logits, x[:, 1:]).mean()
  return jax.jit(jax.value_and_grad(loss))(params)


def test_scan_equals_loop():
  loop_cfg = tiny(n_layers=3)
  scan_cfg = tiny(n_layers=3, scan_layers=True)
  params = model.init_params(loop_cfg, jax.random.PRNGKey(0))
  stacked = _stack_layers(params, 3)
  # The flag really changes the program: the scanned model's params are stacked.
  assert 'layers' in model.init_params(scan_cfg, jax.random.PRNGKey(0))
  assert jax.tree.structure(stacked) == jax.tree.structure(
      model.init_params(scan_cfg, jax.random.PRNGKey(0)))
  x = tokens(t=13)
  l1, g1 = _loss_and_grads(loop_cfg, params, x)
  l2, g2 = _loss_and_grads(scan_cfg, stacked, x)
  assert abs(float(l1) - float(l2)) < 1e-5
  for a, b in zip(jax.tree.leaves(_stack_layers(g1, 3)), jax.tree.leaves(g2)):
    np.testing.assert_allclose(a, b, atol=1e-5)


@pytest.mark.parametrize('scan', (False, True))
def test_remat_equals_no_remat(scan):
  plain, rem = tiny(scan_layers=scan), tiny(scan_layers=scan, remat=True)
  params = model.init_params(plain, jax.random.PRNGKey(0))
  x = tokens(t=13)

  def jaxpr_text(cfg):
    return str(jax.make_jaxpr(lambda p: _loss_and_grads(cfg, p, x))(params))
  # The flag really changes the program: a checkpoint (remat) primitive appears.
  assert 'remat' not in jaxpr_text(plain) and 'checkpoint' not in jaxpr_text(plain)
  assert 'remat' in jaxpr_text(rem) or 'checkpoint' in jaxpr_text(rem)
  l1, g1 = _loss_and_grads(plain, params, x)
  l2, g2 = _loss_and_grads(rem, params, x)
  assert abs(float(l1) - float(l2)) < 1e-6
  for a, b in zip(jax.tree.leaves(g1), jax.tree.leaves(g2)):
    np.testing.assert_allclose(a, b, atol=1e-6)


def test_tiny_model_overfits_one_batch():
  cfg = tiny(d_model=32, d_ff=64)
  params = model.init_params(cfg, jax.random.PRNGKey(0))
  x = tokens(b=4, t=17, seed=5)
  opt = optax.adam(1e-2)
  state = opt.init(params)

  @jax.jit
  def step(params, state):
    loss, g = _loss_and_grads(cfg, params, x)
    updates, state = opt.update(g, state)
    return optax.apply_updates(params, updates), state, loss
  for _ in range(300):
    params, state, loss = step(params, state)
  assert float(loss) < 0.05


def test_bfloat16_compute_keeps_float32_params():
  cfg = tiny(dtype='bfloat16')
  params = model.init_params(cfg, jax.random.PRNGKey(0))
  assert all(p.dtype == jnp.float32 for p in jax.tree.leaves(params))
  logits = model.apply(cfg, params, tokens())
  assert logits.dtype == jnp.float32 and bool(jnp.all(jnp.isfinite(logits)))
  ref = model.apply(tiny(), params, tokens())
  assert float(jnp.abs(logits - ref).max()) < 0.1


def test_dropout_is_off_by_default_and_random_when_on():
  cfg = tiny(dropout=0.5)
  params = model.init_params(cfg, jax.random.PRNGKey(0))
  x = tokens()
  a = model.apply(cfg, params, x, deterministic=False, rngs={'dropout': jax.random.PRNGKey(1)})
  b = model.apply(cfg, params, x, deterministic=False, rngs={'dropout': jax.random.PRNGKey(2)})
  assert float(jnp.abs(a - b).max()) > 1e-3
  np.testing.assert_array_equal(model.apply(cfg, params, x), model.apply(cfg, params, x))


def test_parameter_counts_match_a_hand_count():
  # vocab 37, d 16, 2 layers, 4 heads of 4, 2 kv heads, d_ff 32, GELU, RMSNorm, no biases, tied.
  cfg = tiny(n_kv_heads=2)
  embed = 37 * 16                                    # 592 (tied: also the output head)
  attn = 16 * 16 + 2 * (16 * 2 * 4) + 16 * 16        # wq 256, wk+wv 256, wo 256 = 768
  mlp = 16 * 32 * 2                                  # wi, wo = 1024
  norms = 2 * 16                                     # two RMSNorm scales per layer
  per_layer = attn + mlp + norms                     # 1824
  total = embed + 2 * per_layer + 16                 # + final norm = 4256
  assert total == 4256
  counts = flops.param_counts(model.init_params(cfg, jax.random.PRNGKey(0)))
  assert counts == {'total': total, 'nonembed': total - embed}
  # Untied head and learned positions add vocab*d and max_len*d, both embedding-like.
  cfg2 = tiny(n_kv_heads=2, tie_embeddings=False, pos='learned')
  counts2 = flops.param_counts(model.param_shapes(cfg2))
  assert counts2 == {'total': 4256 + 37 * 16 + 32 * 16, 'nonembed': 4256 - 592}


def test_logical_axis_names_cover_every_param():
  cfg = tiny(tie_embeddings=False, pos='learned', use_bias=True, norm='layernorm',
             mlp='swiglu', scan_layers=True)
  specs = model.logical_specs(cfg)
  shapes = model.param_shapes(cfg)
  names = set()
  for spec, shape in zip(jax.tree.leaves(specs, is_leaf=lambda s: isinstance(s, tuple)),
                         jax.tree.leaves(shapes)):
    assert len(spec) == len(shape.shape) and None not in spec
    names.update(spec)
  assert names == {'vocab', 'embed', 'heads', 'kv_heads', 'head_dim', 'mlp', 'norm', 'pos',
                   'layers'}


@pytest.mark.parametrize('kw,needle', [
    (dict(d_model=18), 'not divisible by model.n_heads'),
    (dict(n_kv_heads=3), 'n_kv_heads=3 does not divide'),
    (dict(d_model=24, n_heads=8, n_kv_heads=8), 'even head dimension'),
    (dict(pos='xpos'), "model.pos='xpos' is not known"),
    (dict(norm='batchnorm'), 'model.norm'),
    (dict(mlp='relu'), 'model.mlp'),
    (dict(block='sandwich'), 'model.block'),
    (dict(max_len=0), 'model.max_len=0'),
    (dict(dropout=1.0), 'model.dropout'),
    (dict(dtype='float16'), 'model.dtype'),
])
def test_bad_model_config_is_one_clear_sentence(kw, needle):
  with pytest.raises(UserError, match=needle.replace('(', r'\(').replace("'", "'")):
    tiny(**kw)


@pytest.mark.parametrize('kw', [
    dict(), dict(pos='learned', tie_embeddings=False), dict(use_bias=True, norm='layernorm'),
    dict(mlp='swiglu', block='postnorm', n_kv_heads=1), dict(use_bias=True, mlp='swiglu'),
])
def test_parameter_count_from_config_equals_the_tree(kw):
  """Sweeps plan with the closed-form count; it must equal the count of the real params."""
  cfg = tiny(**kw)
  assert flops.param_counts_from_config(cfg) == flops.param_counts(model.param_shapes(cfg))


@pytest.mark.parametrize('n_kv,with_mask,with_bias', [(2, True, False), (1, False, True)])
def test_blocked_causal_attention_equals_full(n_kv, with_mask, with_bias):
  """Query blocks scored against their key prefix only: the same as full causal attention."""
  from lm.model.attention import blocked_attention, causal_mask, segment_mask
  B, T, N, H = 2, 64, 4, 8
  ks = jax.random.split(jax.random.PRNGKey(0), 4)
  q = jax.random.normal(ks[0], (B, T, N, H))
  k, v = (jax.random.normal(key, (B, T, n_kv, H)) for key in ks[1:3])
  seg = jnp.cumsum(jax.random.bernoulli(ks[3], 0.1, (B, T)), axis=1)
  mask = segment_mask(seg) if with_mask else None
  bias = (-0.1 * jnp.abs(jnp.arange(T)[:, None] - jnp.arange(T)[None, :]) *
          jnp.arange(1, N + 1)[:, None, None])[None] if with_bias else None
  full_mask = mask if mask is not None else causal_mask(jnp.arange(T), jnp.arange(T))
  want = jax.nn.dot_product_attention(q, k, v, bias=bias, mask=full_mask)
  got = jax.jit(blocked_attention, static_argnums=3)(q, k, v, 4, bias=bias, mask=mask)
  np.testing.assert_allclose(got, want, atol=2e-6)


@pytest.mark.parametrize('pos', ('rope', 'alibi'))
def test_blocked_attention_leaves_losses_and_gradients_unchanged(pos, monkeypatch):
  """The training loss and its gradients, with query blocks (T=128) and without, to fp32 noise."""
  from lm.model import attention
  cfg = tiny(pos=pos, max_len=128, n_kv_heads=2, n_layers=1)
  params = model.init_params(cfg, jax.random.PRNGKey(0))
  x = tokens(b=2, t=129)
  assert attention.causal_blocks(128) == 4 and attention.causal_blocks(64) == 1
  blocked = jax.jit(lambda p: _loss_and_grads(cfg, p, x))(params)
  monkeypatch.setattr(attention, 'causal_blocks', lambda T: 1)
  full = jax.jit(lambda p: _loss_and_grads(cfg, p, x))(params)   # a new function: traced again
  np.testing.assert_allclose(blocked[0], full[0], rtol=1e-6)
  for a, b in zip(jax.tree.leaves(blocked[1]), jax.tree.leaves(full[1])):
    np.testing.assert_allclose(a, b, atol=1e-6, rtol=1e-5)
