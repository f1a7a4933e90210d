"""Stability options: z-loss, QK-norm and the Muon optimizer, on hand numbers and in training
(bitwise resume with all three)."""
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from configs import base
from lm.config import ModelConfig
from lm.errors import UserError
from lm.interop import hf
from lm.model import attention
from lm.model import transformer as model_lib
from lm.stages import pretrain as train_lib
from lm.training import optim
from test_train import small_config, train_and_resume


def test_cross_entropy_and_z_on_hand_numbers():
  logits = jnp.array([[[0.0, np.log(3.0)], [2.0, 2.0]]])   # one row, two positions, V = 2
  targets = jnp.array([[1, 0]])
  ce, z = train_lib.cross_entropy_and_z(logits, targets)
  lse = np.array([np.log(4.0), 2.0 + np.log(2.0)])
  np.testing.assert_allclose(ce, np.mean([np.log(4.0) - np.log(3.0), np.log(2.0)]), rtol=1e-6)
  np.testing.assert_allclose(z, np.mean(lse ** 2), rtol=1e-6)
  # The cross-entropy part is optax's.
  np.testing.assert_allclose(
      ce, optax.softmax_cross_entropy_with_integer_labels(logits, targets).mean(), rtol=1e-6)


def test_head_rms_norm_on_hand_numbers():
  x = jnp.array([[3.0, 4.0], [0.0, 2.0]])
  out = attention.head_rms_norm(x, jnp.array([1.0, 0.5]), eps=0.0)
  rms = np.sqrt([(9 + 16) / 2, 4 / 2])
  np.testing.assert_allclose(out, [[3 / rms[0], 0.5 * 4 / rms[0]], [0.0, 0.5 * 2 / rms[1]]],
                             rtol=1e-6)


def test_qk_norm_bounds_the_attention_logits_and_is_not_exported():
  mc = ModelConfig(vocab_size=20, n_layers=1, d_model=16, n_heads=2, n_kv_heads=2, d_ff=32, max_len=8,
                   qk_norm=True)
  shapes = model_lib.param_shapes(mc)['layer_0']['attn']
  assert shapes['q_norm'].shape == shapes['k_norm'].shape == (8,)
  params = model_lib.init_params(mc, jax.random.PRNGKey(0))
  tokens = jnp.arange(8)[None] % 20
  base_logits = model_lib.apply(mc, params, tokens)
  # Scaling the query and key projections 100x changes nothing: the norms undo it.
  big = jax.tree_util.tree_map_with_path(
      lambda path, x: x * 100 if str(path[-1].key) in ('wq', 'wk') else x, params)
  np.testing.assert_allclose(model_lib.apply(mc, big, tokens), base_logits, atol=1e-4)
  with pytest.raises(UserError, match='qk_norm=True'):
    hf.family_of(mc)


def test_muon_routes_matrices_and_orthogonalises_their_update():
  mc = ModelConfig(vocab_size=20, n_layers=1, d_model=16, n_heads=2, n_kv_heads=2, d_ff=32, max_len=8,
                   mlp='swiglu')
  labels = optim.muon_labels(model_lib.param_shapes(mc))
  flat = {'/'.join(str(k.key) for k in path): v
          for path, v in jax.tree_util.tree_flatten_with_path(labels)[0]}
  assert {k for k, v in flat.items() if v == 'muon'} == {
      f'layer_0/{m}' for m in ('attn/wq', 'attn/wk', 'attn/wv', 'attn/wo', 'mlp/wi', 'mlp/wg',
                               'mlp/wo')}
  assert flat['embed'] == flat['final_norm/scale'] == flat['layer_0/norm1/scale'] == 'adam'
  # One step on a small tree: the matrix's update is lr x 0.2 x sqrt(8) x (about) the
  # orthogonal polar factor U V^T of its gradient; the embedding gets Adam's first step.
  tc = optim.TrainConfig(steps=10, lr=0.1, warmup_steps=0, schedule='constant',
                         weight_decay=0.0, grad_clip=0.0, optimizer='muon')
  g = np.random.default_rng(0).normal(size=(8, 4)).astype(np.float32)
  params = {'layer_0': {'mlp': {'wi': jnp.zeros((8, 4))}}, 'embed': jnp.zeros((3, 4))}
  grads = {'layer_0': {'mlp': {'wi': jnp.asarray(g)}}, 'embed': jnp.full((3, 4), 0.5)}
  opt = optim.make_optimizer(tc, params)
  updates, _ = opt.update(grads, opt.init(params), params)
  u = np.asarray(updates['layer_0']['mlp']['wi']) / (-0.1 * 0.2 * np.sqrt(8))
  U, _, Vt = np.linalg.svd(g, full_matrices=False)
  polar = U @ Vt
  cos = (u * polar).sum() / np.linalg.norm(u) / np.linalg.norm(polar)
  assert cos > 0.95
  assert np.all(np.abs(np.linalg.svd(u, compute_uv=False) - 1) < 0.35)   # Newton-Schulz's band
  np.testing.assert_allclose(updates['embed'], -0.1, rtol=1e-3)


@pytest.mark.parametrize('key,value,needle', [
    ('optimizer', 'sgd', "optimizer='sgd' is not known"),
    ('z_loss', -0.1, 'z_loss=-0.1'),
])
def test_bad_values(key, value, needle):
  c = base.get_config()
  c.train[key] = value
  with pytest.raises(UserError, match=needle):
    optim.TrainConfig.from_config(c.train)
  c = base.get_config()
  c.train.optimizer, c.train.opt_dtype = 'muon', 'bfloat16'
  with pytest.raises(UserError, match="with train.optimizer='muon' leave it 'float32'"):
    optim.TrainConfig.from_config(c.train)


def test_muon_z_loss_and_qk_norm_train_and_resume_bitwise(cache_dir, tmp_path):
  def config():
    cfg = small_config(cache_dir, optimizer='muon', z_loss=1e-3)
    cfg.model.qk_norm = True
    return cfg
  rows = train_and_resume(config, tmp_path)
  assert rows[-1]['loss'] < rows[0]['loss']
  assert all(0 < r['z_loss'] < r['loss'] for r in rows if 'z_loss' in r)
