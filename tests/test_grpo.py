"""GRPO: group-relative advantages, the clipped objective with the k3 KL, the verifiers, and tiny
runs (reward going up, exact resume, LoRA policies whose reference is their base)."""
import math
import os
import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from configs import grpo as grpo_cfg
from configs import sft as sft_cfg
from lm import runs
from lm.align import common, grpo
from lm.data import instruct
from lm.errors import UserError
from lm.stages import finetune as ft
from lm.stages import pretrain as train_lib
from tests.test_finetune import assert_same_logits, logits, pretrain_config
from tests.test_train import read_metrics as rows_of


# ---- the objective, by hand -------------------------------------------------------------------

def test_group_advantages_by_hand_and_zero_variance_groups_give_zero():
  adv = grpo.group_advantages([[1.0, 0.0, 1.0, 0.0], [0.5, 0.5, 0.5, 0.5], [3.0, 0.0, 0.0, 1.0]])
  np.testing.assert_allclose(adv[0], [1, -1, 1, -1])
  np.testing.assert_array_equal(adv[1], 0.0)
  r = np.array([3.0, 0.0, 0.0, 1.0])
  np.testing.assert_allclose(adv[2], (r - 1.0) / np.sqrt(((r - 1.0) ** 2).mean()))
  np.testing.assert_allclose(adv.mean(axis=1), 0.0, atol=1e-12)


def test_advantages_scaled_by_the_batch_or_not_at_all():
  r = np.array([[1.0, 0.0, 1.0, 0.0], [0.5, 0.5, 0.5, 0.5], [3.0, 0.0, 0.0, 1.0]])
  centred = r - r.mean(axis=1, keepdims=True)
  np.testing.assert_allclose(grpo.group_advantages(r, 'none'), centred)
  np.testing.assert_allclose(grpo.group_advantages(r, 'batch'), centred / r.std())
  # A group of equal rewards still gets 0, whatever the scale.
  for scale in grpo.SCALE_REWARDS:
    np.testing.assert_array_equal(grpo.group_advantages(r, scale)[1], 0.0)


def test_k3_by_hand():
  # pi(t) = 0.5, ref(t) = 0.25: d = log 0.25 - log 0.5 = -log 2; e^d - d - 1 = 0.5 + log 2 - 1.
  got = float(grpo.k3(jnp.log(0.5), jnp.log(0.25)))
  assert got == pytest.approx(math.log(2) - 0.5, rel=1e-6)
  assert float(grpo.k3(jnp.log(0.3), jnp.log(0.3))) == 0.0
  # Its mean under pi is KL(pi || ref): two outcomes, pi = (0.8, 0.2), ref = (0.5, 0.5).
  pi, ref = np.array([0.8, 0.2]), np.array([0.5, 0.5])
  est = np.asarray(grpo.k3(jnp.log(pi), jnp.log(ref)))
  assert float((pi * est).sum()) == pytest.approx(float((pi * np.log(pi / ref)).sum()), rel=1e-5)


def test_clipped_objective_by_hand():
  mask = jnp.ones((2, 1))
  old = jnp.log(jnp.array([[0.5], [0.5]]))
  # Row 0: ratio 1.5 > 1 + clip with A = +1: clipped, so no gradient. Row 1: ratio 0.9 with
  # A = -1: inside the clip, surrogate -(0.9)(-1) = 0.9 ... loss is -min(r A, clip(r) A).
  logp = jnp.log(jnp.array([[0.75], [0.45]]))
  adv = jnp.array([1.0, -1.0])

  def loss(lp):
    return grpo.grpo_loss(lp, old, lp, adv, mask, 0.2, 0.0)[0]
  value, aux = grpo.grpo_loss(logp, old, logp, adv, mask, 0.2, 0.0)
  assert float(value) == pytest.approx((-(1.2 * 1.0) + 0.9 * 1.0) / 2, rel=1e-6)
  assert float(aux['clipfrac']) == pytest.approx(0.5)
  g = jax.grad(loss)(logp)
  assert float(g[0, 0]) == 0.0 and float(g[1, 0]) != 0.0
  # The KL term: with kl_coef the loss grows by kl_coef * mean k3 per response.
  ref = jnp.log(jnp.array([[0.25], [0.25]]))
  with_kl = grpo.grpo_loss(logp, old, ref, adv, mask, 0.2, 0.1)[0]
  want = float(value) + 0.1 * float(jnp.mean(grpo.k3(logp, ref)))
  assert float(with_kl) == pytest.approx(want, rel=1e-6)


def test_tokens_of_a_response_are_averaged_before_responses():
  """1/G sum_i 1/|o_i| sum_t: a long response counts as much as a short one."""
  mask = jnp.array([[1.0, 1.0, 1.0, 1.0], [1.0, 0.0, 0.0, 0.0]])
  logp = jnp.zeros((2, 4))
  value, _ = grpo.grpo_loss(logp, logp, logp, jnp.array([1.0, 3.0]), mask, 0.2, 0.0)
  assert float(value) == pytest.approx(-(1.0 + 3.0) / 2)


def test_token_norm_weighs_every_token_alike():
  """sum_i sum_t / sum_i |o_i|: the long response's 4 tokens outweigh the short one's 1."""
  mask = jnp.array([[1.0, 1.0, 1.0, 1.0], [1.0, 0.0, 0.0, 0.0]])
  logp = jnp.zeros((2, 4))
  value, _ = grpo.grpo_loss(logp, logp, logp, jnp.array([1.0, 3.0]), mask, 0.2, 0.0, 'token')
  assert float(value) == pytest.approx(-(4 * 1.0 + 1 * 3.0) / 5)


@pytest.mark.parametrize('text, answer, credit, want', [
    ('57', '57', 0.0, 1.0), (' 57 ', '57', 0.5, 1.0), ('56', '57', 0.0, 0.0),
    ('47', '57', 0.5, 0.25), ('157', '57', 0.5, 0.5 * 2 / 3), ('fifty', '57', 0.5, 0.0),
    ('', '57', 0.5, 0.0)])
def test_arith_reward_by_hand(text, answer, credit, want):
  assert grpo.arith_reward(text, answer, credit) == pytest.approx(want)


def test_arith_prompts_are_split_like_the_instruction_set():
  train = grpo.arith_task('train', 2)
  held = grpo.arith_task('eval', 2)
  assert len(train.prompts) + len(held.prompts) == 90 * 90
  assert 0.1 < len(held.prompts) / 8100 < 0.3
  nums = lambda p: tuple(int(x) for x in re.findall(r'\d+', p))
  seen = {nums(p) for p in train.prompts}
  for p, a in zip(held.prompts, held.answers):
    (x, y) = nums(p)
    assert (x, y) not in seen and instruct.is_heldout('add', f'{x},{y}') and int(a) == x + y
  training_templates = instruct.phrasings('add')[:-instruct.HELDOUT_PHRASINGS]
  assert all(any(p == t.format(a=nums(p)[0], b=nums(p)[1]) for t in training_templates)
             for p in train.prompts[:50])
  assert grpo.arith_task('eval', 2, limit=40).prompts == grpo.arith_task('eval', 2,
                                                                           limit=40).prompts
  np.testing.assert_array_equal(held.rewards([0, 0], [held.answers[0], 'x']), [1.0, 0.0])


# ---- tiny runs ----------------------------------------------------------------------------------

@pytest.fixture(scope='module')
def sft_run(cache_dir, tmp_path_factory):
  """A tiny base, fine-tuned briefly on the 'add' family of the instruction set."""
  base = str(tmp_path_factory.mktemp('base'))
  c = pretrain_config(cache_dir)
  c.train.steps, c.train.eval_every, c.train.checkpoint_every = 40, 40, 40
  train_lib.train(c, base)
  workdir = str(tmp_path_factory.mktemp('sft'))
  s = sft_cfg.get_config()
  s.finetune.init_from, s.finetune.families = base, 'add'
  s.finetune.train_per_family, s.finetune.eval_per_family = 400, 8
  s.finetune.max_new_tokens, s.finetune.eval_batch_size = 6, 8
  for k, v in dict(steps=30, batch_size=8, seq_len=96, lr=3e-3, warmup_steps=2, eval_every=30,
                   eval_batches=1, checkpoint_every=30, progress='none').items():
    s.train[k] = v
  ft.finetune(s, workdir)
  return workdir


def grpo_config(sft_run, steps=3, **kw):
  c = grpo_cfg.get_config('arith')
  c.grpo.init_from = sft_run
  for k, v in dict(group_size=4, minibatch=8, epochs=2, max_new_tokens=6, eval_prompts=8,
                   eval_samples=1, sample_batch=16, arith_digits=1).items():
    c.grpo[k] = v
  for k, v in dict(steps=steps, batch_size=4, seq_len=96, lr=1e-3, warmup_steps=1,
                   eval_every=steps, checkpoint_every=1, progress='none').items():
    c.train[k] = v
  for k, v in kw.items():
    section, key = k.split('__')
    c[section][key] = v
  return c


@pytest.fixture(scope='module')
def grpo_run(sft_run, tmp_path_factory):
  workdir = str(tmp_path_factory.mktemp('grpo'))
  return workdir, grpo.train_grpo(grpo_config(sft_run), workdir)


def test_grpo_logs_its_metrics_and_starts_at_the_reference(grpo_run):
  workdir, summary = grpo_run
  rows = rows_of(workdir)
  assert [r['step'] for r in rows if 'reward_mean' in r] == [1, 2, 3]
  for key in ('reward_mean', 'reward_std', 'zero_variance', 'kl', 'k3', 'clipfrac',
              'response_length', 'exact', 'entropy', 'grad_norm'):
    assert all(math.isfinite(r[key]) for r in rows if 'reward_mean' in r), key
  assert rows[0]['kl'] == 0.0   # the first rollouts are sampled by the reference itself
  assert all(r['ratio_dev_first'] < 1e-5 for r in rows if 'reward_mean' in r)
  after = summary['grpo']['after']
  assert {'eval_exact', 'eval_reward', 'eval_kl', 'eval_length'} <= set(after)
  assert runs.kind(runs.read_config(workdir)) == 'grpo'
  assert runs.sft_root(workdir) == os.path.abspath(summary['grpo']['kl_reference'])


@pytest.mark.slow   # two more GRPO runs; the LoRA resume below stays in the default suite
def test_grpo_resume_is_bitwise_exact(grpo_run, sft_run, tmp_path):
  part = str(tmp_path / 'part')
  grpo.train_grpo(grpo_config(sft_run), part, stop_at=1)
  grpo.train_grpo(grpo_config(sft_run), part)
  a, _ = runs.restore_params(grpo_run[0], runs.PARAMS_KEYS['grpo'])
  b, _ = runs.restore_params(part, runs.PARAMS_KEYS['grpo'])
  for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b)):
    np.testing.assert_array_equal(np.asarray(x), np.asarray(y))


def test_grpo_raises_a_verifiers_reward(sft_run, tmp_path, monkeypatch):
  """A verifier that pays for responses beginning with '1': within a few iterations the policy
  says '1' first more often than the SFT model does."""
  base_task = grpo.arith_task

  def task(split, digits, limit=0, partial_credit=0.0, seed=0):
    t = base_task(split, digits, limit, partial_credit, seed)
    return grpo.Task('starts_with_1', t.prompts, t.answers,
                     lambda idx, texts: [float(x.strip().startswith('1')) for x in texts])
  monkeypatch.setattr(grpo, 'arith_task', task)
  workdir = str(tmp_path / 'ones')
  grpo.train_grpo(grpo_config(sft_run, steps=8, train__lr=3e-3, grpo__kl_coef=0.0,
                              train__checkpoint_every=8), workdir)
  rewards = [r['reward_mean'] for r in rows_of(workdir) if 'reward_mean' in r]
  assert np.mean(rewards[-3:]) > np.mean(rewards[:3]) + 0.2, rewards


@pytest.fixture(scope='module')
def lora_grpo(sft_run, tmp_path_factory):
  workdir = str(tmp_path_factory.mktemp('grpo_lora'))
  cfg = grpo_config(sft_run, steps=2, lora__rank=4)
  return workdir, cfg, grpo.train_grpo(cfg, workdir)


def test_lora_policy_holds_adapters_and_its_reference_is_the_base(lora_grpo, sft_run):
  workdir, cfg, summary = lora_grpo
  stage = grpo.build(cfg, str(workdir) + '_probe')
  state = jax.device_get(stage.init_state())
  names = {str(p[-1].key) for p, _ in jax.tree_util.tree_flatten_with_path(
      state['params']['policy'])[0]}
  assert names and all(n.endswith(('_a', '_b')) for n in names)
  policy = common.load_policy(sft_run)
  # One copy of the SFT weights, frozen: the adapters' base and the reference at once.
  assert set(stage.frozen) == {'ref'}
  for x, y in zip(jax.tree.leaves(stage.frozen['ref']), jax.tree.leaves(policy.params)):
    np.testing.assert_array_equal(np.asarray(x), np.asarray(y))
  # At step 0 (B = 0) the adapted policy's logits are the base's, which is the reference.
  mc = common.PolicyLora(rank=4).model(policy.mc)
  tokens = jnp.asarray(common.prompt_ids(policy.tokenizer, '1 + 2 =')[None, :])
  lo = common.policy_logits(mc, state['params']['policy'], tokens, policy.params)
  assert_same_logits(lo, logits(policy.mc, policy.params, tokens))
  # The run's checkpoint holds the adapters; runs.load_model merges them into the SFT weights.
  assert summary['grpo']['mode'] == 'lora'
  assert summary['grpo']['trainable_params'] < 0.2 * sum(
      x.size for x in jax.tree.leaves(policy.params))
  adapters, _ = runs.restore_params(workdir, runs.PARAMS_KEYS['grpo'])
  mc_l, merged, _, ident = runs.load_model(workdir)
  assert not mc_l.lora_rank and ident['step'] == 2
  assert_same_logits(logits(mc_l, merged, tokens),
                     common.policy_logits(mc, adapters, tokens, policy.params))


def test_lora_grpo_resume_is_bitwise_exact(lora_grpo, sft_run, tmp_path):
  workdir, cfg, _ = lora_grpo
  part = str(tmp_path / 'part')
  assert grpo.train_grpo(cfg, part, stop_at=1)['finished'] is False
  grpo.train_grpo(cfg, part)
  a, _ = runs.restore_params(workdir, runs.PARAMS_KEYS['grpo'])
  b, _ = runs.restore_params(part, runs.PARAMS_KEYS['grpo'])
  for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b)):
    np.testing.assert_array_equal(np.asarray(x), np.asarray(y))


@pytest.mark.parametrize('kw, match', [
    (dict(grpo__reward='maths'), 'is not a verifier'),
    (dict(grpo__group_size=1), 'must be at least 2'),
    (dict(grpo__minibatch=5), 'do not divide into minibatches'),
    (dict(grpo__reward='model'), 'reward_from'),
    (dict(grpo__arith_digits=4), 'must be one of 1, 2, 3'),
    (dict(grpo__partial_credit=1.0), r'must be in \[0, 1\)'),
    (dict(grpo__scale_rewards='std'), 'grpo.scale_rewards'),
    (dict(grpo__loss_norm='sum'), 'grpo.loss_norm'),
    (dict(lora__rank=-1), 'lora.rank=-1'),
    (dict(grpo__max_new_tokens=90), 'does not fit train.seq_len'),
])
def test_bad_grpo_settings_are_refused(sft_run, tmp_path, kw, match):
  with pytest.raises(UserError, match=match):
    grpo.build(grpo_config(sft_run, **kw), str(tmp_path / 'x'))
  assert not os.path.exists(tmp_path / 'x')


def test_grpo_from_a_pretraining_run_is_refused(sft_run, tmp_path):
  base = runs.read_config(sft_run)['base']['workdir']
  c = grpo_config(sft_run)
  c.grpo.init_from = base
  with pytest.raises(UserError, match='never fine-tuned'):
    grpo.build(c, str(tmp_path / 'x'))
