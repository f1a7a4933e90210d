"""Fine-tuning: chat template, masking, packing, LoRA, the fine-tuning stage, resume, bad input."""
import functools
import json
import os
import subprocess
import sys

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest

from configs import base as base_cfg
from configs import sft as sft_cfg
from lm.stages import finetune as ft
from lm.data import instruct
from lm.model import lora as lora_lib
from lm.training import checkpoint as ckpt_lib
from lm.training import loop
from lm.model import transformer as model_lib
from lm.training import optim
from lm import runs
from lm.eval import sample as sample_lib
from lm.data import sft
from lm.data import tokenizer as tokenizer_lib
from lm.stages import pretrain as train_lib
from lm.config import ModelConfig
from lm.errors import UserError

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
BYTES = tokenizer_lib.ByteTokenizer()
CHAT = [{'role': 'system', 'content': 'Answer briefly.'},
        {'role': 'user', 'content': 'Déjà vu? Write "<|user|>" literally.'},
        {'role': 'assistant', 'content': 'Sure: <|user|> ✓'},
        {'role': 'user', 'content': 'and again\n\ttabbed'},
        {'role': 'assistant', 'content': 'ok'}]


def tiny_mc(**kw):
  d = dict(vocab_size=BYTES.vocab_size, n_layers=2, d_model=32, n_heads=4, n_kv_heads=2, d_ff=64,
           max_len=64)
  d.update(kw)
  return ModelConfig(**d)


def records(n, seed=0):
  rng = np.random.default_rng(seed)
  out = []
  for i in range(n):
    a, b = int(rng.integers(0, 100)), int(rng.integers(0, 100))
    out.append({'prompt': f'{a} + {b} =' + ' ' * int(rng.integers(0, 9)), 'response': str(a + b)})
  return out


# ---- the chat template ----------------------------------------------------------------------


@pytest.mark.parametrize('which', ['bytes', 'sentencepiece'])
def test_chat_template_round_trips(which, sp_tokenizer):
  tok = BYTES if which == 'bytes' else sp_tokenizer
  ids, mask = sft.encode_chat(tok, CHAT)
  assert ids[0] == tok.eos_id
  assert sft.decode_chat(tok, ids) == CHAT
  chat = tok.chat_ids
  assert list(ids).count(chat['end']) == len(CHAT)
  # The literal text "<|user|>" stays text: only the template's markers are chat tokens.
  assert list(ids).count(chat['user']) == 2
  prompt, _ = sft.encode_chat(tok, CHAT[:2], generation_prompt=True)
  assert prompt[-1] == chat['assistant'] and np.array_equal(prompt[:-1], ids[:len(prompt) - 1])


@pytest.mark.parametrize('which', ['bytes', 'sentencepiece'])
def test_loss_mask_counts_exactly_the_response_tokens(which, sp_tokenizer):
  tok = BYTES if which == 'bytes' else sp_tokenizer
  ids, mask = sft.encode_chat(tok, CHAT)
  replies = [m['content'] for m in CHAT if m['role'] == 'assistant']
  assert mask.sum() == sum(len(tok.encode(r)) + 1 for r in replies)   # content + each <|end|>
  # What the mask selects decodes to the replies, each followed by its end-of-turn token.
  picked = ids[mask]
  ends = np.flatnonzero(picked == tok.chat_ids['end'])
  assert len(ends) == len(replies)
  starts = np.concatenate([[0], ends[:-1] + 1])
  assert [tok.decode(picked[s:e]) for s, e in zip(starts, ends)] == replies
  # Packed: the weights are the masks shifted onto the targets, summed over the examples.
  ex = sft.Examples(records(12), tok, 48)
  packed = ex.pack(np.arange(len(ex)))
  want = sum(len(tok.encode(r['response'])) + 1 for r in ex.records)
  assert packed['weights'].sum() == want
  assert np.all(np.isin(packed['targets'][packed['weights'] > 0],
                        [tok.chat_ids['end']] + [i for d in '0123456789' for i in tok.encode(d)]))


# rope in the default suite; the other position encodings (same code path for segments) are slow.
@pytest.mark.parametrize('pos', ['rope', pytest.param('learned', marks=pytest.mark.slow),
                                 pytest.param('alibi', marks=pytest.mark.slow)])
def test_packed_losses_equal_each_example_alone(pos):
  mc = tiny_mc(pos=pos)
  params = model_lib.init_params(mc, jax.random.PRNGKey(1))
  ex = sft.Examples(records(10, seed=3), BYTES, 64)
  packed = ex.pack(np.arange(len(ex)))
  assert packed['tokens'].shape[0] < len(ex)                    # several examples share a row
  assert packed['segments'].max() > 1
  together = sft.example_losses(mc, params, packed)
  alone = np.concatenate([sft.example_losses(mc, params, ex.pack([i])) for i in range(len(ex))])
  np.testing.assert_allclose(together, alone, rtol=2e-5, atol=2e-6)
  # The mask really is what makes them equal: without segments the later examples differ.
  mixed = dict(packed, segments=np.ones_like(packed['segments']) * (packed['segments'] > 0))
  losses = [np.asarray(sft.token_losses(mc, params, {k: jnp.asarray(v) for k, v in b.items()}))
            for b in (packed, mixed)]
  assert np.abs(losses[0] - losses[1])[packed['weights'] > 0].max() > 1e-3


def test_packed_stream_is_a_pure_function_of_the_step():
  ex = sft.Examples(records(50), BYTES, 64)
  a, b = sft.PackedStream(ex, seed=0), sft.PackedStream(ex, seed=0)
  late = a.batch(40, 4)                         # reaches several epochs in
  for s in range(41):
    b.batch(s, 4)
  assert all(np.array_equal(late[k], b.batch(40, 4)[k]) for k in late)
  epoch0 = a.rows(0, a.rows_per_epoch())
  assert sorted(epoch0['weights'].sum(1).astype(int).tolist()) != []   # every row holds a reply
  assert (epoch0['segments'].max(1) >= 1).all()
  n_ex = sum(int(r.max()) for r in epoch0['segments'])
  assert n_ex == len(ex)                         # every example exactly once per epoch
  halves = [a.batch(0, 4, p, 2)['tokens'] for p in (0, 1)]
  assert np.array_equal(np.concatenate(halves), a.batch(0, 4)['tokens'])


# ---- LoRA -----------------------------------------------------------------------------------


LORA_ALL = ('q', 'k', 'v', 'o', 'up', 'gate', 'down')


# The scanned-layers variant (leaves with a layer axis) is slow; the loop variant runs by default.
@pytest.mark.parametrize('scan', [False, pytest.param(True, marks=pytest.mark.slow)])
def test_lora_starts_at_the_base_and_merges_exactly(scan):
  # Trained token rows too: in the tied table, and in an untied head with the scanned stack.
  mc = tiny_mc(mlp='swiglu', scan_layers=scan, lora_rank=4, lora_targets=LORA_ALL,
               lora_tokens=(3, 7), tie_embeddings=not scan)
  v = model_lib.init_variables(mc, jax.random.PRNGKey(0))
  params, adapters = v['params'], v['lora']
  plain = lora_lib.base_config(mc)
  tokens = jax.random.randint(jax.random.PRNGKey(1), (2, 24), 0, mc.vocab_size)
  base_logits = model_lib.apply(plain, params, tokens)
  assert np.array_equal(model_lib.apply(mc, params, tokens, adapters=adapters), base_logits)
  trained = jax.tree.map(lambda x: x + 0.05 * jax.random.normal(jax.random.PRNGKey(2), x.shape),
                         adapters)
  adapted = model_lib.apply(mc, params, tokens, adapters=trained)
  merged = model_lib.apply(plain, lora_lib.merge(mc, params, trained), tokens)
  assert np.abs(adapted - base_logits).max() > 0.05        # the adapters do change the model
  np.testing.assert_allclose(merged, adapted, atol=1e-5)


@pytest.mark.parametrize('kw', [dict(lora_targets=('q', 'v')),
                                dict(lora_targets=LORA_ALL, mlp='swiglu'),
                                dict(lora_targets=('k', 'o', 'down'), scan_layers=True, n_kv_heads=1),
                                dict(lora_targets=('q',), lora_tokens=(1, 2, 3)),
                                dict(lora_targets=('v',), lora_tokens=(4,), tie_embeddings=False)])
def test_trainable_count_matches_the_closed_form(kw):
  mc = tiny_mc(lora_rank=3, **kw)
  shapes = jax.eval_shape(lambda: model_lib.init_variables(mc, jax.random.PRNGKey(0)))
  assert lora_lib.tree_size(shapes['lora']) == lora_lib.trainable_count(mc)


def test_rank_16_on_a_4096_square_matrix_trains_131072_numbers():
  mc = ModelConfig(vocab_size=8, n_layers=1, d_model=4096, n_heads=32, n_kv_heads=32,
                   d_ff=4096, max_len=8, lora_rank=16, lora_targets=('q',))
  shapes = jax.eval_shape(lambda: model_lib.init_variables(mc, jax.random.PRNGKey(0)))
  q = shapes['params']['layer_0']['attn']['wq']
  assert np.prod(q.shape) == 4096 * 4096
  assert lora_lib.tree_size(shapes['lora']) == lora_lib.trainable_count(mc) == 131_072


def test_lora_gradients_and_optimizer_state_cover_the_adapters_only():
  mc = tiny_mc(lora_rank=2, lora_targets=('q', 'v', 'up'))
  v = model_lib.init_variables(mc, jax.random.PRNGKey(0))
  params, adapters = v['params'], v['lora']
  tc = optim.TrainConfig(steps=10, warmup_steps=1)
  opt = optim.make_optimizer(tc, adapters)
  state = {'params': adapters, 'opt_state': opt.init(adapters), 'step': jnp.zeros((), jnp.int32)}
  loss = lambda tr, base, b, rng: sft.masked_loss(mc, base, b, tr, rng)
  batch = {k: jnp.asarray(x) for k, x in
           sft.Examples(records(6), BYTES, 64).pack(np.arange(6)).items()}
  grads = jax.grad(lambda tr: loss(tr, params, batch, None)[0])(adapters)
  assert jax.tree.structure(grads) == jax.tree.structure(adapters)
  moments = [x for x in jax.tree.leaves(state['opt_state']) if x.ndim > 0]
  assert sum(x.size for x in moments) == 2 * lora_lib.trainable_count(mc)
  # The jitted step's gradient is taken of the adapters alone: no parameter-shaped cotangent
  # for any frozen matrix appears as an output of the differentiated function.
  step = loop.make_step(loss, tc, opt, 0)
  new, m = jax.jit(step)(state, params, batch)
  assert jax.tree.structure(new['params']) == jax.tree.structure(adapters)
  b_after = new['params']['layer_0']['attn']['wq_b']
  assert np.abs(np.asarray(b_after)).max() > 0            # B left zero: the adapters learn


def test_lora_plus_scales_the_b_updates_only():
  mc = tiny_mc(lora_rank=2, lora_targets=('q', 'up'), lora_tokens=(3,))
  adapters = model_lib.init_variables(mc, jax.random.PRNGKey(0))['lora']
  grads = jax.tree.map(lambda x: jax.random.normal(jax.random.PRNGKey(4), x.shape), adapters)
  tc = optim.TrainConfig(steps=10, warmup_steps=0, grad_clip=0.0)
  updates = {}
  for ratio in (1.0, 4.0):
    opt = optim.make_optimizer(tc, adapters, lora_b_lr_ratio=ratio)
    updates[ratio] = opt.update(grads, opt.init(adapters), adapters)[0]
  flat1 = jax.tree_util.tree_flatten_with_path(updates[1.0])[0]
  flat4 = jax.tree.leaves(updates[4.0])
  names = [str(path[-1].key) for path, _ in flat1]
  assert any(n.endswith('_b') for n in names) and 'embed_rows' in names
  for name, (_, u1), u4 in zip(names, flat1, flat4):
    np.testing.assert_allclose(u4, (4.0 if name.endswith('_b') else 1.0) * u1, rtol=1e-6)


# ---- the fine-tuning stage --------------------------------------------------------------------


def pretrain_config(cache_dir, **data):
  c = base_cfg.get_config()
  c.model.n_layers, c.model.d_model, c.model.n_heads, c.model.max_len = 2, 64, 4, 128
  c.data.max_bytes = 400_000
  c.data.cache_dir = cache_dir
  for k, v in data.items():
    c.data[k] = v
  t = dict(steps=150, batch_size=16, seq_len=64, lr=3e-3, warmup_steps=5, eval_every=150,
           eval_batches=2, log_every=10, checkpoint_every=150, progress='none')
  for k, v in t.items():
    c.train[k] = v
  return c


@pytest.fixture(scope='module')
def base_run(cache_dir, tmp_path_factory):
  workdir = str(tmp_path_factory.mktemp('base'))
  train_lib.train(pretrain_config(cache_dir), workdir)
  return workdir


@pytest.fixture(scope='module')
def user_data(tmp_path_factory):
  path = tmp_path_factory.mktemp('jsonl') / 'train.jsonl'
  with open(path, 'w') as f:
    for r in records(60, seed=5):
      f.write(json.dumps(r) + '\n')
    f.write(json.dumps({'messages': CHAT}) + '\n')
  return str(path)


def sft_config(init_from, data='builtin', **kw):
  c = sft_cfg.get_config()
  c.finetune.init_from = init_from
  c.finetune.data = data
  c.finetune.families = 'upper'
  c.finetune.train_per_family, c.finetune.eval_per_family = 400, 16
  c.finetune.max_new_tokens = 12
  c.finetune.eval_batch_size = 16
  t = dict(steps=8, batch_size=8, seq_len=96, lr=3e-3, warmup_steps=2, eval_every=8,
           eval_batches=2, log_every=2, checkpoint_every=4, progress='none')
  lora = {k[5:]: kw.pop(k) for k in list(kw) if k.startswith('lora_')}
  t.update(kw)
  for k, v in t.items():
    c.train[k] = v
  for k, v in lora.items():
    c.lora[k] = v
  return c


def final_state(workdir):
  import orbax.checkpoint as ocp
  steps = sorted(int(d) for d in os.listdir(f'{workdir}/checkpoints') if d.isdigit())
  mngr = ocp.CheckpointManager(os.path.abspath(f'{workdir}/checkpoints'))
  state = mngr.restore(steps[-1], args=ocp.args.StandardRestore())
  mngr.close()
  # On the host: restored as saved, the arrays would keep the run's device layout, which need not
  # be that of the arrays a test combines them with.
  return jax.device_get(state)


def recorded_config(workdir):
  """A run's config.json as the config its stage is built from."""
  return ml_collections.ConfigDict(runs.read_config(workdir))


def restored_by_stage(stage, workdir):
  """(state, step) of a run as its own stage holds it: the stage, built again from the run's
  config.json, must record exactly that config, and its state is restored the way the training
  loop resumes (lm/training/loop.py: Checkpoints.restore_latest onto the stage's abstract
  state), not through lm/runs.py."""
  assert stage.config == runs.read_config(workdir)
  ckpts = ckpt_lib.Checkpoints(os.path.join(workdir, 'checkpoints'),
                               stage.train.keep_checkpoints)
  try:
    state, step = ckpts.restore_latest(stage.abstract_state)
  finally:
    ckpts.close()
  assert state is not None and int(state['step']) == step
  return state, step


def stage_model(stage) -> ModelConfig:
  """The model a fine-tuning or preference stage built (its config.json's base.model), adapters
  included."""
  d = {k: tuple(v) if isinstance(v, list) else v for k, v in stage.config['base']['model'].items()}
  return ModelConfig(**d)


def loaded(workdir):
  """runs.load_model's (model config, params, identity) of a language-model run."""
  mc, params, _, ident = runs.load_model(workdir)
  assert not mc.lora_rank
  return mc, params, ident


@functools.partial(jax.jit, static_argnums=0)
def _logits(mc, params, tokens, adapters, positions, segments):
  return model_lib.apply(mc, params, tokens, adapters=adapters, positions_BT=positions,
                         segment_ids_BT=segments)


def logits(mc, params, tokens, adapters=None, positions=None, segments=None) -> np.ndarray:
  """Transformer(mc).apply of params (and a LoRA model's adapters) to tokens, jitted once per
  model and shape (an eager forward pass compiles every op anew: seconds). Arrays are taken to
  the host first, so a stage's sharded params and a loaded run's share one compilation."""
  return np.asarray(_logits(mc, *jax.device_get((params, tokens, adapters, positions, segments))))


def assert_same_logits(got, want):
  """Equal up to float rounding: 1e-5 of the logits' scale (LoRA merge rounding included)."""
  want = np.asarray(want)
  np.testing.assert_allclose(np.asarray(got), want, rtol=1e-5, atol=1e-5 * np.abs(want).max())


@pytest.fixture(scope='module')
def lora_run(base_run, user_data, tmp_path_factory):
  workdir = str(tmp_path_factory.mktemp('lora'))
  summary = ft.finetune(sft_config(base_run, user_data, lora_rank=4), workdir)
  return workdir, summary


def test_lora_run_workdir_names_its_base_and_holds_only_adapters(lora_run, base_run):
  workdir, summary = lora_run
  for name in ('config.json', 'manifest.json', 'metrics.jsonl', 'summary.json', 'tokenizer',
               ft.BASE_EVAL):
    assert os.path.exists(os.path.join(workdir, name)), name
  cfg = json.load(open(os.path.join(workdir, 'config.json')))
  assert cfg['base']['workdir'] == os.path.abspath(base_run)
  assert cfg['base']['params_sha256'] == runs.load_model(base_run)[3]['params_sha256']
  s = summary['finetune']
  assert s['mode'] == 'lora' and s['trainable_params'] == s['lora_closed_form']
  assert s['trainable_fraction'] == s['trainable_params'] / s['base_params']
  state = final_state(workdir)
  leaves = jax.tree.leaves(state['params'])
  assert sum(x.size for x in leaves) == s['trainable_params']   # adapters, not the base
  assert 0 < s['checkpoint_bytes'] and s['optimizer_state_bytes'] > 0
  d = s['data']
  assert d['eval']['examples'] + d['eval']['dropped_too_long'] == 3     # 5% of 61, held out
  assert d['train']['examples'] + d['train']['dropped_too_long'] == 58
  assert d['train']['dropped_too_long'] + d['eval']['dropped_too_long'] == 1   # the long chat
  rows = [json.loads(line) for line in open(os.path.join(workdir, 'metrics.jsonl'))]
  assert [r['step'] for r in rows if 'eval_loss' in r] == [8]
  assert 'pretrain_eval_loss' in rows[-1]
  assert summary['finetune']['before']['pretrain_eval_loss'] > 0


def test_lora_resume_is_bitwise_exact(lora_run, base_run, user_data, tmp_path):
  workdir = str(tmp_path / 'killed')
  cfg = sft_config(base_run, user_data, lora_rank=4)
  partial = ft.finetune(cfg, workdir, stop_at=4)
  assert partial['finished'] is False
  resumed = ft.finetune(cfg, workdir)
  assert resumed['final_loss'] == lora_run[1]['final_loss']
  for a, b in zip(jax.tree.leaves(final_state(workdir)['params']),
                  jax.tree.leaves(final_state(lora_run[0])['params'])):
    np.testing.assert_array_equal(a, b)


def test_merge_writes_a_plain_model_with_the_adapted_logits(lora_run, tmp_path):
  workdir, _ = lora_run
  mc_l, params_l, tok, _ = runs.load_model(workdir)           # merged in memory
  cfg = json.load(open(os.path.join(workdir, 'config.json')))
  mc_a = runs.model_config(cfg)
  base = runs.load_model(cfg['base']['workdir'])[1]
  adapters = final_state(workdir)['params']
  tokens = jnp.asarray(sft.encode_chat(tok, CHAT[1:3])[0][None, :48])
  adapted = model_lib.apply(mc_a, base, tokens, adapters=adapters)
  out = str(tmp_path / 'merged')
  ft.merge(workdir, out)
  mc_m, params_m, _, _ = runs.load_model(out)                  # an ordinary run folder
  np.testing.assert_allclose(model_lib.apply(mc_m, params_m, tokens), adapted, atol=1e-5)
  np.testing.assert_allclose(model_lib.apply(mc_l, params_l, tokens), adapted, atol=1e-5)
  assert np.abs(adapted - model_lib.apply(mc_m, base, tokens)).max() > 1e-4
  with pytest.raises(UserError, match='already holds a run'):
    ft.merge(workdir, out)


def test_lora_and_merged_runs_load_with_the_logits_of_the_lora_stage(lora_run, tmp_path):
  """runs.load_model of a LoRA run (adapters merged into the base) and of its merged folder give
  the logits of the stage's own LoRA model: the base it holds frozen plus the adapters it
  restores, unmerged, on its own first training batch (packed: positions and segments)."""
  workdir, _ = lora_run
  stage = ft.build(recorded_config(workdir), workdir).stage
  state, step = restored_by_stage(stage, workdir)
  mc = stage_model(stage)
  assert mc.lora_rank == 4 and mc.lora_tokens      # adapters and trained chat-token rows
  batch = jax.device_get(stage.batch(0))
  tokens, packing = batch['tokens'], dict(positions=batch['positions'], segments=batch['segments'])
  assert batch['segments'].max() > 1               # packed rows: the segment masks matter
  own = logits(mc, stage.frozen, tokens, adapters=state['params'], **packing)
  mc_l, params_l, ident = loaded(workdir)
  assert ident['step'] == step == 8
  assert_same_logits(logits(mc_l, params_l, tokens, **packing), own)
  # The adapters matter: the base's own logits are far from the adapted ones.
  assert np.abs(own - logits(mc_l, stage.frozen, tokens, **packing)).max() > 1e-2
  out = str(tmp_path / 'merged')
  ft.merge(workdir, out)
  mc_m, params_m, ident_m = loaded(out)
  assert runs.kind(runs.read_config(out)) == 'pretrain' and mc_m == mc_l
  assert ident_m['step'] == step
  assert_same_logits(logits(mc_m, params_m, tokens, **packing), own)


@pytest.mark.slow   # 35 s; measured in docs/results/instruction_tuning, the fine-tuning mechanics stay
def test_finetuning_one_family_beats_the_base_on_held_out_instances(base_run, tmp_path):
  workdir = str(tmp_path / 'module')
  cfg = sft_config(base_run, steps=300, eval_every=300, checkpoint_every=300, warmup_steps=10,
                   batch_size=16, lr=3e-3)
  cfg.finetune.families = 'module'
  cfg.finetune.eval_per_family = 32
  summary = ft.finetune(cfg, workdir)
  s = summary['finetune']
  before, after = s['before']['acc/module'], s['after']['acc/module']
  assert before == 0.0 and after >= 0.1, (before, after)     # at least 4 of 32 exact
  assert s['after']['eval_loss'] < s['before']['eval_loss'] - 1.0
  # The chat template is what `run.py sample` applies to a fine-tuned run.
  mc, params, tok, _ = runs.load_model(workdir)
  replies = sample_lib.chat(mc, params, tok, [{'role': 'user', 'content': 'Upper-case abc.'}],
                            max_new_tokens=8, temperature=0.0)
  assert len(replies) == 1 and len(replies[0]) <= 8


# ---- bad input --------------------------------------------------------------------------------


@pytest.mark.parametrize('line,match', [
    ('{"prompt": "a", "response": "b"}\nnot json\n', r'train.jsonl:2 is not valid JSON'),
    ('{"prompt": "a"}\n', r'train.jsonl:1 lacks the string field "response"'),
    ('{"prompt": "a", "response": "  "}\n', r'train.jsonl:1 has an empty response'),
    ('{"messages": [{"role": "user", "content": "hi"}]}\n', r'has no assistant message'),
    ('{"messages": [{"role": "bot", "content": "hi"}]}\n', r'needs "role"'),
    ('\n', r'holds no examples'),
])
def test_bad_jsonl_lines_are_named(tmp_path, line, match):
  path = tmp_path / 'train.jsonl'
  path.write_text(line)
  with pytest.raises(UserError, match=match):
    sft.load_jsonl(str(path))


def test_examples_longer_than_seq_len_are_counted_not_cut():
  recs = records(5) + [{'prompt': 'x' * 200, 'response': 'y'}]
  ex = sft.Examples(recs, BYTES, 64)
  assert len(ex) == 5 and ex.too_long == 1 and ex.info()['dropped_too_long'] == 1
  with pytest.raises(UserError, match='longer than train.seq_len=64'):
    sft.Examples(recs[-1:], BYTES, 64)


@pytest.mark.parametrize('kw,match', [
    (dict(lora_rank=-1), r'lora.rank=-1 must be >= 1'),
    (dict(lora_rank=100), r'lora.rank=100 is larger than the 64x64'),
    (dict(lora_rank=2, lora_targets='q,zz'), r"lora.targets names 'zz'"),
    (dict(lora_rank=2, lora_targets='gate'), r"has no gate matrix"),
    (dict(lora_rank=2, lora_train_tokens='embed'), r"lora.train_tokens='embed' must be"),
    (dict(lora_rank=2, lora_train_tokens='5,9999'), r"token id 9999, outside the vocabulary"),
])
def test_bad_lora_settings_are_refused(base_run, tmp_path, kw, match):
  workdir = tmp_path / 'bad'
  with pytest.raises(UserError, match=match):
    ft.finetune(sft_config(base_run, **kw), str(workdir))
  assert not (workdir / 'checkpoints').exists()


def test_bad_bases_are_refused(cache_dir, base_run, tmp_path):
  with pytest.raises(UserError, match='has no config.json'):
    ft.finetune(sft_config(str(tmp_path / 'nowhere')), str(tmp_path / 'a'))
  empty = tmp_path / 'empty'
  empty.mkdir()
  (empty / 'config.json').write_text(json.dumps(pretrain_config(cache_dir).to_dict()))
  with pytest.raises(UserError, match='neither finished nor resumable'):
    ft.finetune(sft_config(str(empty)), str(tmp_path / 'b'))
  with pytest.raises(UserError, match="longer than the base model's max_len=128"):
    ft.finetune(sft_config(base_run, seq_len=256), str(tmp_path / 'c'))


def test_base_without_chat_tokens_is_refused(cache_dir, tmp_path):
  old = str(tmp_path / 'old')
  cfg = pretrain_config(cache_dir, chat_tokens=False)
  cfg.train.steps, cfg.train.eval_every, cfg.train.checkpoint_every = 2, 2, 2
  cfg.train.warmup_steps = 1
  train_lib.train(cfg, old)
  with pytest.raises(UserError, match='has no chat tokens'):
    ft.finetune(sft_config(old), str(tmp_path / 'ft'))


def test_changed_base_refuses_to_resume_and_keeps_the_run(base_run, user_data, tmp_path):
  """A resume whose base weights changed is refused by name; the run's files are untouched."""
  import shutil
  base_copy, run_copy = str(tmp_path / 'base'), str(tmp_path / 'run')
  shutil.copytree(base_run, base_copy)
  cfg = sft_config(base_copy, user_data, lora_rank=4)
  ft.finetune(cfg, run_copy, stop_at=4)
  steps = [int(d) for d in os.listdir(os.path.join(base_copy, 'checkpoints')) if d.isdigit()]
  _perturb_checkpoint(base_copy, max(steps))        # same shapes and step, other weights
  before = sorted(os.listdir(os.path.join(run_copy, 'checkpoints')))
  cfg_before = open(os.path.join(run_copy, 'config.json')).read()
  with pytest.raises(UserError, match=r'base\.params_sha256'):
    ft.finetune(cfg, run_copy)
  assert sorted(os.listdir(os.path.join(run_copy, 'checkpoints'))) == before
  assert open(os.path.join(run_copy, 'config.json')).read() == cfg_before


def _perturb_checkpoint(workdir, step):
  """Rewrites the checkpoint at `step` with every parameter nudged (other weights, same shapes)."""
  from lm.training import checkpoint as ckpt_lib
  import orbax.checkpoint as ocp
  import shutil
  d = os.path.join(workdir, 'checkpoints')
  mngr = ocp.CheckpointManager(os.path.abspath(d))
  state = mngr.restore(step, args=ocp.args.StandardRestore())
  mngr.close()
  shutil.rmtree(os.path.join(d, str(step)))
  state['params'] = jax.tree.map(lambda x: x + 1e-3, state['params'])
  c = ckpt_lib.Checkpoints(d, 5)
  c.save(step, state)
  c.close()


def test_cli_finetune_reports_a_bad_jsonl_in_one_sentence(base_run, tmp_path):
  bad = tmp_path / 'bad.jsonl'
  bad.write_text('{"prompt": "a", "response": "b"}\n{"prompt": 3}\n')
  out = subprocess.run([sys.executable, 'run.py', 'finetune', '--config=configs/sft.py',
                        f'--workdir={tmp_path / "w"}', f'--config.finetune.init_from={base_run}',
                        f'--config.finetune.data={bad}'], cwd=REPO, capture_output=True,
                       text=True, timeout=300)
  assert out.returncode == 2
  assert out.stderr.strip().splitlines() == [
      f'error: {bad}:2 lacks the string field "prompt"; each line needs "prompt" and "response" '
      '(or "messages").']


def test_eval_of_a_finetuned_run_uses_the_chat_template(lora_run):
  from configs import eval as eval_cfg
  from lm.eval import evaluate as ev
  workdir, _ = lora_run
  e = eval_cfg.get_config().eval
  e.max_tokens, e.examples, e.batch_size = 2000, 16, 16
  res = ev.evaluate_run(workdir, e)
  assert res['format'] == 'chat' and res['shots'] == 0 and list(res['tasks']) == ['instruct']
  inst = res['tasks']['instruct']
  assert set(inst['groups']) == set(instruct.FAMILIES) and inst['n'] == 16
  assert all(g['n'] == 2 for g in inst['groups'].values())
  assert inst['logprob'] < 0 and 0 <= inst['exact'] <= inst['partial'] + 1e-9 <= 1 + 1e-9
  # The validation split is the base run's (pretraining) corpus, tokenized by this run.
  assert 'pystdlib' in res['text']['val']['source'] and res['text']['val']['tokens'] == 2000
  assert json.load(open(os.path.join(workdir, 'eval.json')))['run']['workdir'] == \
      os.path.abspath(workdir)


def test_streamed_chat_reply_equals_the_batched_one(lora_run):
  from lm import chat as chat_lib
  workdir, _ = lora_run
  mc, params, tok = chat_lib.load_chat_model(workdir)
  msgs = [{'role': 'user', 'content': 'Reverse the word: python'}]
  for temperature, seed in ((0.0, 0), (1.0, 3)):
    want = sample_lib.chat(mc, params, tok, msgs, max_new_tokens=20, temperature=temperature,
                           seed=seed)[0]
    c = chat_lib.Chat(mc, params, tok, max_new_tokens=20, temperature=temperature, seed=seed)
    pieces = []
    got = c.reply(msgs[0]['content'], pieces.append)
    assert got == want and ''.join(pieces) == got
  assert [m['role'] for m in c.history] == ['user', 'assistant']
  # A long conversation drops its oldest turns instead of running past max_len.
  c = chat_lib.Chat(mc, params, tok, max_new_tokens=16, temperature=0.0)
  notes = []
  for _ in range(6):
    c.reply('Sort these numbers from smallest to largest: 32 5 17 9 1', notes.append)
  assert '(earlier turns dropped to fit the context)\n' in notes
  ids = sft.encode_chat(tok, c.history, generation_prompt=False)[0]
  assert len(ids) <= mc.max_len + 16


def test_chat_in_a_terminal(lora_run):
  """Drives `run.py chat` through a pseudo-terminal: a question, a streamed answer, /quit."""
  import pty
  import select
  import time
  workdir, _ = lora_run
  master, slave = pty.openpty()
  proc = subprocess.Popen([sys.executable, 'run.py', 'chat', f'--workdir={workdir}',
                           '--temperature=0', '--max_new_tokens=12'], cwd=REPO, stdin=slave,
                          stdout=slave, stderr=slave, close_fds=True)
  os.close(slave)
  seen = b''

  def read_until(marker: bytes, after=0, timeout=120.0):
    nonlocal seen
    end = time.time() + timeout
    while marker not in seen[after:] and time.time() < end:
      ready, _, _ = select.select([master], [], [], 1.0)
      if ready:
        try:
          seen += os.read(master, 4096)
        except OSError:
          break
    return marker in seen[after:]

  try:
    assert read_until(b'you> '), seen
    os.write(master, b'Reverse the word: python\n')
    start = len(seen)
    assert read_until(b'assistant> ', start), seen
    assert read_until(b'you> ', seen.index(b'assistant> ', start)), seen
    answer = seen[start:].split(b'assistant> ', 1)[1].split(b'you> ')[0]
    assert answer.strip(), seen
    os.write(master, b'/quit\n')
    assert proc.wait(timeout=60) == 0
  finally:
    if proc.poll() is None:
      proc.kill()
    os.close(master)


def test_chat_refuses_runs_that_do_not_chat(base_run, tmp_path):
  from lm import chat as chat_lib
  with pytest.raises(UserError, match='is a pretrained run, which never learned the chat'):
    chat_lib.load_chat_model(base_run)
  with pytest.raises(UserError, match='is not a run folder'):
    chat_lib.load_chat_model(str(tmp_path))


# ---- replay of the pretraining corpus --------------------------------------------------------


def test_replay_share_rows_and_resume(base_run, user_data, tmp_path):
  """finetune.replay_fraction: that share of every batch's rows are windows of the base's
  pretraining corpus (loss on all their tokens), a pure function of the step, and an
  interrupted run resumes bitwise."""
  from lm.data import replay as replay_lib
  cfg = sft_config(base_run, user_data)
  cfg.finetune.replay_fraction = 0.25
  job = ft.build(cfg, str(tmp_path / 'probe'))
  b = jax.device_get(job.stage.batch(3))
  assert b['tokens'].shape == (8, 96)
  r = b['replay']
  assert r[:6].sum() == 0 and r[6:].min() == 1          # 6 own rows, then 2 replay rows
  np.testing.assert_array_equal(b['weights'][6:], 1.0)  # every replay token counts
  np.testing.assert_array_equal(b['positions'][6], np.arange(96))
  np.testing.assert_array_equal(b['tokens'][6:, 1:], b['targets'][6:, :-1])
  # The replay rows are windows of the base run's training split.
  corpus = runs.pretrain_corpus(base_run, runs.load_tokenizer(base_run))
  train = np.asarray(corpus.tokens('train'))
  for row in b['tokens'][6:]:
    start = np.flatnonzero(train[:len(train) - 96] == row[0])
    assert any((train[s:s + 96] == row).all() for s in start)
  np.testing.assert_array_equal(jax.device_get(job.stage.batch(3))['tokens'], b['tokens'])
  assert not (jax.device_get(job.stage.batch(4))['tokens'][6:] == b['tokens'][6:]).all()
  # The own rows are the stream's rows 6*step.., as without replay at a batch of 6.
  stream = sft.PackedStream(sft.Examples(ft.load_records(ft.FinetuneConfig.from_config(cfg))[
      'train'], runs.load_tokenizer(base_run), 96), int(cfg.seed))
  np.testing.assert_array_equal(b['tokens'][:6], stream.batch(3, 6)['tokens'])
  assert replay_lib.split(16, 0.25) == 4 and replay_lib.split(16, 0.0) == 0

  full = ft.finetune(cfg, str(tmp_path / 'full'))
  rows = [json.loads(line) for line in open(tmp_path / 'full' / 'metrics.jsonl')]
  assert all('replay_loss' in x and 'sft_loss' in x for x in rows if 'loss' in x)
  assert full['finetune']['replay']['rows_per_step'] == 2
  part = str(tmp_path / 'part')
  assert ft.finetune(cfg, part, stop_at=4)['finished'] is False
  assert ft.finetune(cfg, part)['final_loss'] == full['final_loss']
  for x, y in zip(jax.tree.leaves(final_state(part)['params']),
                  jax.tree.leaves(final_state(str(tmp_path / 'full'))['params'])):
    np.testing.assert_array_equal(x, y)


@pytest.mark.parametrize('share, match', [(1.0, r'must be in \[0, 1\)'),
                                          (-0.1, r'must be in \[0, 1\)'),
                                          (0.01, 'gives 0 replay rows')])
def test_bad_replay_shares_are_refused(base_run, user_data, tmp_path, share, match):
  cfg = sft_config(base_run, user_data)
  cfg.finetune.replay_fraction = share
  with pytest.raises(UserError, match=match):
    ft.build(cfg, str(tmp_path / 'x'))
  assert not os.path.exists(tmp_path / 'x')


def test_mixed_loss_weighs_each_parts_mean_by_its_share():
  mc = tiny_mc()
  params = model_lib.init_params(mc, jax.random.PRNGKey(0))
  rng = np.random.default_rng(0)
  T = 16
  batch = {'tokens': rng.integers(0, 256, (4, T)).astype(np.int32),
           'targets': rng.integers(0, 256, (4, T)).astype(np.int32),
           'weights': np.zeros((4, T), np.float32), 'segments': np.ones((4, T), np.int32),
           'positions': np.tile(np.arange(T, dtype=np.int32), (4, 1)),
           'replay': np.zeros((4, T), np.float32)}
  batch['weights'][:3, 10:14] = 1.0         # three rows of chat examples, 4 counted tokens each
  batch['weights'][3] = 1.0                 # one replay row, every token counted
  batch['replay'][3] = 1.0
  b = {k: jnp.asarray(v) for k, v in batch.items()}
  losses = np.asarray(sft.token_losses(mc, params, b))
  chat = (losses * batch['weights'])[:3].sum() / 12
  replay = losses[3].mean()
  total, (weight, parts) = sft.mixed_loss(mc, params, b, 0.25)
  assert float(weight) == 12 + T
  assert float(total / weight) == pytest.approx(0.75 * chat + 0.25 * replay, rel=1e-5)
  assert float(parts['sft_loss'] / weight) == pytest.approx(chat, rel=1e-5)
  assert float(parts['replay_loss'] / weight) == pytest.approx(replay, rel=1e-5)
