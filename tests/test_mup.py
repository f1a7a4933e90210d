"""μP (lm/model/parametrization.py): init variances and per-layer rates on hand shapes, the
multipliers folded into a standard model with the same logits, μP at its base width equal to SP,
refusals, and a μP run that trains and resumes bitwise."""
import dataclasses
import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from configs import sweep_smoke
from lm.config import ModelConfig
from lm.errors import UserError
from lm.interop import hf
from lm.model import parametrization as mup
from lm.model import transformer as model_lib
from lm.scaling import plan as plan_lib
from lm.training import optim
from test_train import small_config, train_and_resume

WIDE = dict(vocab_size=64, n_layers=2, d_model=128, n_heads=4, d_ff=512, max_len=32,
            tie_embeddings=False, init_std=0.02)


@functools.partial(jax.jit, static_argnums=0)
def _init(mc, rng):
  return model_lib.init_params(mc, rng)


def init(mc):
  return _init(mc, jax.random.PRNGKey(0))


def leaf(params, *names):
  for n in names:
    params = params[n]
  return np.asarray(params)


def test_init_variances_on_hand_shapes():
  """m = 128 / 32 = 4: hidden matrices' std 0.02 / 2 (and / sqrt(2 L) = 2 more for the
  residual projections); embedding and head keep 0.02. SP keeps 0.02 everywhere."""
  sp = ModelConfig(**WIDE)
  mu = ModelConfig(**WIDE, parametrization='mup', mup_base_width=32)
  assert mup.width_mult(mu) == 4.0 and mup.logit_multiplier(mu) == 0.25
  for mc, hidden in ((sp, 0.02), (mu, 0.01)):
    p = init(mc)
    for names, want in ((('layer_0', 'attn', 'wq'), hidden), (('layer_1', 'mlp', 'wi'), hidden),
                        (('layer_0', 'attn', 'wo'), hidden / 2),
                        (('layer_1', 'mlp', 'wo'), hidden / 2),
                        (('embed',), 0.02), (('head',), 0.02)):
      np.testing.assert_allclose(leaf(p, *names).std(), want, rtol=0.05, err_msg=str(names))


def first_updates(mc, lr=0.01):
  """AdamW's first update (no decay, clipping or warmup) for a random gradient: each entry is
  lr x its leaf's rate factor in magnitude (Adam's first step is lr x sign(g))."""
  tc = optim.OptimizerConfig(steps=10, lr=lr, warmup_steps=0, weight_decay=0.0, grad_clip=0.0,
                             schedule='constant', eps=1e-12)
  params = init(mc)
  grads = jax.tree.map(lambda x: jax.random.normal(jax.random.PRNGKey(1), x.shape), params)
  opt = optim.make_optimizer(tc, params, model=mc)
  updates, _ = jax.jit(opt.update)(grads, opt.init(params), params)
  return params, updates


def test_per_layer_rates_on_hand_shapes():
  mc = ModelConfig(**WIDE, parametrization='mup', mup_base_width=32)
  scales = mup.lr_scales(mc, init(mc))
  assert scales['layer_0']['attn']['wk'] == 0.25 and scales['layer_1']['mlp']['wo'] == 0.25
  assert scales['embed'] == scales['head'] == scales['layer_0']['norm1']['scale'] == 1.0
  _, updates = first_updates(mc)
  for names, want in ((('layer_0', 'attn', 'wv'), 0.0025), (('layer_1', 'mlp', 'wi'), 0.0025),
                      (('embed',), 0.01), (('head',), 0.01), (('final_norm', 'scale'), 0.01)):
    np.testing.assert_allclose(np.abs(leaf(updates, *names)), want, rtol=1e-4,
                               err_msg=str(names))
  # A wrapped tree (a reward model's trunk) is matched by the end of each path.
  wrapped = mup.lr_scales(mc, {'trunk': {'layers': {'attn': {'wq': 0}}}, 'head': {'w': 0}})
  assert wrapped == {'trunk': {'layers': {'attn': {'wq': 0.25}}}, 'head': {'w': 1.0}}


def test_mup_at_its_base_width_is_sp():
  sp = ModelConfig(**WIDE)
  mu = dataclasses.replace(sp, parametrization='mup', mup_base_width=128)
  p_sp, u_sp = first_updates(sp)
  p_mu, u_mu = first_updates(mu)
  for a, b in zip(jax.tree.leaves((p_sp, u_sp)), jax.tree.leaves((p_mu, u_mu))):
    np.testing.assert_array_equal(a, b)
  x = jax.random.randint(jax.random.PRNGKey(2), (2, 16), 0, 64)
  np.testing.assert_array_equal(model_lib.apply(sp, p_sp, x), model_lib.apply(mu, p_mu, x))


@pytest.mark.parametrize('tied,base_head_dim', [(False, 0), (True, 16), (True, 0)])
def test_standard_form_keeps_the_logits(tied, base_head_dim):
  """The attention factor folded into wq and 1/m into the head: the SP model computes the
  same logits, also from the KV cache."""
  mc = ModelConfig(**dict(WIDE, tie_embeddings=tied), parametrization='mup', mup_base_width=32,
                   mup_base_head_dim=base_head_dim)
  assert mup.attention_scale(mc) == (pytest.approx(np.sqrt(base_head_dim) / 32)
                                     if base_head_dim else None)   # None: SP's 1/sqrt(H)
  params = init(mc)
  # A few Adam steps so the logits are not the near-zero ones of init.
  params = jax.tree.map(lambda p, u: p + 30 * u, params, first_updates(mc)[1])
  sp, sp_params = mup.to_standard(mc, params)
  assert sp.parametrization == 'sp' and sp.tie_embeddings is False
  x = jax.random.randint(jax.random.PRNGKey(2), (2, 16), 0, 64)
  ours = model_lib.apply(mc, params, x)
  assert float(jnp.std(ours)) > 0.1
  np.testing.assert_allclose(model_lib.apply(sp, sp_params, x), ours, atol=2e-5, rtol=1e-5)
  cache = model_lib.init_cache(mc, 2, 16)
  cached, _ = model_lib.apply(mc, params, x, cache=cache)
  np.testing.assert_allclose(cached, ours, atol=2e-5, rtol=1e-5)


def test_refusals():
  with pytest.raises(UserError, match='needs model.mup_base_width'):
    ModelConfig(**WIDE, parametrization='mup')
  with pytest.raises(UserError, match="no effect with model.parametrization='sp'"):
    ModelConfig(**WIDE, mup_base_width=32)
  with pytest.raises(UserError, match='model.parametrization'):
    ModelConfig(**WIDE, parametrization='ntk')
  mc = ModelConfig(**WIDE, parametrization='mup', mup_base_width=32)
  with pytest.raises(UserError, match='use one of the two'):
    optim.make_optimizer(optim.OptimizerConfig(optimizer='muon'),
                         model_lib.param_shapes(mc), model=mc)
  gpt2 = ModelConfig(vocab_size=64, d_model=64, n_heads=4, pos='learned', norm='layernorm',
                     use_bias=True, tie_embeddings=True, parametrization='mup', mup_base_width=16)
  with pytest.raises(UserError, match="GPT-2's tied head"):
    hf.to_hf(gpt2, init(gpt2))


def test_mup_run_trains_and_resumes_bitwise(cache_dir, tmp_path):
  def config():
    cfg = small_config(cache_dir, lr=0.01)
    cfg.model.parametrization, cfg.model.mup_base_width = 'mup', 16
    return cfg
  rows = train_and_resume(config, tmp_path)
  assert rows[-1]['loss'] < rows[0]['loss'] - 0.5


def test_sweep_under_mup_gives_every_run_the_base_rate():
  c = sweep_smoke.get_config()
  c.sweep.parametrization, c.sweep.lr_width_power = 'mup', 0.0
  specs = plan_lib.plan(c.sweep, c.base, 259)
  assert len({sp.d_model for sp in specs}) > 1 and {sp.lr for sp in specs} == {c.sweep.lr}
  for sp in specs:
    cfg = plan_lib.run_config(c.base, sp, mup_width=plan_lib.mup_base_width(c.sweep))
    mc = ModelConfig.from_config(cfg.model, 259)
    assert mc.parametrization == 'mup' and mc.mup_base_width == c.sweep.lr_ref_width
  c.sweep.lr_width_power = 1.0
  with pytest.raises(UserError, match='set it to 0'):
    plan_lib.plan(c.sweep, c.base, 259)
  c.sweep.parametrization = 'ntk'
  with pytest.raises(UserError, match='sweep.parametrization'):
    plan_lib.validate(c.sweep)
