"""Hugging Face interchange (lm/interop/hf.py): logit parity with `transformers` both ways, bitwise round
trips, tokenizer parity, greedy generation, continued pretraining of an imported model, and the
refusals. Needs torch and transformers (requirements-test.txt); CI sets LM_REQUIRE_HF=1 so that
their absence fails instead of skipping."""
import glob
import json
import os
import random
import subprocess
import sys

import jax
import numpy as np
import pytest

if os.environ.get('LM_REQUIRE_HF'):
  import torch
  import transformers
else:
  torch = pytest.importorskip('torch')
  transformers = pytest.importorskip('transformers')

from configs import base as base_cfg
from lm.interop import hf
from lm.stages import finetune as ft
from lm.model import transformer as model_lib
from lm import runs
from lm.eval import sample as sample_lib
from lm.data import tokenizer as tokenizer_lib
from lm.stages import pretrain as train_lib
from lm.errors import UserError
from tests.test_finetune import logits   # jitted: an eager forward pass compiles every op

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
STDLIB = os.path.dirname(json.__file__)
TOL = 1e-4


def _texts():
  """Test strings: lines of stdlib code, unicode, whitespace runs."""
  files = sorted(glob.glob(os.path.join(STDLIB, '*.py')))
  lines = [ln for f in files for ln in open(f, encoding='utf-8').read().split('\n')]
  rng = random.Random(0)
  out = ['', ' ', 'a   b', '    return x', 'x\n\n    y', '\t\tx = 1\n', 'trailing  ',
         'héllo wörld ✓ 日本語 🙂', 'naïve café', '\u00a0nbsp', 'tab\there', 'CRLF\r\nline']
  while len(out) < 300:
    i = rng.randrange(len(lines) - 3)
    out.append('\n'.join(lines[i:i + rng.randint(1, 3)]))
  return out


TEXTS = _texts()


@pytest.fixture(scope='module')
def hf_tokenizer_dir(tmp_path_factory):
  """A byte-level BPE tokenizer trained here with `tokenizers`, saved as transformers saves it."""
  from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
  t = Tokenizer(models.BPE())
  t.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
  t.decoder = decoders.ByteLevel()
  trainer = trainers.BpeTrainer(vocab_size=400, special_tokens=['<|endoftext|>'],
                                initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
                                show_progress=False)
  t.train(sorted(glob.glob(os.path.join(STDLIB, '*.py'))), trainer)
  fast = transformers.PreTrainedTokenizerFast(tokenizer_object=t, bos_token='<|endoftext|>',
                                              eos_token='<|endoftext|>')
  out = str(tmp_path_factory.mktemp('hf_tok'))
  fast.save_pretrained(out)
  return out


def make_hf_model(out, tokenizer_dir, family, kv=4, tied=True, seed=0):
  """A small random transformers model (weights perturbed so that norms and biases matter)."""
  torch.manual_seed(seed)
  vocab = len(transformers.AutoTokenizer.from_pretrained(tokenizer_dir)) + 5   # spare rows
  if family == 'gpt2':
    cfg = transformers.GPT2Config(vocab_size=vocab, n_embd=32, n_layer=2, n_head=4,
                                  n_positions=64, bos_token_id=0, eos_token_id=0)
    model = transformers.GPT2LMHeadModel(cfg)
  else:
    cfg = transformers.LlamaConfig(vocab_size=vocab, hidden_size=32, intermediate_size=48,
                                   num_hidden_layers=2, num_attention_heads=4,
                                   num_key_value_heads=kv, tie_word_embeddings=tied,
                                   max_position_embeddings=64, rope_theta=500.0,
                                   bos_token_id=0, eos_token_id=0)
    model = transformers.LlamaForCausalLM(cfg)
  with torch.no_grad():
    for p in model.parameters():
      p.add_(0.05 * torch.randn_like(p))
  model.save_pretrained(out)
  transformers.AutoTokenizer.from_pretrained(tokenizer_dir).save_pretrained(out)
  # The reference is the model as transformers loads it back from the folder.
  return transformers.AutoModelForCausalLM.from_pretrained(out).eval()


def hf_logits(model, tokens):
  with torch.no_grad():
    return model(torch.tensor(np.asarray(tokens), dtype=torch.long)).logits.numpy()


def tokens_for(vocab, shape=(2, 24), seed=1):
  return np.random.default_rng(seed).integers(0, vocab, shape)


def assert_same_logits(mc, params, model, vocab=None):
  """This codebase's logits for random tokens equal the transformers model's (its first `vocab`
  columns; the model's whole vocabulary by default)."""
  vocab = vocab or mc.vocab_size
  x = tokens_for(vocab)
  ours = np.asarray(model_lib.apply(mc, params, x))[..., :vocab]
  np.testing.assert_allclose(ours, hf_logits(model, x), atol=TOL, rtol=0)


def imported(tmp_path_factory, tokenizer_dir, family, **kw):
  """(HF folder, its transformers model, the run imported from it)."""
  src = str(tmp_path_factory.mktemp(f'{family}_hf'))
  ref = make_hf_model(src, tokenizer_dir, family, **kw)
  run = str(tmp_path_factory.mktemp(f'{family}_run'))
  hf.import_model(src, run, overwrite=True)
  return src, ref, run


def load_direct(folder):
  """lm/interop/hf.py's import path without writing a run: config, tensors, params."""
  with open(os.path.join(folder, 'config.json')) as f:
    family, mc = hf.model_config_from_hf(json.load(f), folder)
  tensors = hf.read_safetensors(folder, hf._expected_shapes(mc, family), family)
  return mc, hf.from_hf(mc, family, tensors)


# ---- import: transformers -> here -----------------------------------------------------------


@pytest.fixture(scope='module')
def imported_gpt2(hf_tokenizer_dir, tmp_path_factory):
  return imported(tmp_path_factory, hf_tokenizer_dir, 'gpt2')


def test_imported_gpt2_run_gives_transformers_logits(imported_gpt2):
  _, ref, run = imported_gpt2
  mc, params, tok, _ = runs.load_model(run)
  assert_same_logits(mc, params, ref)
  assert tok.name == 'hf' and tok.eos_id == 0


def test_eval_of_an_imported_run_matches_transformers_loss(imported_gpt2, tmp_path):
  """run.py eval on an imported model: its loss on a text equals the cross-entropy that
  transformers computes on the same tokens."""
  from configs import eval as eval_cfg
  from lm.eval import evaluate as ev
  _, ref, run = imported_gpt2
  text = 'def add(a, b):\n    return a + b\n'
  (tmp_path / 'snippet.txt').write_text(text)
  e = eval_cfg.get_config().eval
  e.val, e.corpora, e.tasks, e.examples, e.seq_len = False, str(tmp_path / 'snippet.txt'), \
      'arith1', 4, 63
  res = ev.evaluate_run(run, e)
  got = res['text'][str(tmp_path / 'snippet.txt')]
  _, _, tok, _ = runs.load_model(run)
  ids = np.asarray([tok.eos_id] + list(tok.encode(text)) + [tok.eos_id])[None]
  assert ids.shape[1] <= 64 and got['tokens'] == ids.shape[1] - 1
  logits = hf_logits(ref, ids[:, :-1]).astype(np.float64)
  logp = logits - np.log(np.exp(logits - logits.max(-1, keepdims=True)).sum(-1, keepdims=True)) \
      - logits.max(-1, keepdims=True)
  nll = -np.take_along_axis(logp, ids[:, 1:, None], -1).mean()
  assert got['loss'] == pytest.approx(nll, rel=1e-4)
  assert got['bytes'] == len(text.encode()) and res['tasks']['arith1']['n'] == 4


@pytest.mark.parametrize('kv,tied', [(1, True), (2, False), (4, True), (4, False)])
def test_imported_llama_gives_transformers_logits(hf_tokenizer_dir, tmp_path, kv, tied):
  ref = make_hf_model(str(tmp_path), hf_tokenizer_dir, 'llama', kv=kv, tied=tied, seed=kv)
  mc, params = load_direct(str(tmp_path))
  assert (mc.n_kv_heads, mc.tie_embeddings, mc.rope_base) == (kv, tied, 500.0)
  assert_same_logits(mc, params, ref)


@pytest.fixture(scope='module')
def imported_llama(hf_tokenizer_dir, tmp_path_factory):
  return imported(tmp_path_factory, hf_tokenizer_dir, 'llama', kv=2, tied=False, seed=7)


def test_imported_llama_run_gives_transformers_logits(imported_llama):
  """runs.load_model of an imported Llama run (2 kv heads, untied head) gives the logits of the
  transformers model it came from (an imported GPT-2 run: the first test of this file)."""
  _, ref, run = imported_llama
  assert runs.kind(runs.read_config(run)) == 'pretrain'
  mc, params, _, ident = runs.load_model(run)
  assert (mc.n_kv_heads, mc.tie_embeddings, ident['step']) == (2, False, 0)
  x = tokens_for(mc.vocab_size)
  np.testing.assert_allclose(logits(mc, params, x), hf_logits(ref, x), atol=TOL, rtol=0)


def test_greedy_generation_equals_transformers_generate(imported_llama):
  _, ref, run = imported_llama
  mc, params, _, _ = runs.load_model(run)
  prompt = [5, 17, 42, 8, 99, 3]
  ours = sample_lib.generate_tokens(mc, params, [prompt], 32, temperature=0.0)[0]
  with torch.no_grad():
    theirs = ref.generate(torch.tensor([prompt]), max_new_tokens=32, do_sample=False,
                          eos_token_id=None, pad_token_id=0)[0, len(prompt):].numpy()
  assert ours.tolist() == theirs.tolist()


def test_imported_tokenizer_encodes_like_transformers(imported_gpt2, hf_tokenizer_dir):
  tok = tokenizer_lib.load_tokenizer(os.path.join(imported_gpt2[2], 'tokenizer'))
  theirs = transformers.AutoTokenizer.from_pretrained(hf_tokenizer_dir)
  for s in TEXTS:
    assert tok.encode(s) == theirs.encode(s, add_special_tokens=False), repr(s)
  assert tok.decode(tok.encode(TEXTS[7])) == TEXTS[7]


# ---- export: here -> transformers -----------------------------------------------------------


def small_run_config(cache_dir, steps=3, **model):
  c = base_cfg.get_config()
  m = dict(n_layers=2, d_model=32, n_heads=4, max_len=64, pos='rope', norm='rmsnorm',
           mlp='swiglu', n_kv_heads=2, tie_embeddings=False)
  m.update(model)
  for k, v in m.items():
    c.model[k] = v
  c.data.max_bytes, c.data.cache_dir = 200_000, cache_dir
  for k, v in dict(steps=steps, batch_size=4, seq_len=32, warmup_steps=1, eval_every=steps,
                   eval_batches=1, checkpoint_every=steps, progress='none').items():
    c.train[k] = v
  return c


@pytest.fixture(scope='module')
def exported_llama(cache_dir, tmp_path_factory):
  """A run trained here (SwiGLU, RoPE, 2 kv heads, untied), exported in 4 shards."""
  run = str(tmp_path_factory.mktemp('trained'))
  train_lib.train(small_run_config(cache_dir), run)
  out = str(tmp_path_factory.mktemp('exported'))
  info = hf.export_run(run, out, overwrite=True, max_shard_bytes=40_000)
  return run, out, info


def test_exported_run_loads_in_transformers_with_the_same_logits(exported_llama):
  run, out, info = exported_llama
  assert info['family'] == 'llama'
  assert os.path.isfile(os.path.join(out, hf.SAFE_INDEX)) and len(
      glob.glob(os.path.join(out, 'model-*.safetensors'))) > 1
  model = transformers.AutoModelForCausalLM.from_pretrained(out).eval()
  assert type(model).__name__ == 'LlamaForCausalLM'
  mc, params, _, _ = runs.load_model(run)
  assert_same_logits(mc, params, model)


def test_exported_mup_run_folds_its_multipliers(cache_dir, tmp_path):
  """A μP run (tied, width 2x its base, head dim 2x the base's) exports in standard form, with an
  untied head, and transformers computes its logits."""
  cfg = small_run_config(cache_dir, tie_embeddings=True, parametrization='mup',
                         mup_base_width=16, mup_base_head_dim=4)
  run, out = str(tmp_path / 'run'), str(tmp_path / 'hf')
  train_lib.train(cfg, run)
  hf.export_run(run, out)
  with open(os.path.join(out, 'config.json')) as f:
    assert json.load(f)['tie_word_embeddings'] is False
  model = transformers.AutoModelForCausalLM.from_pretrained(out).eval()
  mc, params, _, _ = runs.load_model(run)
  assert mc.parametrization == 'mup' and mc.tie_embeddings
  assert_same_logits(mc, params, model)


def test_exported_byte_tokenizer_encodes_like_ours(exported_llama):
  run, out, _ = exported_llama
  ours = tokenizer_lib.load_tokenizer(os.path.join(run, 'tokenizer'))
  theirs = transformers.AutoTokenizer.from_pretrained(out)
  assert theirs.eos_token_id == ours.eos_id and len(theirs) == ours.vocab_size
  for s in TEXTS:
    ids = theirs.encode(s, add_special_tokens=False)
    assert ids == ours.encode(s), repr(s)
    assert theirs.decode(ids) == s


def test_import_of_an_export_is_bitwise_equal(exported_llama, tmp_path):
  run, out, _ = exported_llama
  hf.import_model(out, str(tmp_path / 'back'))
  mc, params, tok, _ = runs.load_model(run)
  mc2, params2, tok2, _ = runs.load_model(str(tmp_path / 'back'))
  assert jax.tree.structure(params) == jax.tree.structure(params2)
  for a, b in zip(jax.tree.leaves(params), jax.tree.leaves(params2)):
    assert np.array_equal(np.asarray(a), np.asarray(b))
  assert tok2.chat_ids == tok.chat_ids and tok2.eos_id == tok.eos_id
  assert all(tok2.encode(s) == tok.encode(s) for s in TEXTS)


def test_exported_sentencepiece_tokenizer_encodes_like_ours(tmp_path):
  texts = [open(f, encoding='utf-8').read() for f in sorted(glob.glob(os.path.join(STDLIB,
                                                                                 '*.py')))]
  ours = tokenizer_lib.train_sentencepiece(texts, vocab_size=600, model_type='bpe',
                                           max_train_bytes=0)
  tokenizer_lib.export_hf(ours, str(tmp_path))
  theirs = transformers.AutoTokenizer.from_pretrained(str(tmp_path))
  for s in TEXTS:
    ids = theirs.encode(s, add_special_tokens=False)
    assert ids == ours.encode(s), repr(s)
    assert theirs.decode(ids) == s


def test_continued_pretraining_of_an_imported_gpt2_exports_back(imported_gpt2, cache_dir,
                                                               tmp_path):
  src, _, run = imported_gpt2
  c = small_run_config(cache_dir, steps=2)
  c.train.init_from = run
  summary = train_lib.train(c, str(tmp_path / 'cont'))
  assert summary['steps'] == 2 and summary['finished']
  with open(tmp_path / 'cont' / 'config.json') as f:
    cfg = json.load(f)
  assert cfg['model']['pos'] == 'learned' and cfg['data']['tokenizer'] == 'file'
  mc, params, _, _ = runs.load_model(str(tmp_path / 'cont'))
  _, start, _, _ = runs.load_model(run)
  assert not np.array_equal(np.asarray(params['embed']), np.asarray(start['embed']))
  info = hf.export_run(str(tmp_path / 'cont'), str(tmp_path / 'out'))
  assert info['family'] == 'gpt2'
  model = transformers.AutoModelForCausalLM.from_pretrained(str(tmp_path / 'out')).eval()
  assert_same_logits(mc, params, model)


def test_chat_tokens_can_be_added_on_import(imported_gpt2, tmp_path):
  src, ref, _ = imported_gpt2
  info = hf.import_model(src, str(tmp_path / 'chat'), add_chat_tokens=True)
  mc, params, tok, _ = runs.load_model(str(tmp_path / 'chat'))
  assert set(tok.chat_ids) == {'system', 'user', 'assistant', 'end'}
  assert mc.vocab_size >= max(tok.chat_ids.values()) + 1
  assert info['embedding_rows_added'] == mc.vocab_size - ref.config.vocab_size
  assert_same_logits(mc, params, ref, vocab=ref.config.vocab_size)   # old ids keep their logits


# ---- refusals -------------------------------------------------------------------------------


def run_cli(*args):
  return subprocess.run([sys.executable, os.path.join(ROOT, 'run.py'), *args], cwd=ROOT,
                        capture_output=True, text=True, timeout=300)


def test_bad_folders_are_refused_in_one_sentence(imported_gpt2, tmp_path):
  src = imported_gpt2[0]
  empty = tmp_path / 'empty'
  empty.mkdir()
  r = run_cli('import', f'--hf={empty}', f'--workdir={tmp_path / "w"}')
  assert r.returncode == 2 and 'has no config.json' in r.stderr
  assert r.stderr.count('\n') == 1 and not (tmp_path / 'w').exists()

  # A non-empty output folder is kept as it was.
  keep = tmp_path / 'keep'
  keep.mkdir()
  (keep / 'notes.txt').write_text('mine')
  r = run_cli('import', f'--hf={src}', f'--workdir={keep}')
  assert r.returncode == 2 and 'exists and is not empty' in r.stderr
  assert os.listdir(keep) == ['notes.txt']


def copy_folder(src, dst, skip=()):
  os.makedirs(dst)
  for f in os.listdir(src):
    if f not in skip:
      with open(os.path.join(src, f), 'rb') as a, open(os.path.join(dst, f), 'wb') as b:
        b.write(a.read())


def test_other_architectures_pickles_and_broken_weights_are_refused(imported_gpt2, tmp_path):
  from safetensors.numpy import load_file, save_file
  src = imported_gpt2[0]
  with open(os.path.join(src, 'config.json')) as f:
    cfg = json.load(f)

  other = tmp_path / 'neox'
  copy_folder(src, other)
  (other / 'config.json').write_text(json.dumps(dict(cfg, model_type='gpt_neox',
                                                     architectures=['GPTNeoXForCausalLM'])))
  with pytest.raises(UserError, match='GPTNeoXForCausalLM.*only GPT-2'):
    hf.import_model(str(other), str(tmp_path / 'a'))

  pickled = tmp_path / 'pickled'
  copy_folder(src, pickled, skip=('model.safetensors',))
  (pickled / 'pytorch_model.bin').write_bytes(b'not loaded')
  with pytest.raises(UserError, match='pickle.*runs code'):
    hf.import_model(str(pickled), str(tmp_path / 'b'))

  tensors = load_file(os.path.join(src, 'model.safetensors'))
  missing = tmp_path / 'missing'
  copy_folder(src, missing, skip=('model.safetensors',))
  save_file({k: v for k, v in tensors.items() if k != 'transformer.h.1.mlp.c_fc.bias'},
            str(missing / 'model.safetensors'))
  with pytest.raises(UserError, match=r'no tensor transformer\.h\.1\.mlp\.c_fc\.bias'):
    hf.import_model(str(missing), str(tmp_path / 'c'))

  shaped = tmp_path / 'shaped'
  copy_folder(src, shaped, skip=('model.safetensors',))
  tensors['transformer.h.0.attn.c_proj.weight'] = np.zeros((32, 16), np.float32)
  save_file(tensors, str(shaped / 'model.safetensors'))
  with pytest.raises(UserError, match=r'transformer\.h\.0\.attn\.c_proj\.weight.*\[32, 16\]'):
    hf.import_model(str(shaped), str(tmp_path / 'd'))
  assert not any((tmp_path / w).exists() for w in 'abcd')


def test_a_model_outside_both_families_is_refused_by_name():
  mc = model_lib.ModelConfig(vocab_size=10, pos='alibi', block='postnorm')
  with pytest.raises(UserError, match=r"fits neither.*pos='alibi'.*block='postnorm'"):
    hf.family_of(mc)


def test_train_init_from_is_refused_where_it_does_not_apply(imported_gpt2, tmp_path):
  from configs import sft as sft_cfg
  c = sft_cfg.get_config()
  c.finetune.init_from = c.train.init_from = imported_gpt2[2]
  with pytest.raises(UserError, match='train.init_from is for continued pretraining'):
    ft.finetune(c, str(tmp_path / 'ft'))
  assert not (tmp_path / 'ft').exists()
