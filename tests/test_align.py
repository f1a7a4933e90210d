"""Preference learning: the gold program, pairs, reward model, DPO (and its IPO and SimPO variants,
with replay) and PPO, full or with LoRA policies (hand-worked numbers, tiny models, and one small
pipeline of real runs)."""
import functools
import json
import math
import os
import re

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from configs import dpo as dpo_cfg
from configs import ppo as ppo_cfg
from configs import reward as reward_cfg
from configs import sft as sft_cfg
from lm import chat as chat_lib
from lm.stages import finetune as ft
from lm.model import transformer as model_lib
from lm import runs
from lm.eval import sample as sample_lib
from lm.data import tokenizer as tokenizer_lib
from lm.stages import pretrain as train_lib
from lm.data import code_task
from lm.data import replay as replay_lib
from lm.data import tokens as data_lib
from lm.model import lora as lora_lib
from lm.training import loop
from lm.align import common, dpo, pairs as pairs_lib, ppo, reward
from lm.config import ModelConfig
from lm.errors import UserError
from tests.test_finetune import (assert_same_logits, loaded, logits, pretrain_config,
                                 recorded_config, restored_by_stage, stage_model)

BYTES = tokenizer_lib.ByteTokenizer()


def tiny_mc(**kw):
  d = dict(vocab_size=BYTES.vocab_size, n_layers=2, d_model=32, n_heads=4, d_ff=64, max_len=64)
  d.update(kw)
  return ModelConfig(**d)


# ---- the gold program -----------------------------------------------------------------------

@pytest.mark.parametrize('response, score', [
    ('return a + b', 1.0),
    ('x = a\nreturn x', 1.0),
    ('if a:\n    return b', 1.0),
    ('return 1', 0.75),                  # parses and does something, uses no argument
    ('self.x = 1', 0.75),                # self is not an argument that counts
    ('pass', 0.5),                       # parses, does nothing
    ('"""just a docstring"""', 0.5),
    ('return (a', 0.0),                  # does not parse
    ('', 0.0), ('   \n', 0.0),
    ('return a\nreturn b\n  x = 1', 0.0),   # bad indentation
])
def test_gold_reward_on_hand_cases(response, score):
  assert code_task.gold('def f(self, a, b=2):', response) == score


def test_gold_parts_and_task_extraction():
  parts = code_task.gold_parts('def f(a):', 'return len(a)')
  assert parts == {'parses': True, 'does_something': True, 'uses_argument': True, 'score': 1.0}
  src = ('def add(a, b):\n    """Sum."""\n    return a + b\n\n'
         'def noargs():\n    return 1\n\n'
         'class C:\n    def get(self, key):\n        return self.d[key]\n'
         '    def only_self(self):\n        return self.x\n'
         'def long_first(a):\n    return ' + 'a' * 60 + '\n')
  assert code_task.extract([src]) == [('def add(a, b):', 'return a + b'),
                                      ('def get(self, key):', 'return self.d[key]')]


def test_task_split_is_by_header_and_stable():
  ex = code_task.examples()
  train, held = {h for h, _ in ex['train']}, {h for h, _ in ex['eval']}
  assert train and held and not train & held
  assert all(code_task.is_heldout(h) for h in held)
  assert all(code_task.gold(h, s) == 1.0 for h, s in ex['train'][:50])


# ---- losses on hand-computed numbers --------------------------------------------------------

def test_bradley_terry_loss_by_hand():
  got = reward.bradley_terry(jnp.array([2.0, 0.0]), jnp.array([0.5, 1.0]))
  np.testing.assert_allclose(got, [math.log(1 + math.exp(-1.5)), math.log(1 + math.exp(1.0))],
                             rtol=1e-6)


def test_label_smoothed_bradley_terry_by_hand():
  got = reward.bradley_terry(jnp.array([2.0]), jnp.array([0.5]), label_smoothing=0.1)
  np.testing.assert_allclose(got, [0.9 * math.log(1 + math.exp(-1.5))
                                   + 0.1 * math.log(1 + math.exp(1.5))], rtol=1e-6)
  # Least at the margin log((1 - e) / e): a flipped label cannot pull it to infinity.
  m = math.log(0.9 / 0.1)
  at = lambda x: float(reward.bradley_terry(jnp.array([x]), jnp.array([0.0]), 0.1)[0])
  assert at(m) < at(m - 0.1) and at(m) < at(m + 0.1)


def test_dpo_nll_term_adds_the_chosen_per_token_nll():
  """sft_weight a: the pair loss grows by a times the chosen response's mean token NLL."""
  mc = tiny_mc()
  params = model_lib.init_params(mc, jax.random.PRNGKey(0))
  rng = np.random.default_rng(0)
  tokens = rng.integers(3, mc.vocab_size, (4, 12)).astype(np.int32)   # 2 chosen, 2 rejected
  mask = np.zeros((4, 11), np.float32)
  mask[:, 4:9] = 1.0
  mask[0, 9] = 1.0                       # chosen responses of 6 and 5 tokens
  batch = {'tokens': tokens, 'mask': mask, 'ref': np.array([-20.0, -21.0, -22.0, -23.0]),
           'weight': np.ones(4, np.float32)}
  plain, _ = dpo.pair_loss(mc, params, batch, 0.1)
  withnll, (_, m) = dpo.pair_loss(mc, params, batch, 0.1, sft_weight=0.5)
  logp = np.asarray(common.sequence_logprob(mc, params, batch))
  nll = -logp[:2] / np.array([6.0, 5.0])
  np.testing.assert_allclose(float(withnll) - float(plain), 0.5 * nll.sum(), rtol=1e-5)
  np.testing.assert_allclose(float(m['chosen_nll']), nll.sum(), rtol=1e-5)


def test_dpo_loss_by_hand_and_log2_at_the_reference():
  loss, r_w, r_l = dpo.dpo_loss_terms(jnp.array([-3.0]), jnp.array([-5.0]), jnp.array([-4.0]),
                                      jnp.array([-4.5]), beta=0.5)
  # implicit rewards 0.5 * (1) and 0.5 * (-0.5): margin 0.75
  np.testing.assert_allclose(r_w, [0.5]), np.testing.assert_allclose(r_l, [-0.25])
  np.testing.assert_allclose(loss, [math.log(1 + math.exp(-0.75))], rtol=1e-6)
  smooth, _, _ = dpo.dpo_loss_terms(jnp.array([-3.0]), jnp.array([-5.0]), jnp.array([-4.0]),
                                    jnp.array([-4.5]), beta=0.5, label_smoothing=0.1)
  np.testing.assert_allclose(smooth, [0.9 * math.log(1 + math.exp(-0.75))
                                      + 0.1 * math.log(1 + math.exp(0.75))], rtol=1e-6)
  same = jnp.array([-7.25, -1.0])
  for eps in (0.0, 0.2):
    loss0, _, _ = dpo.dpo_loss_terms(same, same + 2, same, same + 2, beta=0.1, label_smoothing=eps)
    np.testing.assert_allclose(loss0, [math.log(2)] * 2, rtol=1e-7)


def test_gae_against_a_hand_worked_example():
  # Three response tokens at positions 1..3 of a row of 5; gamma 1, lambda 0.5.
  mask = jnp.array([[0, 1, 1, 1, 0]], jnp.float32)
  values = jnp.array([[9.0, 1.0, 2.0, 3.0, 9.0]]) * mask
  rewards = jnp.array([[0.0, 0.5, 0.0, 2.0, 0.0]])
  adv, ret = ppo.gae(rewards, values, mask, gamma=1.0, lam=0.5)
  d3 = 2.0 - 3.0                    # terminal: no next value
  d2 = 0.0 + 3.0 - 2.0
  d1 = 0.5 + 2.0 - 1.0
  a3, a2 = d3, d2 + 0.5 * d3
  a1 = d1 + 0.5 * a2
  np.testing.assert_allclose(adv, [[0, a1, a2, a3, 0]], rtol=1e-6)
  np.testing.assert_allclose(ret, [[0, a1 + 1, a2 + 2, a3 + 3, 0]], rtol=1e-6)


def test_kl_penalty_on_every_response_token_and_score_on_the_last():
  logp = jnp.array([[-1.0, -2.0, -0.5, -3.0]])
  ref = jnp.array([[-1.5, -1.0, -0.5, -9.0]])
  mask = jnp.array([[0.0, 1.0, 1.0, 0.0]])
  rewards, kl = ppo.token_rewards(logp, ref, mask, jnp.array([4.0]), jnp.array([2]), 0.1)
  np.testing.assert_allclose(kl, [[0, -1.0, 0, 0]])
  np.testing.assert_allclose(rewards, [[0, 0.1, 4.0, 0]], rtol=1e-6)


def test_clipped_policy_objective_by_hand():
  old = jnp.zeros((1, 3))
  new = jnp.log(jnp.array([[1.5, 0.5, 1.1]]))
  adv = jnp.array([[1.0, 1.0, -2.0]])
  mask = jnp.ones((1, 3))
  loss, ratio, clipfrac, approx_kl = ppo.policy_loss(new, old, adv, mask, clip=0.2)
  # token 1: min(1.5, 1.2) * 1 = 1.2; token 2: min(0.5, 0.8) = 0.5; token 3: min(-2.2, -2.2)
  np.testing.assert_allclose(loss, -(1.2 + 0.5 - 2.2) / 3, rtol=1e-6)
  np.testing.assert_allclose(clipfrac, 2 / 3, rtol=1e-6)
  r = np.array([1.5, 0.5, 1.1])
  np.testing.assert_allclose(approx_kl, np.mean(r - 1 - np.log(r)), rtol=1e-5)
  v = ppo.value_loss(jnp.array([[2.0]]), jnp.array([[1.0]]), jnp.array([[3.0]]), jnp.ones((1, 1)),
                     clip=0.5)
  np.testing.assert_allclose(v, 0.5 * max((2 - 3) ** 2, (1.5 - 3) ** 2))


# ---- rows, temperature log-probabilities, scalar heads --------------------------------------

def test_rows_mark_exactly_the_response_targets():
  rows = common.make_rows([np.array([1, 2, 3]), np.array([4])], [np.array([7, 8]), np.array([9])],
                          seq_len=6, pad_id=0)
  np.testing.assert_array_equal(rows['tokens'], [[1, 2, 3, 7, 8, 0], [4, 9, 0, 0, 0, 0]])
  np.testing.assert_array_equal(rows['mask'], [[0, 0, 1, 1, 0], [1, 0, 0, 0, 0]])
  np.testing.assert_array_equal(rows['last'], [4, 1])
  with pytest.raises(UserError, match='does not fit seq_len'):
    common.make_rows([np.arange(5)], [np.arange(3)], seq_len=6, pad_id=0)


def test_logprobs_at_temperature_match_the_samplers_distribution(temperature=0.7):
  mc = tiny_mc(pos='rope')
  params = model_lib.init_params(mc, jax.random.PRNGKey(3))
  prompt = [BYTES.eos_id] + list(BYTES.encode('def f(a):'))
  n = 6
  # Draw n tokens the way the sampler does (its own sample_logits on the cached logits) and
  # record the log-probability of each draw under the distribution it was drawn from.
  logits, cache = sample_lib.prefill(mc, params, jnp.asarray([prompt], jnp.int32),
                                     jnp.array([len(prompt)]), slots=len(prompt) + n)
  step = jax.jit(lambda p, c, t, pos: sample_lib.decode_step(mc, p, c, t, pos))
  drawn, want = [], []
  for t in range(n):
    tok = int(sample_lib.sample_logits(jax.random.PRNGKey(t), logits, temperature)[0])
    drawn.append(tok)
    want.append(float(jax.nn.log_softmax(logits[0] / temperature)[tok]))
    logits, cache = step(params, cache, jnp.array([tok]), jnp.array([len(prompt) + t]))
  seq = jnp.asarray([prompt + drawn], jnp.int32)
  got = jax.jit(lambda p, x: model_lib.token_logprobs(mc, p, x, temperature))(params, seq)
  np.testing.assert_allclose(got[0, len(prompt) - 1:], want, atol=2e-5)
  assert len(set(drawn)) > 1    # a real draw, not one repeated argmax


def test_a_reward_model_learns_a_separable_toy_preference():
  mc = tiny_mc()
  trunk = model_lib.init_params(mc, jax.random.PRNGKey(0))
  tok = BYTES
  rng = np.random.default_rng(0)
  words = ['alpha', 'beta', 'gamma', 'delta', 'omega', 'kappa', 'sigma', 'theta']

  def pairs(n):
    out = []
    for _ in range(n):
      w = words[rng.integers(len(words))]
      out.append({'prompt': w, 'chosen': f'{w} yes', 'rejected': f'{w} no!'})
    return out
  train, held = pairs(64), pairs(32)
  rows = pairs_lib.pair_rows(tok, train, 32)
  held_rows = pairs_lib.pair_rows(tok, held, 32)
  params = common.init_head(mc, trunk)
  tc = train_lib.TrainConfig(steps=60, lr=3e-3, warmup_steps=0, weight_decay=0.0)
  opt = train_lib.make_optimizer(tc, params)
  state = opt.init(params)

  @jax.jit
  def step(params, state, b):
    (loss, aux), g = jax.value_and_grad(lambda p: reward.pair_loss(mc, p, b), has_aux=True)(params)
    upd, state = opt.update(g, state, params)
    return optax.apply_updates(params, upd), state, loss / aux[0]
  for i in range(60):
    idx = rng.choice(len(train), 16, replace=False)
    params, state, loss = step(params, state, pairs_lib.stack(rows, idx))
  held_b = pairs_lib.stack(held_rows, np.arange(len(held)))
  _, (w, m) = reward.pair_loss(mc, params, held_b)
  assert float(m['accuracy'] / w) == 1.0 and float(loss) < 0.1


# ---- bad input ------------------------------------------------------------------------------

def test_pairs_file_errors_name_file_and_line(tmp_path):
  path = tmp_path / 'p.jsonl'
  good = {'prompt': 'def f(a):', 'chosen': 'return a', 'rejected': 'return ('}
  cases = [('{"prompt": "x", "chosen": "a"', 'line 2 is not JSON'),
           (json.dumps({**good, 'rejected': 'return a'}), 'line 2 has identical chosen'),
           (json.dumps({'prompt': 'x', 'chosen': 'a'}), "line 2 has no string field 'rejected'"),
           (json.dumps({**good, 'chosen': ' '}), 'line 2 has an empty response')]
  for line, message in cases:
    path.write_text(json.dumps(good) + '\n' + line + '\n')
    with pytest.raises(UserError, match=message):
      pairs_lib.read_pairs(str(path))
  path.write_text(json.dumps(good) + '\n')
  assert pairs_lib.read_pairs(str(path)) == [good]


def test_ppo_learning_rate_schedule_spans_every_update_of_the_run():
  from lm.training.optim import learning_rate_schedule
  c = ppo_cfg.get_config()
  c.ppo.init_from, c.ppo.reward_from = 'a', 'b'
  c.train.schedule, c.train.steps, c.train.warmup_steps = 'cosine', 10, 2
  tc = train_lib.TrainConfig.from_config(c.train)
  pc = ppo.PpoConfig.from_config(c.ppo, tc.batch_size)
  u = ppo.updates_per_iteration(tc, pc)
  assert u == pc.epochs * tc.batch_size // pc.minibatch == 16
  sched = learning_rate_schedule(ppo.per_update_config(tc, pc))
  peak, final = tc.lr, tc.lr * tc.final_lr_fraction
  assert float(sched(2 * u - 1)) == pytest.approx(peak)       # warmup ends after 2 iterations
  assert float(sched(5 * u)) > 1.1 * final                      # still decaying mid-run
  assert float(sched(10 * u - 1)) == pytest.approx(final)     # the last update of iteration 10


def test_ppo_and_dpo_configs_refuse_bad_values():
  c = ppo_cfg.get_config()
  c.ppo.init_from, c.ppo.reward_from = 'a', 'b'
  ppo.PpoConfig.from_config(c.ppo, 64)
  with pytest.raises(UserError, match='not divisible by ppo.minibatch=16'):
    ppo.PpoConfig.from_config(c.ppo, 40)
  c.ppo.kl_coef = -0.1
  with pytest.raises(UserError, match='kl_coef=-0.1 must be >= 0'):
    ppo.PpoConfig.from_config(c.ppo, 64)
  d = dpo_cfg.get_config()
  d.dpo.init_from, d.dpo.pairs, d.dpo.beta = 'a', 'p.jsonl', 0.0
  with pytest.raises(UserError, match='beta=0.0 must be positive'):
    dpo.DpoConfig.from_config(d.dpo)


# ---- the stages, on tiny runs ---------------------------------------------------------------

@pytest.fixture(scope='module')
def sft_run(cache_dir, tmp_path_factory):
  """A tiny base model, fine-tuned for a few steps on the code task (few source files)."""
  base = str(tmp_path_factory.mktemp('base'))
  c = pretrain_config(cache_dir)
  c.train.steps, c.train.eval_every, c.train.checkpoint_every = 40, 40, 40
  train_lib.train(c, base)
  sft = str(tmp_path_factory.mktemp('sft'))
  s = sft_cfg.get_config()
  s.finetune.init_from, s.finetune.data = base, 'code'
  s.finetune.train_per_family, s.finetune.eval_per_family = 100_000, 8
  s.finetune.max_new_tokens, s.finetune.eval_batch_size = 16, 8
  for k, v in dict(steps=20, batch_size=8, seq_len=128, lr=3e-3, warmup_steps=2, eval_every=20,
                   eval_batches=1, checkpoint_every=20, progress='none').items():
    s.train[k] = v
  ft.finetune(s, sft)
  return sft


@pytest.fixture(autouse=True, scope='module')
def few_sources():
  """The code task from the first 60 standard-library files: a few hundred headers."""
  old = code_task.SOURCE_FILES
  code_task.SOURCE_FILES = 60
  yield
  code_task.SOURCE_FILES = old


def small(c, **train):
  for k, v in dict(batch_size=8, seq_len=128, warmup_steps=1, progress='none', log_every=1,
                   **train).items():
    c.train[k] = v
  return c


@pytest.fixture(scope='module')
def rm_run(sft_run, tmp_path_factory):
  workdir = str(tmp_path_factory.mktemp('rm'))
  c = small(reward_cfg.get_config(), steps=6, eval_every=3, checkpoint_every=3)
  r = c.reward
  r.init_from, r.prompts, r.eval_prompts, r.samples_per_prompt = sft_run, 48, 24, 3
  r.max_new_tokens, r.sample_batch = 24, 48
  return workdir, reward.train_reward(c, workdir)


def test_reward_run_writes_pairs_and_normalises_on_sft_samples(rm_run, sft_run):
  workdir, summary = rm_run
  r = summary['reward']
  pairs = pairs_lib.read_pairs(os.path.join(workdir, reward.PAIRS))
  held = pairs_lib.read_pairs(os.path.join(workdir, reward.EVAL_PAIRS))
  assert r['train_pairs'] == len(pairs) > 0 and r['eval_pairs'] == len(held) > 0
  for p in pairs + held:   # the higher gold score is chosen unless the label was flipped
    assert (p['gold_chosen'] > p['gold_rejected']) != p['flipped']
    assert p['gold_chosen'] == code_task.gold(p['prompt'], p['chosen'])
  assert not any(p['flipped'] for p in held)
  assert 0 <= r['eval_accuracy'] <= 1 and r['norm']['std'] > 0
  rm = reward.load(workdir)
  rows = pairs_lib.pair_rows(rm.tokenizer, pairs, 128)
  scores = np.concatenate([rm.scores(rows[s], 16) for s in ('chosen', 'rejected')])
  n = min(len(pairs), reward.NORM_SAMPLES // 2)
  scores = np.concatenate([scores[:n], scores[len(pairs):len(pairs) + n]])
  np.testing.assert_allclose([scores.mean(), scores.std()], [0, 1], atol=1e-4)


def test_reward_model_must_match_the_policy(rm_run, sft_run):
  policy = common.load_policy(sft_run)
  rm = reward.load(rm_run[0])
  common.check_compatible(policy, rm.mc, rm.tokenizer, 'reward model')
  other = ModelConfig(**{**rm.mc.__dict__, 'd_model': 2 * rm.mc.d_model})
  with pytest.raises(UserError, match='d_model differ'):
    common.check_compatible(policy, other, rm.tokenizer, 'reward model')


def ppo_config(sft_run, rm_dir, steps=2):
  c = small(ppo_cfg.get_config(), steps=steps, eval_every=2, checkpoint_every=1)
  p = c.ppo
  p.init_from, p.reward_from = sft_run, rm_dir
  p.minibatch, p.epochs, p.max_new_tokens, p.eval_prompts, p.sample_batch = 4, 2, 24, 8, 8
  p.kl_target = 3.0    # adaptive: kl_coef is state too
  return c


@pytest.fixture(scope='module')
def ppo_run(rm_run, sft_run, tmp_path_factory):
  full = str(tmp_path_factory.mktemp('ppo'))
  ppo.train_ppo(ppo_config(sft_run, rm_run[0]), full)
  return full


def test_ppo_logs_every_iteration_and_samples(ppo_run):
  rows = [json.loads(l) for l in open(os.path.join(ppo_run, 'metrics.jsonl'))]
  assert [r['step'] for r in rows] == [1, 2]
  for key in ('proxy_reward', 'gold_reward', 'kl', 'entropy', 'clipfrac', 'approx_kl',
              'value_loss', 'response_length', 'kl_coef'):
    assert all(math.isfinite(r[key]) for r in rows), key
  assert rows[0]['kl'] == 0.0            # the first rollout comes from the reference itself
  assert all(r['ratio_dev_first'] < 1e-5 for r in rows)
  assert rows[1]['kl_coef'] != rows[0]['kl_coef']   # adapted after the first iteration
  assert {'eval_gold', 'eval_kl', 'eval_proxy'} <= set(rows[-1])
  texts = chat_lib.sample_cli(ppo_run, 'def f(a, b):', max_new_tokens=16, num_samples=2)
  assert len(texts) == 2


@pytest.mark.slow   # two more PPO runs; the default suite keeps the LoRA and pretraining resumes
def test_ppo_resume_is_bitwise_exact(ppo_run, rm_run, sft_run, tmp_path):
  part = str(tmp_path / 'part')
  ppo.train_ppo(ppo_config(sft_run, rm_run[0]), part, stop_at=1)
  ppo.train_ppo(ppo_config(sft_run, rm_run[0]), part)
  cfg = json.load(open(os.path.join(ppo_run, 'config.json')))
  mc = common.load_policy(sft_run).mc
  assert runs.kind(cfg) == 'ppo' and mc.vocab_size
  a, _ = runs.restore_params(ppo_run, runs.PARAMS_KEYS['ppo'])
  b, _ = runs.restore_params(part, runs.PARAMS_KEYS['ppo'])
  for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b)):
    np.testing.assert_array_equal(np.asarray(x), np.asarray(y))


@pytest.fixture(scope='module')
def dpo_run(rm_run, sft_run, tmp_path_factory):
  """DPO for 8 steps on the reward run's pairs."""
  workdir = str(tmp_path_factory.mktemp('dpo'))
  c = small(dpo_cfg.get_config(), steps=8, eval_every=8, checkpoint_every=8, lr=1e-3)
  d = c.dpo
  d.init_from, d.pairs = sft_run, os.path.join(rm_run[0], reward.PAIRS)
  d.eval_pairs, d.reward_from = os.path.join(rm_run[0], reward.EVAL_PAIRS), rm_run[0]
  d.eval_prompts, d.eval_samples, d.max_new_tokens, d.sample_batch = 8, 1, 24, 8
  return workdir, dpo.train_dpo(c, workdir)


def test_dpo_starts_at_log2_and_learns_the_pairs(dpo_run, sft_run):
  workdir, summary = dpo_run
  rows = [json.loads(l) for l in open(os.path.join(workdir, 'metrics.jsonl'))]
  np.testing.assert_allclose(rows[0]['loss'], math.log(2), rtol=1e-5)   # step 1: policy == ref
  assert rows[-1]['loss'] < rows[0]['loss'] and rows[-1]['accuracy'] > 0.5
  after = summary['dpo']['after']
  assert {'eval_gold', 'eval_kl', 'eval_proxy', 'eval_pair_accuracy'} <= set(after)
  mc, params, tok, _ = runs.load_model(workdir)
  assert tok.hash == common.load_policy(sft_run).tokenizer.hash


def test_dpo_second_round_samples_its_own_pairs_and_measures_kl_to_the_sft_run(
    rm_run, sft_run, tmp_path):
  """Iterative DPO: a round started from a DPO run with dpo.pairs empty samples its pairs from
  that policy (gold-labelled, written to the workdir), uses it as the reference, and still
  reports KL to the SFT model the chain began from."""
  def config(init, pairs, steps):
    c = small(dpo_cfg.get_config(), steps=steps, eval_every=steps, checkpoint_every=steps,
              lr=1e-3)
    d = c.dpo
    d.init_from, d.pairs = init, pairs
    d.eval_prompts, d.eval_samples, d.max_new_tokens, d.sample_batch = 4, 1, 16, 48
    d.samples_per_prompt, d.pairs_per_prompt = 3, 1
    return c
  first = str(tmp_path / 'dpo1')
  dpo.train_dpo(config(sft_run, os.path.join(rm_run[0], reward.PAIRS), 2), first)
  second = str(tmp_path / 'dpo2')
  summary = dpo.train_dpo(config(first, '', 2), second)
  made = pairs_lib.read_pairs(os.path.join(second, dpo.PAIRS))
  assert made and all(p['gold_chosen'] != p['gold_rejected'] for p in made)
  info = summary['dpo']
  assert info['train_pairs'] == len(made) and info['sampling']['pairs'] == len(made)
  assert info['kl_reference'] == os.path.abspath(sft_run)
  assert runs.sft_root(second) == os.path.abspath(sft_run)
  rows = [json.loads(l) for l in open(os.path.join(second, 'metrics.jsonl'))]
  np.testing.assert_allclose(rows[0]['loss'], math.log(2), rtol=1e-5)   # reference = round 1
  # The pairs file is read back on a rerun, not sampled again.
  before = open(os.path.join(second, dpo.PAIRS)).read()
  dpo.train_dpo(config(first, '', 2), second)
  assert open(os.path.join(second, dpo.PAIRS)).read() == before
  # The lesson's table: every policy and best-of-n on the same held-out prompts.
  from experiments import rlhf
  result = rlhf.evaluate_policies(sft_run, rm_run[0], {'dpo': first, 'dpo round 2': second},
                                  eval_prompts=4, eval_samples=1, best_of=(1, 2),
                                  max_new_tokens=16, batch=8)
  rows = result['rows']
  assert list(rows) == ['sft', 'dpo', 'dpo round 2', 'best-of-1', 'best-of-2']
  assert abs(rows['sft']['kl']) < 1e-5 and rows['best-of-2']['kl'] == math.log(2) - 0.5
  assert all(0.0 <= r['gold'] <= 1.0 for r in rows.values())
  assert result['runs']['dpo round 2'] == os.path.abspath(second)


def test_lesson_report_and_plot_from_a_result(tmp_path, capsys):
  from experiments import rlhf
  row = lambda g, p, k: {'gold': g, 'proxy': p, 'kl': k, 'length': 20.0}
  result = {'rows': {'sft': row(0.6, 0.0, 0.0), 'dpo': row(0.8, 0.9, 2.0),
                     'ppo kl=0.05': row(0.85, 1.5, 3.0), 'best-of-1': row(0.6, 0.0, 0.0),
                     'best-of-4': row(0.75, 1.0, math.log(4) - 0.75)},
            'curves': {'0.05': [{'step': 0, 'kl': 0.0, 'gold': 0.6, 'proxy': 0.0},
                                {'step': 10, 'kl': 3.0, 'gold': 0.85, 'proxy': 1.5}]},
            'wall_s': {'sft': 1.0}, 'eval_prompts': 10, 'eval_samples': 2, 'best_of': [1, 4],
            'reward_model': {'eval_accuracy': 0.9, 'eval_pairs': 5, 'train_pairs': 9,
                             'train_flipped': 1}}
  rlhf.report(result)
  out = capsys.readouterr().out
  assert 'dpo' in out and '50%' in out and '62%' in out   # (0.8-0.6)/0.4 and (0.85-0.6)/0.4
  paths = rlhf.plot(result, str(tmp_path))
  assert os.path.getsize(paths[0]) > 0
  assert json.load(open(tmp_path / 'result.json'))['rows']['dpo']['gold'] == 0.8


def test_every_kind_of_run_loads_through_runs(sft_run, rm_run, ppo_run):
  """One reader for every run folder: its kind, its chain of base runs and its weights."""
  base = runs.read_config(sft_run)['base']['workdir']
  kinds = {p: runs.kind(runs.read_config(p)) for p in (base, sft_run, rm_run[0], ppo_run)}
  assert list(kinds.values()) == ['pretrain', 'finetune', 'reward', 'ppo']
  assert runs.sft_root(ppo_run) == os.path.abspath(sft_run)
  assert runs.root_config(ppo_run) == runs.read_config(base)
  assert [p for p, _ in runs.base_chain(ppo_run)] == [ppo_run, sft_run, base]
  with pytest.raises(UserError, match='is a reward model, not a language model'):
    runs.load_model(rm_run[0])
  _, sft_params, _, _ = runs.load_model(sft_run)
  mc, ppo_params, tok, ident = runs.load_model(ppo_run)
  summary = json.load(open(os.path.join(ppo_run, 'summary.json')))
  assert ident['step'] == summary['steps'] and runs.chats(runs.read_config(ppo_run))
  assert jax.tree.structure(ppo_params) == jax.tree.structure(sft_params)
  moved = [float(np.abs(np.asarray(a) - np.asarray(b)).max())
           for a, b in zip(jax.tree.leaves(ppo_params), jax.tree.leaves(sft_params))]
  assert max(moved) > 0   # the policy's own trained weights, not its base's
  rm = reward.load(rm_run[0])   # the reward model's trunk and head, read the same way
  assert set(rm.params) == {'trunk', 'head'}


# ---- runs.load_model gives the logits of each run's own stage -------------------------------
# Each stage is built again from its run's config.json and its state restored as the training
# loop resumes it (tests/test_finetune.py: restored_by_stage); the weights runs.load_model reads,
# under the plain Transformer, must give that stage's own numbers.

def code_rows(tok, n=8, seq_len=128):
  """Rows of n held-out code-task prompts, each answered by its true body."""
  ex = code_task.examples()['eval'][:n]
  return common.make_rows([common.prompt_ids(tok, h) for h, _ in ex],
                          [common.response_ids(tok, b) for _, b in ex], seq_len, tok.pad_id)


def logprobs_of(logits_BTV, tokens, temperature=1.0):
  """log p_T(target t) [B, T-1] from the logits [B, T, V] of tokens [B, T], in float64."""
  z = np.asarray(logits_BTV, np.float64)[:, :-1] / temperature
  z = z - z.max(-1, keepdims=True)
  logp = z - np.log(np.exp(z).sum(-1, keepdims=True))
  return np.take_along_axis(logp, np.asarray(tokens)[:, 1:, None], -1)[..., 0]


def test_pretrain_and_full_finetune_runs_load_with_their_stages_logits(sft_run):
  """The pretraining stage's restored params under its own model, and the full fine-tuning
  stage's, give the logits of what runs.load_model reads."""
  base = runs.read_config(sft_run)['base']['workdir']
  tokens = code_rows(runs.load_tokenizer(sft_run))['tokens']
  run = train_lib.build(recorded_config(base))
  state, step = restored_by_stage(train_lib.stage(run), base)
  own_base = logits(run.model, state['params'], tokens)
  mc, params, ident = loaded(base)
  assert ident['step'] == step == 40
  assert_same_logits(logits(mc, params, tokens), own_base)

  stage = ft.build(recorded_config(sft_run), sft_run).stage
  state, step = restored_by_stage(stage, sft_run)
  mc_own = stage_model(stage)
  assert mc_own.lora_rank == 0 and stage.frozen is None      # full fine-tuning
  own = logits(mc_own, state['params'], tokens)
  mc, params, ident = loaded(sft_run)
  assert ident['step'] == step == 20
  assert_same_logits(logits(mc, params, tokens), own)
  assert np.abs(own - own_base).max() > 0.1                   # its own weights, not its base's


def test_reward_run_is_refused_and_reward_load_scores_as_its_stage(rm_run, sft_run):
  """load_model refuses a reward run, naming its SFT run; reward.load's normalised scores are
  the reward stage's own scores of its training batch, normalised by the mean and std the
  stage's evaluation measures again on its restored params."""
  workdir, summary = rm_run
  with pytest.raises(UserError, match=re.escape(
      f'is a reward model, not a language model; use its SFT run {os.path.abspath(sft_run)} ')):
    runs.load_model(workdir)
  stage = reward.build(recorded_config(workdir), workdir)
  state, step = restored_by_stage(stage, workdir)
  own_eval = stage.evaluate(state['params'], None)    # its normalisation, measured again
  rm = reward.load(workdir)
  assert rm.identity['step'] == step == 6
  np.testing.assert_allclose([rm.mean, rm.std], [own_eval['score_mean'], own_eval['score_std']],
                             rtol=1e-6)
  assert own_eval['eval_accuracy'] == summary['reward']['eval_accuracy']
  batch = jax.device_get(stage.batch(0))              # 8 chosen then 8 rejected rows
  rows = {k: batch[k] for k in ('tokens', 'mask', 'last')}
  own = np.asarray(common.jit_last_scores(state['params'], rows, mc=stage_model(stage)))
  got = rm.scores(rows, len(own))
  np.testing.assert_allclose(got, (own - own_eval['score_mean']) / own_eval['score_std'],
                             rtol=1e-5, atol=1e-5)
  assert np.ptp(got) > 1e-2


def test_ppo_run_loads_the_policy_its_stage_restores(ppo_run):
  """load_model of a PPO run: the policy half of the state its stage restores (not the value
  network, not the SFT reference the stage holds frozen)."""
  stage = ppo.build(recorded_config(ppo_run), ppo_run)
  state, step = restored_by_stage(stage, ppo_run)
  policy, mc, T = state['params']['policy'], stage_model(stage), stage.config['ppo']['temperature']
  rows = code_rows(stage.tokenizer, 16)
  # The log-probabilities its evaluation takes of responses, of its policy and its reference.
  own = np.asarray(common.jit_sequence_logprob(policy, rows, mc=mc, temperature=T))
  ref = np.asarray(common.jit_sequence_logprob(stage.frozen['ref'], rows, mc=mc, temperature=T))
  mc_p, params_p, ident = loaded(ppo_run)
  assert ident['step'] == step == 2
  tokens, mask = rows['tokens'][:8], rows['mask'][:8]
  got = logits(mc_p, params_p, tokens)
  assert_same_logits(got, logits(mc, policy, tokens))
  np.testing.assert_allclose((logprobs_of(got, tokens, T) * mask).sum(-1), own[:8], rtol=1e-5,
                             atol=1e-4)
  assert np.abs(own - ref).max() > 1e-2                # the policy, not its SFT reference


def test_dpo_run_loads_the_policy_its_stage_restores(dpo_run):
  """load_model of a DPO run: the policy its stage restores, scored on the stage's own first
  batch as its loss scores it (summed response log-probabilities), off the reference's."""
  workdir, _ = dpo_run
  stage = dpo.build(recorded_config(workdir), workdir)
  state, step = restored_by_stage(stage, workdir)
  mc = stage_model(stage)
  batch = jax.device_get(stage.batch(0))     # its pairs, with the reference's log-probabilities
  rows = {k: batch[k] for k in ('tokens', 'mask', 'last')}
  own = np.asarray(common.jit_sequence_logprob(state['params'], rows, mc=mc))
  mc_d, params_d, ident = loaded(workdir)
  assert ident['step'] == step == 8
  chosen = rows['tokens'][:8]                # 8 rows: the forward pass the tests above compiled
  got = logits(mc_d, params_d, chosen)
  assert_same_logits(got, logits(mc, state['params'], chosen))
  got_lp = (logprobs_of(got, chosen) * rows['mask'][:8]).sum(-1)
  np.testing.assert_allclose(got_lp, own[:8], rtol=1e-5, atol=1e-4)
  assert np.abs(own - batch['ref']).max() > 0.1      # the policy moved off its reference


# ==== preference-loss variants (IPO, SimPO), replay in DPO, LoRA policies for DPO and PPO ====

@pytest.fixture(scope='module')
def rm_dir(rm_run):
  """The tiny reward-model run's folder."""
  return rm_run[0]


# ---- the losses, by hand ----------------------------------------------------------------------

def test_ipo_loss_by_hand():
  # h = (-3 - -4) - (-5 - -4.5) = 1.5; beta 0.5: target 1 / (2 beta) = 1, loss (1.5 - 1)^2.
  loss, r_w, r_l = dpo.ipo_loss_terms(jnp.array([-3.0]), jnp.array([-5.0]), jnp.array([-4.0]),
                                      jnp.array([-4.5]), beta=0.5)
  np.testing.assert_allclose(loss, [0.25], rtol=1e-6)
  np.testing.assert_allclose([float(r_w[0]), float(r_l[0])], [0.5, -0.25], rtol=1e-6)
  # At the reference h = 0: 1 / (4 beta^2); least (0) where the margin beta h is 1/2.
  same = jnp.array([-7.25, -1.0])
  at_ref, _, _ = dpo.ipo_loss_terms(same, same + 2, same, same + 2, beta=0.1)
  np.testing.assert_allclose(at_ref, [25.0, 25.0], rtol=1e-6)
  at = lambda h: float(dpo.ipo_loss_terms(jnp.array([h]), jnp.array([0.0]), jnp.array([0.0]),
                                          jnp.array([0.0]), beta=0.1)[0][0])
  assert at(5.0) == 0.0 and at(4.9) > 0 and at(5.1) > 0


def test_simpo_loss_by_hand_and_without_a_reference():
  # Averages -6 / 3 = -2 and -12 / 4 = -3; beta 2: rewards -4 and -6; margin 2 - gamma 1 = 1.
  args = (jnp.array([-6.0]), jnp.array([-12.0]), jnp.array([3.0]), jnp.array([4.0]))
  loss, r_w, r_l = dpo.simpo_loss_terms(*args, beta=2.0, gamma=1.0)
  np.testing.assert_allclose(loss, [math.log(1 + math.exp(-1.0))], rtol=1e-6)
  np.testing.assert_allclose([float(r_w[0]), float(r_l[0])], [-4.0, -6.0], rtol=1e-6)
  smooth, _, _ = dpo.simpo_loss_terms(*args, beta=2.0, gamma=1.0, label_smoothing=0.1)
  np.testing.assert_allclose(smooth, [0.9 * math.log(1 + math.exp(-1.0))
                                      + 0.1 * math.log(1 + math.exp(1.0))], rtol=1e-6)
  # loss_terms dispatches on the name; SimPO never reads the reference, DPO is the old function.
  nan = jnp.array([np.nan])
  got = dpo.loss_terms('simpo', args[0], args[1], nan, nan, args[2], args[3], beta=0.1,
                       simpo_beta=2.0, simpo_gamma=1.0)
  np.testing.assert_allclose(got[0], loss, rtol=1e-7)
  ref = (jnp.array([-4.0]), jnp.array([-4.5]))
  for eps in (0.0, 0.1):
    want = dpo.dpo_loss_terms(args[0], args[1], *ref, beta=0.5, label_smoothing=eps)
    got = dpo.loss_terms('dpo', args[0], args[1], *ref, args[2], args[3], beta=0.5,
                         label_smoothing=eps)
    for x, y in zip(got, want):
      np.testing.assert_array_equal(x, y)


def test_pair_loss_of_each_variant_on_a_tiny_model():
  """pair_loss of a tiny model's rows equals each loss by hand from its summed log-probabilities
  and response lengths; 'dpo' is the old call's number; every variant logs the same metrics."""
  mc = tiny_mc(n_layers=1)
  params = model_lib.init_params(mc, jax.random.PRNGKey(0))
  rng = np.random.default_rng(0)
  tokens = rng.integers(3, mc.vocab_size, (4, 12)).astype(np.int32)   # 2 chosen, 2 rejected
  mask = np.zeros((4, 11), np.float32)
  mask[:, 4:9] = 1.0
  mask[0, 9] = mask[2, 9] = mask[2, 10] = 1.0        # responses of 6, 5, 7 and 5 tokens
  batch = {'tokens': tokens, 'mask': mask, 'ref': np.array([-20.0, -21.0, -22.0, -23.0]),
           'weight': np.ones(4, np.float32)}
  logp = np.asarray(common.sequence_logprob(mc, params, batch), np.float64)
  n = mask.sum(1)
  beta = 0.1
  h = (logp[:2] - batch['ref'][:2]) - (logp[2:] - batch['ref'][2:])
  want = {'dpo': np.log1p(np.exp(-beta * h)).sum(), 'ipo': ((h - 1 / (2 * beta)) ** 2).sum()}
  m = 2.0 * (logp[:2] / n[:2] - logp[2:] / n[2:]) - 0.5
  want['simpo'] = np.log1p(np.exp(-m)).sum()
  pair_loss = functools.partial(dpo.pair_loss, mc)
  old, _ = pair_loss(params, batch, beta)
  for loss in dpo.LOSSES:
    total, (w, metrics) = pair_loss(params, batch, beta, loss=loss, simpo_beta=2.0,
                                    simpo_gamma=0.5)
    np.testing.assert_allclose(float(total), want[loss], rtol=1e-5)
    assert float(w) == 2 and set(metrics) == {'accuracy', 'margin', 'reward_chosen',
                                              'reward_rejected', 'chosen_nll'}
    np.testing.assert_allclose(float(metrics['margin']),
                               float(metrics['reward_chosen'] - metrics['reward_rejected']),
                               rtol=1e-5)
  assert float(pair_loss(params, batch, beta, loss='dpo')[0]) == float(old)
  simpo = dict(batch, ref=np.full(4, np.nan))          # no reference is read
  assert math.isfinite(float(pair_loss(params, simpo, beta, loss='simpo')[0]))


def test_replay_rows_make_the_share_of_a_steps_sequences():
  assert dpo.replay_rows(8, 0.0) == 0
  assert dpo.replay_rows(8, 0.2) == 4                 # 4 of 16 + 4 sequences
  assert dpo.replay_rows(32, 0.5) == 64
  with pytest.raises(UserError, match='gives no replay row'):
    dpo.replay_rows(8, 0.01)


def dpo_section(**kw):
  d = dpo_cfg.get_config()
  d.dpo.init_from, d.dpo.pairs = 'runs/any', 'p.jsonl'
  for k, v in kw.items():
    d.dpo[k] = v
  return d.dpo


@pytest.mark.parametrize('kw, match', [
    (dict(loss='kto'), r"dpo.loss='kto' is not a preference loss; use one of dpo, ipo, simpo"),
    (dict(loss='ipo', label_smoothing=0.1), 'has no meaning for IPO'),
    (dict(loss='simpo', simpo_beta=0.0), 'simpo_beta=0.0 must be positive'),
    (dict(simpo_gamma=-1.0), 'simpo_gamma=-1.0 must be >= 0'),
    (dict(replay_fraction=1.0), r'replay_fraction=1.0 must be in \[0, 1\)'),
])
def test_bad_dpo_settings_are_refused(kw, match):
  with pytest.raises(UserError, match=match):
    dpo.DpoConfig.from_config(dpo_section(**kw))


def test_a_dpo_section_without_the_added_keys_reads_as_plain_dpo():
  s = dpo_section().to_dict()
  for k in ('loss', 'simpo_beta', 'simpo_gamma', 'replay_fraction'):
    del s[k]
  c = dpo.DpoConfig.from_config(s)
  assert (c.loss, c.simpo_beta, c.simpo_gamma, c.replay_fraction) == ('dpo', 2.0, 1.0, 0.0)
  assert common.PolicyLora.from_config({}).rank == 0      # no lora section: every weight trains
  for key, absent in loop.ADDED_KEYS.items():              # the config files' defaults
    section, name = key.split('.')
    if section in ('dpo', 'lora'):
      assert dpo_cfg.get_config()[section][name] == absent, key


# ---- tiny runs --------------------------------------------------------------------------------

def dpo_config(sft_run, rm_dir, steps=8, lr=1e-3, held_out=False, **kw):
  """A tiny DPO config on the reward run's pairs (held_out: and its held-out pairs); kw:
  'section__key' overrides."""
  c = small(dpo_cfg.get_config(), steps=steps, eval_every=steps, checkpoint_every=steps, lr=lr)
  d = c.dpo
  d.init_from, d.pairs = sft_run, os.path.join(rm_dir, reward.PAIRS)
  d.eval_prompts, d.eval_samples, d.max_new_tokens, d.sample_batch = 8, 1, 24, 8
  if held_out:
    d.eval_pairs = os.path.join(rm_dir, reward.EVAL_PAIRS)
  for k, v in kw.items():
    section, key = k.split('__')
    c[section][key] = v
  return c


def rows_of(workdir):
  return [json.loads(l) for l in open(os.path.join(workdir, 'metrics.jsonl'))]


def same_params(a_dir, b_dir, keys):
  a, _ = runs.restore_params(a_dir, keys)
  b, _ = runs.restore_params(b_dir, keys)
  assert jax.tree.structure(a) == jax.tree.structure(b)
  for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b)):
    np.testing.assert_array_equal(np.asarray(x), np.asarray(y))


def checkpoint_bytes(workdir) -> int:
  """Bytes on disk of the run's newest checkpoint."""
  ckpts = os.path.join(workdir, 'checkpoints')
  path = os.path.join(ckpts, str(max(int(d) for d in os.listdir(ckpts) if d.isdigit())))
  return sum(os.path.getsize(os.path.join(d, f)) for d, _, fs in os.walk(path) for f in fs)


@pytest.fixture(scope='module')
def variant_runs(sft_run, rm_dir, tmp_path_factory):
  """IPO and SimPO, 6 steps each on the reward run's pairs."""
  out = {}
  for loss in ('ipo', 'simpo'):
    workdir = str(tmp_path_factory.mktemp(loss))
    cfg = dpo_config(sft_run, rm_dir, steps=6, held_out=loss == 'ipo', dpo__loss=loss)
    out[loss] = workdir, dpo.train_dpo(cfg, workdir)
  return out


@pytest.mark.parametrize('loss', ['ipo', 'simpo'])
def test_ipo_and_simpo_runs_learn_the_pairs(variant_runs, loss):
  workdir, summary = variant_runs[loss]
  rows = rows_of(workdir)
  assert [r['step'] for r in rows] == list(range(1, 7))
  first, last = rows[:2], rows[-2:]
  mean = lambda rs, k: float(np.mean([r[k] for r in rs]))
  assert mean(last, 'loss') < mean(first, 'loss'), [r['loss'] for r in rows]
  assert mean(last, 'margin') > mean(first, 'margin')
  assert mean(last, 'accuracy') > 0.5
  for r in rows:
    assert {'accuracy', 'margin', 'reward_chosen', 'reward_rejected', 'chosen_nll'} <= set(r)
  if loss == 'ipo':    # step 1: the policy is its reference, h = 0, loss 1 / (4 beta^2) = 25
    np.testing.assert_allclose(rows[0]['loss'], 25.0, rtol=1e-4)
    assert rows[0]['margin'] == pytest.approx(0.0, abs=1e-4)
  info = summary['dpo']
  assert info['loss'] == loss and info['mode'] == 'full'
  assert (loss == 'simpo') == ('simpo_gamma' in info)
  assert {'eval_gold', 'eval_kl'} <= set(info['after'])
  if loss == 'ipo':    # the held-out pairs under the run's own loss
    assert {'eval_pair_loss', 'eval_pair_accuracy', 'eval_pair_margin'} <= set(info['after'])


def test_a_run_without_the_added_keys_still_resumes(sft_run, rm_dir, tmp_path):
  """An old run's config.json (DPO: no dpo.loss, simpo_*, replay_fraction; DPO and PPO: no lora
  section) matches today's defaults (loop.ADDED_KEYS): the stage builds against it; other values
  are refused."""
  cfg = dpo_config(sft_run, rm_dir)
  new = dpo.build(cfg, str(tmp_path / 'new')).config
  assert new['dpo']['loss'] == 'dpo' and new['lora']['rank'] == 0
  old = json.loads(json.dumps(new))
  for k in ('loss', 'simpo_beta', 'simpo_gamma', 'replay_fraction'):
    del old['dpo'][k]
  del old['lora']
  os.makedirs(tmp_path / 'old')
  json.dump(old, open(tmp_path / 'old' / 'config.json', 'w'))
  assert dpo.build(cfg, str(tmp_path / 'old')).config == new
  with pytest.raises(UserError, match=r"different config \(dpo.loss \(None -> 'ipo'\)"):
    dpo.build(dpo_config(sft_run, rm_dir, dpo__loss='ipo'), str(tmp_path / 'old'))
  cfg = ppo_config(sft_run, rm_dir)
  new = ppo.build(cfg, str(tmp_path / 'new_ppo')).config
  old = json.loads(json.dumps(new))
  del old['lora']
  os.makedirs(tmp_path / 'old_ppo')
  json.dump(old, open(tmp_path / 'old_ppo' / 'config.json', 'w'))
  assert ppo.build(cfg, str(tmp_path / 'old_ppo')).config == new
  cfg.lora.rank = 4
  with pytest.raises(UserError, match=r"different config \(.*lora.rank \(None -> 4\)"):
    ppo.build(cfg, str(tmp_path / 'old_ppo'))


# ---- replay in DPO ----------------------------------------------------------------------------

def replay_config(sft_run, rm_dir, steps=2):
  return dpo_config(sft_run, rm_dir, steps=steps, dpo__replay_fraction=0.2)


@pytest.fixture(scope='module')
def replay_run(sft_run, rm_dir, tmp_path_factory):
  workdir = str(tmp_path_factory.mktemp('replay'))
  return workdir, dpo.train_dpo(replay_config(sft_run, rm_dir), workdir)


def test_replay_rows_are_pretraining_windows_and_their_loss_is_logged(replay_run, sft_run,
                                                                     rm_dir):
  workdir, summary = replay_run
  stage = dpo.build(replay_config(sft_run, rm_dir), workdir)
  base = runs.read_config(sft_run)['base']['workdir']
  corpus = data_lib.prepare(data_lib.DataConfig.from_config(runs.read_config(base)['data']))
  train = corpus.tokens('train')
  T = 128
  windows = {train[i * T:i * T + T + 1].tobytes() for i in range(corpus.n_windows('train', T))}
  seen = []
  for step in range(2):
    b = jax.device_get(stage.batch(step))
    assert b['tokens'].shape == (16, T) and b['replay'].shape == (4, T + 1)   # 0.2 of 20 rows
    assert b['replay'].dtype == np.int32
    assert all(r.astype(train.dtype).tobytes() in windows for r in b['replay'])
    np.testing.assert_array_equal(
        b['replay'], replay_lib.Replay(corpus, 4, T, 0).windows(step))
    seen.append(b['replay'])
  assert not np.array_equal(seen[0], seen[1])
  rows = rows_of(workdir)
  for r in rows:
    assert 0 < r['replay_loss'] < math.log(corpus.tokenizer.vocab_size)
    np.testing.assert_allclose(r['loss'], r['pair_loss'] + r['replay_loss'], rtol=1e-5)
    assert r['tokens'] == r['step'] * 20 * T
  np.testing.assert_allclose(rows[0]['pair_loss'], math.log(2), rtol=1e-5)
  info = summary['dpo']['replay']
  assert info['rows_per_step'] == 4 and info['fraction'] == 0.2
  assert info['corpus'] == corpus.path


@pytest.mark.slow   # a second replay run; the LoRA runs below keep a resume in the default suite
def test_replay_resume_is_bitwise_exact(replay_run, sft_run, rm_dir, tmp_path):
  part = str(tmp_path / 'part')
  assert dpo.train_dpo(replay_config(sft_run, rm_dir), part, stop_at=1)['finished'] is False
  dpo.train_dpo(replay_config(sft_run, rm_dir), part)
  same_params(replay_run[0], part, runs.PARAMS_KEYS['dpo'])
  a = [r['replay_loss'] for r in rows_of(replay_run[0])]
  b = [r['replay_loss'] for r in rows_of(part)]
  assert a == b


# ---- LoRA policies ----------------------------------------------------------------------------

def adapter_names(tree) -> set:
  return {str(p[-1].key) for p, _ in jax.tree_util.tree_flatten_with_path(tree)[0]}


def held_out_tokens(tok, n=4, seq_len=128):
  ex = code_task.examples()['eval'][:n]
  return common.make_rows([common.prompt_ids(tok, h) for h, _ in ex],
                          [common.response_ids(tok, b) for _, b in ex], seq_len,
                          tok.pad_id)['tokens']


@pytest.fixture(scope='module')
def lora_dpo(sft_run, rm_dir, tmp_path_factory):
  workdir = str(tmp_path_factory.mktemp('dpo_lora'))
  cfg = dpo_config(sft_run, rm_dir, steps=2, lr=3e-3, lora__rank=4)
  return workdir, cfg, dpo.train_dpo(cfg, workdir)


def test_lora_dpo_holds_adapters_on_its_reference_and_loads_merged(lora_dpo, variant_runs,
                                                                   sft_run, rm_dir, tmp_path):
  workdir, cfg, summary = lora_dpo
  policy = common.load_policy(sft_run)
  stage = dpo.build(cfg, str(tmp_path / 'probe'))
  state = jax.device_get(stage.init_state())
  names = adapter_names(state['params'])
  assert names and all(n.endswith(('_a', '_b')) for n in names)
  # One copy of the SFT weights, frozen: the adapters' base and (adapters off) the reference.
  for x, y in zip(jax.tree.leaves(stage.frozen), jax.tree.leaves(policy.params)):
    np.testing.assert_array_equal(np.asarray(x), np.asarray(y))
  mc = common.PolicyLora(rank=4).model(policy.mc)
  assert stage.config['base']['model']['lora_rank'] == 4
  tokens = held_out_tokens(policy.tokenizer)
  sft_logits = logits(policy.mc, policy.params, tokens)
  assert_same_logits(logits(mc, policy.params, tokens, state['params']), sft_logits)
  rows = rows_of(workdir)
  np.testing.assert_allclose(rows[0]['loss'], math.log(2), rtol=1e-5)   # policy == reference
  assert summary['dpo']['mode'] == 'lora'
  assert summary['dpo']['trainable_params'] < 0.2 * sum(
      x.size for x in jax.tree.leaves(policy.params))
  # The state (adapters and their moments) against a full policy's; on disk, orbax's metadata
  # (about 100 KB a checkpoint, whatever its size) is most of this tiny model's checkpoint.
  full = dpo.build(dpo_config(sft_run, rm_dir), str(tmp_path / 'full'))
  assert lora_lib.tree_bytes(stage.abstract_state) < 0.1 * lora_lib.tree_bytes(
      full.abstract_state)
  assert checkpoint_bytes(workdir) < 0.4 * checkpoint_bytes(variant_runs['ipo'][0])
  # runs.load_model merges the adapters into the SFT weights: the stage's policy logits.
  adapters, _ = runs.restore_params(workdir, runs.PARAMS_KEYS['dpo'])
  mc_l, merged, _, ident = runs.load_model(workdir)
  assert not mc_l.lora_rank and ident['step'] == 2
  own = logits(mc, policy.params, tokens, adapters)
  assert_same_logits(logits(mc_l, merged, tokens), own)
  assert_same_logits(logits(mc_l, common.merged_policy(mc, adapters, policy.params), tokens), own)
  assert np.abs(own - sft_logits).max() > 1e-3                  # the adapters moved


def test_lora_dpo_resume_is_bitwise_exact(lora_dpo, tmp_path):
  workdir, cfg, _ = lora_dpo
  part = str(tmp_path / 'part')
  assert dpo.train_dpo(cfg, part, stop_at=1)['finished'] is False
  dpo.train_dpo(cfg, part)
  same_params(workdir, part, runs.PARAMS_KEYS['dpo'])


@pytest.fixture(scope='module')
def lora_ppo(sft_run, rm_dir, tmp_path_factory):
  workdir = str(tmp_path_factory.mktemp('ppo_lora'))
  cfg = ppo_config(sft_run, rm_dir, steps=1)
  cfg.lora.rank = 4
  cfg.train.lr, cfg.train.warmup_steps = 1e-3, 0
  return workdir, cfg, ppo.train_ppo(cfg, workdir)


@pytest.mark.slow   # a LoRA PPO run; LoRA policies stay in the default suite with DPO and GRPO
def test_lora_ppo_holds_adapters_and_one_copy_of_the_sft_weights(lora_ppo, sft_run, rm_dir,
                                                                 tmp_path):
  workdir, cfg, summary = lora_ppo
  policy = common.load_policy(sft_run)
  stage = ppo.build(cfg, str(tmp_path / 'probe'))
  state = jax.device_get(stage.init_state())
  names = adapter_names(state['params']['policy'])
  assert names and all(n.endswith(('_a', '_b')) for n in names)
  rm = reward.load(rm_dir)
  value = state['params']['value']                 # a full copy of the reward model's trunk
  for x, y in zip(jax.tree.leaves(value['trunk']), jax.tree.leaves(rm.params['trunk'])):
    np.testing.assert_array_equal(np.asarray(x), np.asarray(y))
  assert set(stage.frozen) == {'ref', 'rm'}
  for x, y in zip(jax.tree.leaves(stage.frozen['ref']), jax.tree.leaves(policy.params)):
    np.testing.assert_array_equal(np.asarray(x), np.asarray(y))
  mc = common.PolicyLora(rank=4).model(policy.mc)
  tokens = held_out_tokens(policy.tokenizer)
  sft_logits = logits(policy.mc, policy.params, tokens)
  assert_same_logits(logits(mc, policy.params, tokens, state['params']['policy']), sft_logits)
  rows = rows_of(workdir)
  assert len(rows) == 1 and abs(rows[0]['kl']) < 1e-4   # the rollout's policy is its reference
  assert {'eval_gold', 'eval_kl', 'eval_proxy'} <= set(rows[0])
  assert summary['ppo']['mode'] == 'lora'
  # The state: adapters and the value network (with their optimizer moments), no policy copy;
  # the full policy's state is near twice as large (its checkpoints are compressed, so the
  # comparison is of the states).
  full = ppo.build(ppo_config(sft_run, rm_dir), str(tmp_path / 'full'))
  assert lora_lib.tree_bytes(stage.abstract_state) < 0.6 * lora_lib.tree_bytes(
      full.abstract_state)
  saved, _ = runs.restore_params(workdir)
  adapters = saved['policy']
  assert adapter_names(adapters) == names
  assert lora_lib.tree_size(saved) == lora_lib.tree_size(state['params'])
  mc_l, merged, _, ident = runs.load_model(workdir)
  assert not mc_l.lora_rank and ident['step'] == 1
  own = logits(mc, policy.params, tokens, adapters)
  assert_same_logits(logits(mc_l, merged, tokens), own)
  assert np.abs(own - sft_logits).max() > 1e-4


@pytest.mark.parametrize('stage, rank, match', [
    ('dpo', -1, 'lora.rank=-1 must be >= 1'), ('dpo', 1000, 'lora.rank=1000 is larger than'),
    ('ppo', -1, 'lora.rank=-1 must be >= 1'), ('ppo', 1000, 'lora.rank=1000 is larger than')])
def test_bad_lora_ranks_are_refused(sft_run, rm_dir, tmp_path, stage, rank, match):
  cfg = dpo_config(sft_run, rm_dir) if stage == 'dpo' else ppo_config(sft_run, rm_dir)
  cfg.lora.rank = rank
  build = dpo.build if stage == 'dpo' else ppo.build
  with pytest.raises(UserError, match=match):
    build(cfg, str(tmp_path / 'x'))
  assert not os.path.exists(tmp_path / 'x')
