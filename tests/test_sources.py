"""Corpus formats, streaming reads, parallel tokenization and mixtures (lm/data/sources.py,
lm/data/build.py, data.sources)."""
import gzip
import json
import os

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import zstandard

from configs.base import get_config
from lm.data import build as build_lib
from lm.data import sources
from lm.data import tokens as data
from lm.data.mixture import MixtureDataset
from lm.errors import UserError

WORDS = ['alpha', 'beta', 'gamma', 'délta', 'εψιλον', '東京', 'zeta\n', 'eta,', '🚀', 'theta.']


def documents(n=120, seed=0):
  rng = np.random.default_rng(seed)
  return [' '.join(rng.choice(WORDS, size=int(rng.integers(5, 60)))) for _ in range(n)]


def cfg_for(tmp_path, **data_keys):
  c = get_config().data
  c.cache_dir = str(tmp_path / 'cache')
  c.val_fraction = 0.1
  c.corpus = 'text'
  for k, v in data_keys.items():
    c[k] = v
  return c


def write_jsonl(path, docs, field='text', opener=open):
  with opener(path, 'wt', encoding='utf-8') as f:
    for d in docs:
      f.write(json.dumps({field: d, 'id': 1}) + '\n')


def write_zst(path, docs):
  raw = ''.join(json.dumps({'text': d}) + '\n' for d in docs).encode('utf-8')
  with open(path, 'wb') as f:
    f.write(zstandard.ZstdCompressor().compress(raw))


def write_parquet(path, docs, row_group_size=17, field='text'):
  pq.write_table(pa.table({field: docs, 'n': list(range(len(docs)))}), path,
                 row_group_size=row_group_size)


@pytest.fixture(scope='module')
def docs():
  return documents()


def _prepare(folder, name, write, docs, tmp_path):
  os.makedirs(folder / name.split('.')[0], exist_ok=True)
  path = folder / name.split('.')[0] / name
  write(path, docs)
  return data.prepare(cfg_for(tmp_path, path=str(path.parent)))


def test_every_record_format_gives_the_same_token_files(tmp_path, docs):
  src = tmp_path / 'src'
  made = {
      'a.jsonl': lambda p, d: write_jsonl(p, d),
      'a.jsonl.gz': lambda p, d: write_jsonl(p, d, opener=gzip.open),
      'a.jsonl.zst': write_zst,
      'a.parquet': write_parquet,   # several row groups
  }
  got = {}
  for name, write in made.items():
    folder = src / name.replace('.', '_')
    folder.mkdir(parents=True)
    write(folder / name, docs)
    got[name] = data.prepare(cfg_for(tmp_path, path=str(folder)))
  first = got['a.jsonl']
  assert first.info['splits']['train']['documents'] + first.info['splits']['val'][
      'documents'] == len(docs)
  assert first.info['splits']['val']['documents'] > 0
  for name, ds in got.items():
    np.testing.assert_array_equal(ds.train, first.train, err_msg=name)
    np.testing.assert_array_equal(ds.val, first.val, err_msg=name)
    assert ds.corpus_hash == first.corpus_hash
  # The documents come back whole: EOS-separated and in order within each split.
  tok = first.tokenizer
  train = np.asarray(first.train)
  cuts = np.flatnonzero(train == tok.eos_id)
  texts = [tok.decode(train[a + 1 if i else 0:b]) for i, (a, b) in
           enumerate(zip(np.r_[0, cuts[:-1]], cuts))]
  assert all(t in docs for t in texts)


def test_saved_and_local_hf_datasets_give_the_same_documents(tmp_path, docs, monkeypatch):
  datasets = pytest.importorskip('datasets')
  monkeypatch.setenv('HF_DATASETS_CACHE', str(tmp_path / 'hf_cache'))
  monkeypatch.setenv('HF_HUB_OFFLINE', '1')
  saved = tmp_path / 'saved'
  datasets.Dataset.from_dict({'text': docs}).save_to_disk(str(saved))
  local = tmp_path / 'local'
  local.mkdir()
  write_parquet(local / 'part-0.parquet', docs[:60])
  write_parquet(local / 'part-1.parquet', docs[60:])

  def all_docs(ds):
    tok = ds.tokenizer
    out = []
    for split in ('train', 'val'):
      arr = np.asarray(ds.tokens(split))
      start = 0
      for end in np.flatnonzero(arr == tok.eos_id).tolist():
        out.append(tok.decode(arr[start:end]))
        start = end + 1
    return sorted(out)

  want = sorted(docs)
  a = data.prepare(cfg_for(tmp_path, corpus='hf', hf_dataset=str(saved)))
  b = data.prepare(cfg_for(tmp_path, corpus='hf', hf_dataset=str(local)))
  c = data.prepare(cfg_for(tmp_path, corpus='hf', hf_dataset=str(local), hf_streaming=True))
  assert a.info['corpus'] == 'hf'
  for ds in (a, b, c):
    assert all_docs(ds) == want
  with pytest.raises(UserError, match="no column 'body'"):
    data.prepare(cfg_for(tmp_path, corpus='hf', hf_dataset=str(saved), text_field='body'))
  with pytest.raises(UserError, match="no split 'test'"):
    datasets.DatasetDict({'train': datasets.Dataset.from_dict({'text': docs})}).save_to_disk(
        str(tmp_path / 'dict'))
    data.prepare(cfg_for(tmp_path, corpus='hf', hf_dataset=str(tmp_path / 'dict'),
                         hf_split='test'))


def test_bad_shards_are_named_and_bad_records_counted(tmp_path, docs):
  folder = tmp_path / 'bad'
  folder.mkdir()
  write_parquet(folder / 'x.parquet', docs)
  blob = (folder / 'x.parquet').read_bytes()
  (folder / 'x.parquet').write_bytes(blob[:len(blob) // 2])
  with pytest.raises(UserError, match=r'x\.parquet cannot be read'):
    data.prepare(cfg_for(tmp_path, path=str(folder)))
  write_parquet(folder / 'x.parquet', docs, field='body')
  with pytest.raises(UserError, match=r"x\.parquet has no column 'text'.*data\.text_field"):
    data.prepare(cfg_for(tmp_path, path=str(folder)))
  os.remove(folder / 'x.parquet')
  (folder / 'y.jsonl.gz').write_bytes(gzip.compress(b'{"text": "a"}\n' * 50)[:-12] + b'garbage!')
  with pytest.raises(UserError, match=r'y\.jsonl\.gz cannot be read'):
    data.prepare(cfg_for(tmp_path, path=str(folder)))
  os.remove(folder / 'y.jsonl.gz')
  (folder / 'z.jsonl.zst').write_bytes(b'\x28\xb5\x2f\xfd not zstd at all')
  with pytest.raises(UserError, match=r'z\.jsonl\.zst cannot be read'):
    data.prepare(cfg_for(tmp_path, path=str(folder)))
  os.remove(folder / 'z.jsonl.zst')
  # One unreadable line in 300 is counted and reported, not fatal, never silently dropped.
  lines = [json.dumps({'text': d}) for d in documents(300, seed=3)]
  lines[17] = '{"text": broken'
  (folder / 'w.jsonl').write_text('\n'.join(lines) + '\n', encoding='utf-8')
  ds = data.prepare(cfg_for(tmp_path, path=str(folder)))
  stats = ds.info['corpus_stats']
  assert stats['bad_records'] == 1 and 'w.jsonl line 18 is not valid JSON' in \
      stats['bad_examples'][0]
  assert stats['documents'] == 299
  # Mostly unreadable records mean a wrong text_field: refused, naming the first and the key.
  os.remove(folder / 'w.jsonl')
  pq.write_table(pa.table({'text': [None] * 50 + ['x', 'y']}), folder / 'n.parquet')
  with pytest.raises(UserError, match=r"50 of 52 records .*n\.parquet:1 has a null in column "
                     r"'text'.*data\.text_field"):
    data.prepare(cfg_for(tmp_path, path=str(folder)))
  pq.write_table(pa.table({'text': pa.array([], pa.string())}), folder / 'n.parquet')
  with pytest.raises(UserError, match='holds no text'):
    data.prepare(cfg_for(tmp_path, path=str(folder)))
  assert [n for n in os.listdir(tmp_path / 'cache') if n.startswith('.partial')] == []


def test_reading_is_bounded_by_the_chunk_size(tmp_path):
  """A shard much larger than data.max_chunk_bytes is never held whole: every chunk a reader
  hands the tokenizer is within the bound (plus one document), for every format."""
  many = documents(2000, seed=5)
  longest = max(len(d) for d in many)
  folder = tmp_path / 'big'
  folder.mkdir()
  write_parquet(folder / 'p.parquet', many, row_group_size=500)
  write_zst(folder / 'z.jsonl.zst', many)
  (folder / 't.txt').write_text('\n'.join(many), encoding='utf-8')
  bound = 8192
  files = sources.corpus_files(str(folder))
  assert all(f.size > 10 * bound or f.relpath.endswith(('.zst', '.parquet')) for f in files)
  units = sources.file_units(files, 'text', bound, 0.1)
  sizes, pieces = [], {}
  for u in units:
    for chunk in sources.read_unit(u, 'text', bound, sources.Bad(), {}):
      sizes.append(sum(len(d.text) for d in chunk))
      for d in chunk:
        if d.file == 't.txt':
          pieces.setdefault(d.split, []).append(d)
  assert len(sizes) > 30 and max(sizes) <= bound + longest
  # The text file came in pieces that end at newlines; joined they are the file again.
  whole = (folder / 't.txt').read_text(encoding='utf-8')
  assert list(pieces) == ['']    # one document of several, split by its id
  got = pieces['']
  assert len(got) > 10 and all(p.text.endswith('\n') and not p.eos for p in got[:-1])
  assert got[-1].eos and ''.join(p.text for p in got) == whole
  # Preparing with a small chunk gives the same token files as with a large one (except where
  # the text file's pieces are cut, which is keyed: compare the record formats only).
  os.remove(folder / 't.txt')
  small = data.prepare(cfg_for(tmp_path, path=str(folder), max_chunk_bytes=bound))
  large = data.prepare(cfg_for(tmp_path / 'l', path=str(folder)))
  np.testing.assert_array_equal(small.train, large.train)


def test_parallel_workers_write_what_one_process_writes(tmp_path, monkeypatch):
  monkeypatch.setattr(sources, 'UNIT_BYTES', 30_000)
  monkeypatch.setattr(build_lib, '_PARALLEL_MIN_BYTES', 0)
  folder = tmp_path / 'par'
  folder.mkdir()
  for i in range(4):
    write_jsonl(folder / f's{i}.jsonl', documents(150, seed=10 + i))
  one = data.prepare(cfg_for(tmp_path / 'one', path=str(folder), workers=1))
  two = data.prepare(cfg_for(tmp_path / 'two', path=str(folder), workers=2))
  assert len(sources.list_source('text', str(folder), 'text', 16 << 20, 0.1).units) >= 4
  np.testing.assert_array_equal(one.train, two.train)
  np.testing.assert_array_equal(one.val, two.val)
  assert one.info['corpus_stats'] == two.info['corpus_stats']
  # The split is a function of the document id alone: a val document stays in val when the
  # corpus around it grows.
  write_jsonl(folder / 's9.jsonl', documents(150, seed=99))
  more = data.prepare(cfg_for(tmp_path / 'one', path=str(folder), workers=1))
  assert more.info['splits']['val']['tokens'] > one.info['splits']['val']['tokens']
  np.testing.assert_array_equal(more.val[:len(one.val)], one.val)


def test_mixture_sources_share_one_tokenizer_and_draw_by_weight(tmp_path):
  a, b = tmp_path / 'a', tmp_path / 'b'
  a.mkdir()
  b.mkdir()
  write_jsonl(a / 'a.jsonl', ['aaaa ' * 40 + str(i) for i in range(200)])
  write_parquet(b / 'b.parquet', ['bbbb ' * 40 + str(i) for i in range(200)])
  c = cfg_for(tmp_path, tokenizer='sentencepiece', vocab_size=300,
              sources=({'path': str(a), 'weight': 0.7, 'name': 'A'},
                       {'path': str(b), 'weight': 0.3}))
  ds = data.prepare(c)
  assert isinstance(ds, MixtureDataset)
  assert [p.tokenizer_hash for p in ds.parts][0] == ds.parts[1].tokenizer_hash
  rows = np.concatenate([ds.batch('train', s, 10, 16, seed=0) for s in range(200)])
  share = np.mean(['b' not in ds.tokenizer.decode(r) for r in rows])
  assert abs(share - 0.7) < 0.01
  draws = ds.draws(200, 10, 16)
  assert [d['name'] for d in draws] == ['A', str(b)]
  # Cached: a second call reads the same folders.
  again = data.prepare(c)
  assert [p.path for p in again.parts] == [p.path for p in ds.parts]
  with pytest.raises(UserError, match=r'data.sources\[1\] has weight 0'):
    data.prepare(cfg_for(tmp_path, sources=({'path': str(a)}, {'path': str(b), 'weight': 0})))
  bad = cfg_for(tmp_path, sources=({'path': str(a), 'wieght': 1},))
  with pytest.raises(UserError, match="data.sources\\[0\\] has the key 'wieght'"):
    data.prepare(bad)


def test_a_mixture_run_resumed_mid_epoch_equals_the_uninterrupted_run(tmp_path):
  """Two sources of very different sizes, so the small one wraps into later epochs during the
  run; stopped at step 6 and resumed, the run ends bitwise equal to one never stopped."""
  import jax
  from configs import base
  from lm import runs
  from lm.stages import pretrain
  a, b = tmp_path / 'a', tmp_path / 'b'
  a.mkdir()
  b.mkdir()
  write_jsonl(a / 'a.jsonl', documents(400, seed=1))
  write_parquet(b / 'b.parquet', documents(5, seed=2))
  c = base.get_config()
  c.model.n_layers, c.model.d_model, c.model.n_heads, c.model.max_len = 1, 32, 2, 32
  c.data.update(corpus='text', cache_dir=str(tmp_path / 'cache'), val_fraction=0.2,
                sources=({'path': str(a), 'weight': 0.6}, {'path': str(b), 'weight': 0.4}))
  c.train.update(steps=16, batch_size=8, seq_len=16, lr=3e-3, warmup_steps=2, eval_every=8,
                 eval_batches=1, log_every=1, checkpoint_every=4, progress='none')
  whole = pretrain.train(c, str(tmp_path / 'whole'))
  part = pretrain.train(c, str(tmp_path / 'part'), stop_at=6)
  assert part['finished'] is False
  resumed = pretrain.train(c, str(tmp_path / 'part'))
  assert resumed['final_loss'] == whole['final_loss']
  rows = [[json.loads(r) for r in open(tmp_path / w / 'metrics.jsonl')] for w in ('whole', 'part')]
  assert [r.get('loss') for r in rows[0]] == [r.get('loss') for r in rows[1]]
  with open(tmp_path / 'whole' / 'manifest.json') as f:
    draws = json.load(f)['sources']
  assert draws[1]['epochs'] > 1 and abs(draws[0]['rows_drawn'] / 128 - 0.6) <= 2 / 128
  (p_whole, s_whole), (p_part, s_part) = (runs.restore_params(str(tmp_path / w))
                                          for w in ('whole', 'part'))
  assert s_whole == s_part == 16
  for x, y in zip(jax.tree.leaves(p_whole), jax.tree.leaves(p_part)):
    np.testing.assert_array_equal(x, y)


def test_tokenizing_workers_end_with_the_process_that_started_them(tmp_path):
  """A preparation killed outright (SIGTERM or SIGKILL to the main process alone) leaves no
  worker tokenizing on as an orphan."""
  import subprocess
  import sys
  import time
  script = """
import os, sys, time
from lm.data import build
runner = build._Runner(2)
futures = [runner.pool.submit(time.sleep, 60) for _ in range(2)]
time.sleep(3)
print(' '.join(str(p) for p in runner.pool._processes), flush=True)
os.kill(os.getpid(), 9)
"""
  root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
  out = subprocess.run([sys.executable, '-c', script], cwd=root, capture_output=True, text=True,
                       timeout=60, env=dict(os.environ, PYTHONPATH=root))
  pids = [int(p) for p in out.stdout.split()]
  assert len(pids) == 2, out.stderr[-2000:]
  deadline = time.time() + 10
  alive = pids
  while alive and time.time() < deadline:
    time.sleep(0.2)
    alive = [p for p in pids if os.path.exists(f'/proc/{p}') and
             open(f'/proc/{p}/stat').read().split()[2] != 'Z']
  assert not alive
