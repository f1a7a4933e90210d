"""Preference learning: the gold program, pairs, reward model, DPO and PPO (hand-worked numbers,
tiny models, and one small pipeline of real runs)."""
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
