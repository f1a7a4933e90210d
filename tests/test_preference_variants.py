"""Preference-loss variants (IPO, SimPO), pretraining replay in DPO, and LoRA policies for DPO and
PPO: the losses on hand-worked numbers, and tiny runs (learning, exact resume, adapters whose
reference is their base, LoRA runs read back by runs.load_model)."""
import functools
import json
import math
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from configs import dpo as dpo_cfg
from configs import reward as reward_cfg
from configs import sft as sft_cfg
from lm import runs
from lm.align import common, dpo, ppo, reward
from lm.data import code_task
from lm.data import replay as replay_lib
from lm.data import tokens as data_lib
from lm.errors import UserError
from lm.training import loop
from lm.model import lora as lora_lib
from lm.model import transformer as model_lib
from lm.stages import finetune as ft
from lm.stages import pretrain as train_lib
from tests.test_align import ppo_config, small, tiny_mc
from tests.test_finetune import assert_same_logits, logits, pretrain_config


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


@pytest.fixture(scope='module')
def rm_run(sft_run, tmp_path_factory):
  workdir = str(tmp_path_factory.mktemp('rm'))
  c = small(reward_cfg.get_config(), steps=6, eval_every=3, checkpoint_every=3)
  r = c.reward
  r.init_from, r.prompts, r.eval_prompts, r.samples_per_prompt = sft_run, 48, 24, 3
  r.max_new_tokens, r.sample_batch = 24, 48
  reward.train_reward(c, workdir)
  return workdir


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
def variant_runs(sft_run, rm_run, tmp_path_factory):
  """IPO and SimPO, 6 steps each on the reward run's pairs."""
  out = {}
  for loss in ('ipo', 'simpo'):
    workdir = str(tmp_path_factory.mktemp(loss))
    cfg = dpo_config(sft_run, rm_run, steps=6, held_out=loss == 'ipo', dpo__loss=loss)
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


def test_a_run_without_the_added_keys_still_resumes(sft_run, rm_run, tmp_path):
  """An old run's config.json (DPO: no dpo.loss, simpo_*, replay_fraction; DPO and PPO: no lora
  section) matches today's defaults (loop.ADDED_KEYS): the stage builds against it; other values
  are refused."""
  cfg = dpo_config(sft_run, rm_run)
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
    dpo.build(dpo_config(sft_run, rm_run, dpo__loss='ipo'), str(tmp_path / 'old'))
  cfg = ppo_config(sft_run, rm_run)
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
def replay_run(sft_run, rm_run, tmp_path_factory):
  workdir = str(tmp_path_factory.mktemp('replay'))
  return workdir, dpo.train_dpo(replay_config(sft_run, rm_run), workdir)


def test_replay_rows_are_pretraining_windows_and_their_loss_is_logged(replay_run, sft_run,
                                                                     rm_run):
  workdir, summary = replay_run
  stage = dpo.build(replay_config(sft_run, rm_run), workdir)
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
def test_replay_resume_is_bitwise_exact(replay_run, sft_run, rm_run, tmp_path):
  part = str(tmp_path / 'part')
  assert dpo.train_dpo(replay_config(sft_run, rm_run), part, stop_at=1)['finished'] is False
  dpo.train_dpo(replay_config(sft_run, rm_run), part)
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
def lora_dpo(sft_run, rm_run, tmp_path_factory):
  workdir = str(tmp_path_factory.mktemp('dpo_lora'))
  cfg = dpo_config(sft_run, rm_run, steps=2, lr=3e-3, lora__rank=4)
  return workdir, cfg, dpo.train_dpo(cfg, workdir)


def test_lora_dpo_holds_adapters_on_its_reference_and_loads_merged(lora_dpo, variant_runs,
                                                                   sft_run, rm_run, tmp_path):
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
  full = dpo.build(dpo_config(sft_run, rm_run), str(tmp_path / 'full'))
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
def lora_ppo(sft_run, rm_run, tmp_path_factory):
  workdir = str(tmp_path_factory.mktemp('ppo_lora'))
  cfg = ppo_config(sft_run, rm_run, steps=1)
  cfg.lora.rank = 4
  cfg.train.lr, cfg.train.warmup_steps = 1e-3, 0
  return workdir, cfg, ppo.train_ppo(cfg, workdir)


def test_lora_ppo_holds_adapters_and_one_copy_of_the_sft_weights(lora_ppo, sft_run, rm_run,
                                                                 tmp_path):
  workdir, cfg, summary = lora_ppo
  policy = common.load_policy(sft_run)
  stage = ppo.build(cfg, str(tmp_path / 'probe'))
  state = jax.device_get(stage.init_state())
  names = adapter_names(state['params']['policy'])
  assert names and all(n.endswith(('_a', '_b')) for n in names)
  rm = reward.load(rm_run)
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
  full = ppo.build(ppo_config(sft_run, rm_run), str(tmp_path / 'full'))
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
def test_bad_lora_ranks_are_refused(sft_run, rm_run, tmp_path, stage, rank, match):
  cfg = dpo_config(sft_run, rm_run) if stage == 'dpo' else ppo_config(sft_run, rm_run)
  cfg.lora.rank = rank
  build = dpo.build if stage == 'dpo' else ppo.build
  with pytest.raises(UserError, match=match):
    build(cfg, str(tmp_path / 'x'))
  assert not os.path.exists(tmp_path / 'x')
