"""Tests of corpora, tokenizers, token files and batches (lm/data/corpus.py, tokenizer.py, data.py)."""
import json
import os
import random
import tempfile

import numpy as np
import pytest

from configs.base import get_config
from lm.data import corpus as corpus_lib
from lm.data import build as build_lib
from lm.data import sources
from lm.data import tokens as data
from lm.data import tokenizer as tokenizer_lib
from lm.errors import UserError

SAMPLES = [
    'naïve café — 東京 🚀\n\ttabs  and  spaces',
    '',
    ' ',
    '\n\n  leading and trailing  \r\n',
    'a\u2581b \u2581\u2581 c',  # SentencePiece's own space mark must survive.
    'nul\x00 zero-width\u200b bom\ufeff ligature\ufb01 combining e\u0301',
    'def f(x):\n    return x ** 2  # comment\n',
]


def data_cfg(tmp_path, **overrides):
  cfg = get_config().data
  cfg.cache_dir = str(tmp_path / 'cache')
  for k, v in overrides.items():
    cfg[k] = v
  return cfg


def random_text(rng, n):
  """Random text mixing ASCII, whitespace and characters from several scripts and planes."""
  pools = ['abc xyz', ' \t\n\r', 'éüßñ', '東京日本', '🚀😀', '\u2581', 'ΩЖא']
  return ''.join(rng.choice(rng.choice(pools)) for _ in range(n))


@pytest.fixture(scope='module')
def sp_ds(tmp_path_factory):
  """A sentencepiece dataset over ~200 KB of the standard library (trained once per module)."""
  tmp = tmp_path_factory.mktemp('sp')
  return data.prepare(data_cfg(tmp, tokenizer='sentencepiece', vocab_size=400, max_bytes=200_000))


@pytest.fixture(scope='module')
def bytes_ds(tmp_path_factory):
  tmp = tmp_path_factory.mktemp('bytes')
  return data.prepare(data_cfg(tmp, max_bytes=200_000))


def fake_dataset(n_tokens, n_val=1000):
  """A Dataset whose token at position i is i, so a row's first token is its window start."""
  info = {'splits': {'train': {'tokens': n_tokens, 'bytes': n_tokens},
                     'val': {'tokens': n_val, 'bytes': n_val}},
          'corpus_hash': 'x', 'tokenizer_hash': 'y', 'entropy_rate': None}
  return data.Dataset('', info, tokenizer_lib.ByteTokenizer(), np.arange(n_tokens, dtype=np.uint32),
                      np.arange(n_val, dtype=np.uint32))


# ---- tokenizers -------------------------------------------------------------------------------


def test_bytes_round_trip():
  tok = tokenizer_lib.ByteTokenizer()
  assert (tok.vocab_size, tok.bos_id, tok.eos_id, tok.pad_id) == (263, 256, 257, 258)
  assert tok.chat_ids == {'system': 259, 'user': 260, 'assistant': 261, 'end': 262}
  assert tok.encode('<|user|>') == list(b'<|user|>')   # text never becomes a chat token
  rng = random.Random(0)
  for s in SAMPLES + [random_text(rng, 200) for _ in range(20)]:
    ids = tok.encode(s)
    assert all(0 <= i < 256 for i in ids)
    assert tok.decode(ids) == s
  assert tok.decode([104, 105, tok.eos_id]) == 'hi'  # Specials are dropped.
  assert tok.decode([0xFF, 104]) == '\ufffdh'  # Invalid UTF-8 (only a model makes it) is replaced.


def test_sentencepiece_round_trip(sp_ds, tmp_path):
  tok = sp_ds.tokenizer
  assert tok.name == 'sentencepiece' and tok.vocab_size == 400
  assert sorted(tok.chat_ids.values()) == [4, 5, 6, 7]       # control pieces, never from text
  assert tok.decode(list(tok.chat_ids.values())) == ''
  assert all(i not in tok.chat_ids.values() for i in tok.encode('<|user|><|end|>'))
  assert len({tok.bos_id, tok.eos_id, tok.pad_id}) == 3
  rng = random.Random(1)
  for s in SAMPLES + [random_text(rng, 300) for _ in range(30)]:
    ids = tok.encode(s)
    assert all(0 <= i < tok.vocab_size for i in ids)
    assert tok.decode(ids) == s, repr(s)
  # Learned merges are used: code compresses well below one token per byte.
  train = sp_ds.info['splits']['train']
  assert train['tokens'] < 0.7 * train['bytes']
  tok.save(str(tmp_path / 'tok'))
  again = tokenizer_lib.load_tokenizer(str(tmp_path / 'tok'))
  assert again.hash == tok.hash and again.encode(SAMPLES[0]) == tok.encode(SAMPLES[0])


def test_symbol_tokenizer_and_load(tmp_path):
  tok = tokenizer_lib.SymbolTokenizer(64)
  assert (tok.vocab_size, tok.bos_id, tok.eos_id, tok.pad_id) == (67, 64, 65, 66)
  assert tok.encode('3 0 63') == [3, 0, 63] and tok.decode([3, 0, 63, 65]) == '3 0 63'
  for i, t in enumerate((tok, tokenizer_lib.ByteTokenizer(), tokenizer_lib.ByteTokenizer(False))):
    t.save(str(tmp_path / f'{i}'))
    back = tokenizer_lib.load_tokenizer(str(tmp_path / f'{i}'))
    assert back.settings() == t.settings() and back.hash == t.hash
    assert back.vocab_size == t.vocab_size and back.chat_ids == t.chat_ids
  # Runs saved before chat tokens existed (vocab 259) load as the 259-id vocabulary.
  assert tokenizer_lib.ByteTokenizer(False).settings() == {'type': 'bytes', 'vocab_size': 259}
  with pytest.raises(UserError, match='tokenizer.json'):
    tokenizer_lib.load_tokenizer(str(tmp_path / 'nothing'))


# ---- token files ------------------------------------------------------------------------------


def test_prepare_bytes_pystdlib(bytes_ds):
  info = bytes_ds.info
  tok = bytes_ds.tokenizer
  assert bytes_ds.train.dtype == np.uint16 and info['dtype'] == 'uint16'
  s = info['splits']
  assert s['train']['bytes'] + s['val']['bytes'] <= 200_000
  assert 0 < s['val']['bytes'] < s['train']['bytes']
  # Bytes tokenizer: one token per byte plus one EOS per document.
  for split in data.SPLITS:
    assert s[split]['tokens'] == s[split]['bytes'] + s[split]['documents']
    assert int((bytes_ds.tokens(split) == tok.eos_id).sum()) == s[split]['documents']
    assert bytes_ds.tokens(split)[-1] == tok.eos_id
  assert bytes_ds.bytes_per_token('train') == s['train']['bytes'] / s['train']['tokens']
  assert len(info['corpus_hash']) == 64 and info['tokenizer_hash'] == tok.hash
  assert info['entropy_rate'] is None
  assert tokenizer_lib.load_tokenizer(os.path.join(bytes_ds.path, 'tokenizer')).hash == tok.hash


def test_text_corpus_documents_and_eos(tmp_path):
  src = tmp_path / 'src'
  (src / 'sub').mkdir(parents=True)
  docs = {f'doc {i} ' + 'é' * i + '\n' for i in range(30)}
  docs_list = sorted(docs)
  for i, d in enumerate(docs_list[:10]):
    (src / f'{i:02d}.txt').write_text(d, encoding='utf-8')
  with open(src / 'sub' / 'more.jsonl', 'w', encoding='utf-8') as f:
    for d in docs_list[10:]:
      f.write(json.dumps({'body': d, 'other': 1}) + '\n')
    f.write('\n')  # Blank lines are skipped.
  (src / 'ignored.bin').write_bytes(b'\xff\x00')
  ds = data.prepare(data_cfg(tmp_path, corpus='text', path=str(src), text_field='body',
                             val_fraction=0.2))
  tok = ds.tokenizer
  got = []
  for split in data.SPLITS:
    text = tok.decode(np.where(ds.tokens(split) == tok.eos_id, ord('|'), ds.tokens(split)))
    got += text.split('|')[:-1]
  assert sorted(got) == docs_list
  assert ds.info['splits']['val']['documents'] >= 1


def test_single_document_tail_split(tmp_path):
  text = ''.join(f'line {i} ünïcode\n' for i in range(2000))
  path = tmp_path / 'one.txt'
  path.write_text(text, encoding='utf-8')
  ds = data.prepare(data_cfg(tmp_path, corpus='text', path=str(path), val_fraction=0.1))
  tok = ds.tokenizer
  train, val = tok.decode(ds.train), tok.decode(ds.val)
  assert train + val == text
  assert abs(len(val.encode('utf-8')) - 0.1 * len(text.encode('utf-8'))) < 4


def test_glob_and_non_utf8_replaced(tmp_path):
  (tmp_path / 'a.txt').write_bytes(b'caf\xe9 latin-1\n' * 50)
  (tmp_path / 'b.txt').write_text('fine utf-8 \ufffd text\n' * 50, encoding='utf-8')
  ds = data.prepare(data_cfg(tmp_path, corpus='text', path=str(tmp_path / '*.txt')))
  assert ds.info['corpus_stats']['replaced_chars'] == 50  # The literal U+FFFD is not counted.
  assert ds.info['corpus_stats']['files'] == 2


def test_cache_is_reused(tmp_path, monkeypatch):
  cfg = data_cfg(tmp_path, max_bytes=50_000)
  first = data.prepare(cfg)
  stamps = {f: os.stat(os.path.join(first.path, f)).st_mtime_ns for f in ('train.bin', 'val.bin',
                                                                           'info.json')}

  def no_build(*args, **kwargs):
    raise AssertionError('the cache was rebuilt')
  monkeypatch.setattr(data, '_build', no_build)
  second = data.prepare(cfg)
  assert second.path == first.path
  np.testing.assert_array_equal(second.train, first.train)
  np.testing.assert_array_equal(second.val, first.val)
  assert second.info == first.info
  for f, t in stamps.items():
    assert os.stat(os.path.join(first.path, f)).st_mtime_ns == t
  assert sorted(os.listdir(tmp_path / 'cache')) == [os.path.basename(first.path)]


def test_settings_change_the_folder(tmp_path):
  a = data.prepare(data_cfg(tmp_path, max_bytes=20_000))
  b = data.prepare(data_cfg(tmp_path, max_bytes=30_000))
  c = data.prepare(data_cfg(tmp_path, max_bytes=20_000, vocab_size=999))  # Unused by bytes.
  assert a.path != b.path and a.path == c.path


def test_cache_dir_from_environment(tmp_path, monkeypatch):
  monkeypatch.setenv('LM_CACHE_DIR', str(tmp_path / 'env'))
  cfg = data_cfg(tmp_path, max_bytes=10_000)
  cfg.cache_dir = ''
  ds = data.prepare(cfg)
  assert ds.path.startswith(str(tmp_path / 'env'))


def test_crash_mid_build_resumes_from_finished_units(tmp_path, monkeypatch):
  """A build killed between units leaves no folder that looks complete; the next call redoes only
  the unfinished units and gives the same token files as a build that was never interrupted."""
  monkeypatch.setattr(sources, 'UNIT_BYTES', 20_000)   # several units in 100 KB
  cfg = data_cfg(tmp_path, max_bytes=100_000)
  real = build_lib.run_task
  calls, reused = [], []

  def crashing(task):
    calls.append(task.prefix)
    if len(calls) == 3 and not reused:
      raise KeyboardInterrupt('simulated crash')
    return real(task)
  monkeypatch.setattr(build_lib, 'run_task', crashing)
  with pytest.raises(KeyboardInterrupt):
    data.prepare(cfg)
  names = os.listdir(tmp_path / 'cache')
  assert len(names) == 1 and names[0].startswith('.partial-')   # the parts, kept for resuming
  calls.clear()
  reused.append('resuming')
  real_match = build_lib._part_matches
  monkeypatch.setattr(build_lib, '_part_matches',
                      lambda t, p: reused.append(real_match(t, p)) or reused[-1])
  ds = data.prepare(cfg)
  kept = [r for r in reused[1:] if r is not None]
  n_calls = len(calls)
  assert ds.info['splits']['train']['tokens'] == len(ds.train) > 0
  assert os.listdir(tmp_path / 'cache') == [os.path.basename(ds.path)]
  fresh = data.prepare(data_cfg(tmp_path / 'fresh', max_bytes=100_000))
  assert np.array_equal(ds.train, fresh.train) and np.array_equal(ds.val, fresh.val)
  assert ds.corpus_hash == fresh.corpus_hash
  assert n_calls >= 3 and len(kept) == 2   # resumed: the two finished units were kept
  monkeypatch.setattr(build_lib, 'run_task', real)
  # A damaged complete folder (here a truncated token file) is rebuilt, not read.
  n = len(ds.train)
  del ds
  folder = [p for p in os.listdir(tmp_path / 'cache') if not p.startswith('.')][0]
  with open(tmp_path / 'cache' / folder / 'train.bin', 'r+b') as f:
    f.truncate(100)
  assert len(data.prepare(cfg).train) == n


# ---- batches ----------------------------------------------------------------------------------


def test_batch_shape_determinism_and_seed(bytes_ds):
  b = bytes_ds.batch('train', 5, 8, 32, seed=0)
  assert b.shape == (8, 33) and b.dtype == np.int32
  np.testing.assert_array_equal(b, bytes_ds.batch('train', 5, 8, 32, seed=0))
  assert not np.array_equal(b, bytes_ds.batch('train', 5, 8, 32, seed=1))
  assert not np.array_equal(b, bytes_ds.batch('train', 6, 8, 32, seed=0))
  # Rows are real windows of the stream with stride seq_len.
  for row in b:
    starts = np.flatnonzero(bytes_ds.train[:len(bytes_ds.train) - 32] == row[0])
    assert any(s % 32 == 0 and np.array_equal(bytes_ds.train[s:s + 33], row) for s in starts)
  v = bytes_ds.batch('val', 0, 8, 32, seed=0)
  assert v.shape == (8, 33)


@pytest.mark.parametrize('procs', [2, 4])
def test_processes_take_disjoint_rows(procs):
  ds = fake_dataset(10_001)
  for step in (0, 7, 123):  # 123 * 16 rows crosses several epochs of 1000 windows.
    whole = ds.batch('train', step, 16, 10, seed=3)
    parts = [ds.batch('train', step, 16, 10, seed=3, process_index=p, process_count=procs)
             for p in range(procs)]
    assert all(p.shape == (16 // procs, 11) for p in parts)
    np.testing.assert_array_equal(np.concatenate(parts), whole)
    starts = np.concatenate(parts)[:, 0]
    assert len(set(starts.tolist())) == 16


def test_no_window_repeats_within_an_epoch():
  ds = fake_dataset(16 * 10 * 25 + 1)  # 400 windows of seq_len 10: exactly 25 steps of 16 rows.
  n = ds.n_windows('train', 10)
  assert n == 400
  epoch0 = np.concatenate([ds.batch('train', s, 16, 10, seed=0)[:, 0] for s in range(25)])
  epoch1 = np.concatenate([ds.batch('train', s, 16, 10, seed=0)[:, 0] for s in range(25, 50)])
  for e in (epoch0, epoch1):
    assert sorted(e.tolist()) == list(range(0, 4000, 10))
  assert not np.array_equal(epoch0, epoch1)  # Each epoch has its own order.
  assert ds.epochs(50, 16, 10) == 2.0
  # Windows share their boundary token: a row's last token is the next window's first.
  row = ds.batch('train', 0, 16, 10, seed=0)[0]
  assert row[-1] == row[0] + 10


def test_eval_batches(bytes_ds):
  ev = bytes_ds.eval_batches(3, 8, 32)
  assert len(ev) == 3 and all(b.shape == (8, 33) for b in ev)
  again = bytes_ds.eval_batches(3, 8, 32)
  assert all(np.array_equal(a, b) for a, b in zip(ev, again))
  halves = [bytes_ds.eval_batches(3, 8, 32, process_index=p, process_count=2) for p in range(2)]
  for i in range(3):
    np.testing.assert_array_equal(np.concatenate([halves[0][i], halves[1][i]]), ev[i])
  rows = np.concatenate(ev)
  assert len({r.tobytes() for r in rows}) == len(rows)  # Distinct windows when there are enough.


# ---- synthetic source -------------------------------------------------------------------------


@pytest.mark.parametrize('order,concentration', [(1, 1.0), (2, 0.5)])
def test_markov_entropy_rate(order, concentration):
  src = corpus_lib.MarkovSource(vocab=16 if order == 2 else 64, order=order, branching=4,
                                concentration=concentration, seed=7)
  # The stationary distribution is a fixed point of the chain.
  moved = np.bincount(src.next_ctx.ravel(), weights=(src.stationary[:, None] * src.probs).ravel(),
                      minlength=src.n_contexts)
  np.testing.assert_allclose(moved, src.stationary, atol=1e-10)
  assert 0 < src.entropy_rate < np.log(4)
  x = src.sample(300_000, seed=1)
  nll = src.log_probs(x)
  assert abs(nll.mean() - src.entropy_rate) < 0.02
  # Plug-in estimate from transition counts (no knowledge of the true probabilities).
  ctx = np.zeros(len(x) - order, np.int64)
  for k in range(order):
    ctx = ctx * src.vocab + x[k:len(x) - order + k]
  pair = np.unique(ctx * src.vocab + x[order:], return_counts=True)[1]
  ctx_counts = np.unique(ctx, return_counts=True)[1]
  n = len(ctx)
  plug_in = -(pair / n * np.log(pair)).sum() + (ctx_counts / n * np.log(ctx_counts)).sum()
  assert abs(plug_in - src.entropy_rate) < 0.03


def test_synthetic_dataset(tmp_path):
  cfg = data_cfg(tmp_path, corpus='synthetic', synthetic_tokens=50_000)
  ds = data.prepare(cfg)
  src = corpus_lib.MarkovSource(64, 1, 4, 1.0, 1234)
  assert ds.tokenizer.name == 'symbols' and ds.tokenizer.vocab_size == 67
  assert ds.entropy_rate == pytest.approx(src.entropy_rate)
  assert ds.info['splits']['train']['tokens'] == 50_000
  assert ds.info['splits']['val']['tokens'] == 2_500
  assert ds.bytes_per_token('train') is None
  for split in data.SPLITS:
    assert np.isfinite(src.log_probs(ds.tokens(split))).all()  # Only allowed transitions.
  assert not np.array_equal(ds.train[:2500], ds.val)
  assert data.prepare(cfg).path == ds.path


# ---- bad input --------------------------------------------------------------------------------


@pytest.mark.parametrize('key,value,words', [
    ('corpus', 'wiki', 'data.corpus'),
    ('tokenizer', 'wordpiece', 'data.tokenizer'),
    ('sp_model_type', 'char', 'data.sp_model_type'),
    ('val_fraction', 0.0, 'data.val_fraction'),
    ('val_fraction', 1.0, 'data.val_fraction'),
    ('vocab_size', 0, 'data.vocab_size'),
    ('max_bytes', -1, 'data.max_bytes'),
    ('vocab_size', 'big', 'data.vocab_size'),
    ('synthetic_branching', 100, 'data.synthetic_branching'),
])
def test_bad_config_values(tmp_path, key, value, words):
  cfg = data_cfg(tmp_path).to_dict()  # A plain dict: ConfigDict itself refuses wrong types.
  cfg[key] = value
  if key.startswith('synthetic_'):
    cfg['corpus'] = 'synthetic'  # Synthetic settings are only checked where they apply.
  with pytest.raises(UserError, match=words):
    data.DataConfig.from_config(cfg)


def test_bad_corpus_combinations(tmp_path):
  with pytest.raises(UserError, match='data.path'):
    data.DataConfig.from_config(data_cfg(tmp_path, corpus='text'))
  with pytest.raises(UserError, match='data.tokenizer'):
    data.DataConfig.from_config(data_cfg(tmp_path, corpus='synthetic', tokenizer='sentencepiece'))


def test_bad_paths(tmp_path):
  with pytest.raises(UserError, match='does not exist'):
    data.prepare(data_cfg(tmp_path, corpus='text', path=str(tmp_path / 'missing')))
  with pytest.raises(UserError, match='matches no files'):
    data.prepare(data_cfg(tmp_path, corpus='text', path=str(tmp_path / 'nothing*.txt')))
  (tmp_path / 'empty').mkdir()
  (tmp_path / 'empty' / 'x.md').write_text('not a corpus file')
  with pytest.raises(UserError, match=r'holds no \*.txt, \*.jsonl'):
    data.prepare(data_cfg(tmp_path, corpus='text', path=str(tmp_path / 'empty')))
  (tmp_path / 'empty' / 'a.txt').write_text('')
  (tmp_path / 'empty' / 'b.jsonl').write_text('{"text": ""}\n\n')
  with pytest.raises(UserError, match='empty'):
    data.prepare(data_cfg(tmp_path, corpus='text', path=str(tmp_path / 'empty')))
  assert not (tmp_path / 'cache').exists() or os.listdir(tmp_path / 'cache') == []


def test_bad_jsonl(tmp_path):
  path = tmp_path / 'd.jsonl'
  path.write_text('{"text": "ok"}\n{"body": "no text field"}\n', encoding='utf-8')
  with pytest.raises(UserError, match=r'd\.jsonl line 2 .*text.*data\.text_field'):
    data.prepare(data_cfg(tmp_path, corpus='text', path=str(path)))
  path.write_text('{"text": "ok"}\n{"text": "ok"}\n{oops\n', encoding='utf-8')
  with pytest.raises(UserError, match=r'd\.jsonl line 3 is not valid JSON'):
    data.prepare(data_cfg(tmp_path, corpus='text', path=str(path)))


def test_unreachable_vocab_sizes(tmp_path):
  path = tmp_path / 'small.txt'
  path.write_text('the quick brown fox jumps over the lazy dog\n' * 200, encoding='utf-8')
  for size in (100, 270, 100_000):
    with pytest.raises(UserError, match=f'data.vocab_size={size}'):
      data.prepare(data_cfg(tmp_path, corpus='text', path=str(path), tokenizer='sentencepiece',
                            vocab_size=size))
  assert os.listdir(tmp_path / 'cache') == []


def test_seq_len_too_long_and_bad_process_count(bytes_ds):
  n = len(bytes_ds.train)
  with pytest.raises(UserError, match=f'train.seq_len={n}.*{n} tokens'):
    bytes_ds.batch('train', 0, 1, n, seed=0)
  nv = len(bytes_ds.val)
  with pytest.raises(UserError, match=f'train.seq_len={nv}.*validation split of {nv} tokens'):
    bytes_ds.eval_batches(1, 1, nv)
  with pytest.raises(UserError, match='train.batch_size=6 is not divisible'):
    bytes_ds.batch('train', 0, 6, 16, seed=0, process_index=0, process_count=4)


def test_read_only_cache(tmp_path, monkeypatch):
  ro = tmp_path / 'ro'
  ro.mkdir()
  cfg = data_cfg(tmp_path, max_bytes=10_000)
  cfg.cache_dir = str(ro / 'cache')
  if os.geteuid() != 0:  # Root ignores permission bits, so it gets a simulated refusal below.
    ro.chmod(0o555)
    try:
      with pytest.raises(UserError, match='data.cache_dir'):
        data.prepare(cfg)
    finally:
      ro.chmod(0o755)

  def refuse(*args, **kwargs):
    raise PermissionError(13, 'Permission denied')
  monkeypatch.setattr(tempfile, 'NamedTemporaryFile', refuse)
  with pytest.raises(UserError, match='not writable.*--config.data.cache_dir='):
    data.prepare(cfg)
