"""Preparing text corpora at scale: throughput, worker scaling, peak memory, loader and mixture.

    python -m benchmarks.data_prep [--out=docs/results/data_prep] [--gb=1.0] [--small_gb=0.25]
        [--work=/tmp/lm_data_prep] [--runs=large:bytes:1,large:bytes:2,...]

1. Corpora. Parquet shards (`text` and `id` columns, about --shard_mb MB of text each, in row
   groups of about --row_group_mb MB) holding about --gb GB (10^9 bytes of UTF-8) of documents,
   half code and half prose by bytes: the running interpreter's standard library .py files
   (lm.data.corpus.stdlib_files), each copy headed by a line naming its copy number and document
   id, and seeded English-like prose (sentences of words drawn by their frequency in the Python
   documentation's topics, pydoc_data). The --small_gb corpus is the head of the same stream.
   Both are kept in --work (a manifest marks a complete corpus) and reused by later runs.
2. Preparation. Each row of --runs (corpus:tokenizer:workers) runs `lm.data.tokens.prepare` in a
   fresh child process with its own cache folder (removed afterwards): vocabulary --vocab,
   sp_train_bytes --sp_train_mb. A one-worker child is pinned to one core (and RAYON_NUM_THREADS=1),
   so it measures one core; a two-worker child may use both. The child times the phases by
   wrapping the library's functions (listing, the tokenizer's training sample, its training, the
   parallel tokenizing, the concatenation of the parts). Memory: the parent polls the resident set
   of the child and of its descendants (the spawn workers are grandchildren) every --poll_s s, and
   the child adds the kernel's ru_maxrss of itself and of its reaped workers; reported are the
   largest single process and the largest sum over processes alive at one time.
3. Loader. From the first large bytes-tokenized dataset (about --gb * 10^9 tokens), a child pinned
   to one core times `Dataset.batch('train', step, 64, 1024, seed=0)` over --loader_steps steps.
4. Mixture. Two small jsonl corpora, one of 'a' words and one of 'b' words, prepared with the bytes
   tokenizer as data.sources at weights 0.7 / 0.3: shares of rows by `MixtureDataset.draws` and by
   counting the rows of --mix_steps batches of 32 x 64.
Writes results.json and results.md to --out and prints the table with PASS/FAIL per target.
"""
import json
import os
import platform
import re
import shutil
import subprocess
import sys
import time

from absl import app
from absl import flags
import numpy as np

FLAGS = flags.FLAGS
flags.DEFINE_string('out', 'docs/results/data_prep', 'Output folder (results.md, results.json).')
flags.DEFINE_float('gb', 1.0, 'Size of the large corpus in GB (10^9 bytes of text).')
flags.DEFINE_float('small_gb', 0.25, 'Size of the small corpus in GB.')
flags.DEFINE_string('work', '/tmp/lm_data_prep', 'Folder for the corpora and the cache folders.')
flags.DEFINE_list('runs', ['large:bytes:1', 'large:bytes:2', 'large:sentencepiece:1',
                           'large:sentencepiece:2', 'large:bpe:1', 'large:bpe:2',
                           'small:bytes:2', 'small:sentencepiece:2', 'small:bpe:2'],
                  'Preparations to measure, corpus:tokenizer:workers (corpus large or small).')
flags.DEFINE_integer('vocab', 4096, 'Vocabulary of the trained tokenizers.')
flags.DEFINE_float('sp_train_mb', 20.0, 'data.sp_train_bytes in MB (the tokenizer sample).')
flags.DEFINE_float('shard_mb', 128.0, 'Text per parquet shard, MB.')
flags.DEFINE_float('row_group_mb', 16.0, 'Text per parquet row group, MB.')
flags.DEFINE_integer('loader_steps', 2000, 'Timed Dataset.batch calls (0: skip the loader).')
flags.DEFINE_integer('mix_steps', 10000, 'Mixture batches counted (0: skip the mixture).')
flags.DEFINE_float('poll_s', 0.05, 'Interval of the resident-set polling, seconds.')
flags.DEFINE_integer('run_timeout', 1800, 'Seconds before a preparation child is killed.')
flags.DEFINE_integer('seed', 0, 'Seed of the generated prose.')
flags.DEFINE_string('child', '', 'Internal: the JSON task of a child process.')

GENERATOR_VERSION = 1
MB = 1e6
TARGETS = {'rss_gb': 1.0, 'rss_spread': 0.10, 'speedup': 1.7, 'bpe_mb_s_core': 5.0,
           'loader_tokens_s': 1e6, 'mix_share': 0.01}


# ---------------------------------------------------------------------------------------------
# The generated corpus.

def _words():
  """(words, probabilities): lower-case words of the Python documentation's topics by frequency."""
  import pydoc_data.topics
  text = ' '.join(pydoc_data.topics.topics[k] for k in sorted(pydoc_data.topics.topics))
  counts = {}
  for w in re.findall(r'[a-z]{1,14}', text.lower()):
    counts[w] = counts.get(w, 0) + 1
  words = sorted(counts, key=lambda w: (-counts[w], w))
  p = np.array([counts[w] for w in words], np.float64)
  return words, p / p.sum()


def _sentences(rng, n: int) -> list[str]:
  """n English-like sentences: 4-24 words by frequency, a capital, commas now and then, a stop."""
  words, p = _words()
  lengths = rng.integers(4, 25, n)
  ids = rng.choice(len(words), size=int(lengths.sum()), p=p)
  commas = rng.random(len(ids)) < 0.06
  stops = rng.choice(['.', '.', '.', '?', '!'], n)
  out, at = [], 0
  for i, k in enumerate(lengths):
    ws = [words[j] + (',' if c else '') for j, c in zip(ids[at:at + k - 1], commas[at:at + k - 1])]
    ws.append(words[ids[at + k - 1]])
    at += k
    s = ' '.join(ws)
    out.append(s[0].upper() + s[1:] + stops[i])
  return out


def _code_files() -> list[tuple[str, str]]:
  """(relative path, text) of the standard library's .py files (none holding NUL bytes)."""
  from lm.data import corpus as corpus_lib
  out = []
  for f in corpus_lib.stdlib_files():
    with open(f.path, 'rb') as fh:
      raw = fh.read()
    if b'\x00' not in raw:
      out.append((f.relpath, corpus_lib.decode_text(raw)[0]))
  return out


def documents(seed: int):
  """An endless stream of (id, text): code and prose alternating so each holds half the bytes."""
  rng = np.random.default_rng(seed)
  pool = _sentences(rng, 100_000)
  code = _code_files()
  code_order, copy, at = rng.permutation(len(code)), 0, 0
  code_bytes = prose_bytes = 0
  n = 0
  while True:
    n += 1
    doc_id = f'doc{n:09d}'
    if code_bytes <= prose_bytes:
      if at == len(code):
        code_order, copy, at = rng.permutation(len(code)), copy + 1, 0
      path, body = code[code_order[at]]
      at += 1
      text = f'# {path}, copy {copy} ({doc_id})\n{body}'
      code_bytes += len(text)
    else:
      k = int(rng.integers(10, 250))
      picks = rng.integers(0, len(pool), k)
      breaks = np.flatnonzero(rng.random(k) < 0.2)
      paras, start = [], 0
      for b in list(breaks) + [k]:
        if b > start:
          paras.append(' '.join(pool[i] for i in picks[start:b]))
          start = b
      text = f'{pool[picks[0]][:-1]} ({doc_id})\n\n' + '\n\n'.join(paras) + '\n'
      prose_bytes += len(text)
    yield doc_id, text


def make_corpus(folder: str, gb: float, seed: int, shard_mb: float, row_group_mb: float) -> dict:
  """The corpus of about gb GB in folder (generated unless its manifest matches); its manifest."""
  import pyarrow as pa
  import pyarrow.parquet as pq
  want = {'version': GENERATOR_VERSION, 'gb': gb, 'seed': seed, 'shard_mb': shard_mb,
          'row_group_mb': row_group_mb, 'python': sys.version.split()[0]}
  manifest = os.path.join(folder, 'manifest.json')
  try:
    with open(manifest) as f:
      done = json.load(f)
    if all(done.get(k) == v for k, v in want.items()):
      return dict(done, cached=True)
  except (OSError, ValueError):
    pass
  shutil.rmtree(folder, ignore_errors=True)
  os.makedirs(folder)
  t0 = time.perf_counter()
  total, docs, shards, groups = 0, 0, 0, 0
  stream = documents(seed)
  target, shard_bytes, group_bytes = gb * 1e9, shard_mb * MB, row_group_mb * MB
  schema = pa.schema([('id', pa.string()), ('text', pa.string())])
  while total < target:
    path = os.path.join(folder, f'shard-{shards:05d}.parquet')
    with pq.ParquetWriter(path, schema) as writer:
      in_shard = 0
      while in_shard < shard_bytes and total < target:
        ids, texts, n = [], [], 0
        while n < group_bytes and in_shard + n < shard_bytes and total + n < target:
          doc_id, text = next(stream)
          ids.append(doc_id)
          texts.append(text)
          n += len(text.encode('utf-8'))
        writer.write_table(pa.table({'id': ids, 'text': texts}, schema=schema),
                           row_group_size=len(ids))
        in_shard += n
        total += n
        docs += len(ids)
        groups += 1
    shards += 1
  done = dict(want, text_bytes=total, documents=docs, shards=shards, row_groups=groups,
              file_bytes=sum(os.path.getsize(os.path.join(folder, f)) for f in os.listdir(folder)),
              generate_seconds=time.perf_counter() - t0)
  with open(manifest, 'w') as f:
    json.dump(done, f, indent=1)
  return dict(done, cached=False)


def make_mix_corpora(work: str) -> dict:
  """Two small jsonl corpora: words of the letter a, and of the letter b (name -> folder)."""
  rng = np.random.default_rng(7)
  out = {}
  for letter in 'ab':
    folder = os.path.join(work, f'mix_{letter}')
    shutil.rmtree(folder, ignore_errors=True)
    os.makedirs(folder)
    with open(os.path.join(folder, f'{letter}.jsonl'), 'w') as f:
      for _ in range(400):
        lengths = rng.integers(1, 9, int(rng.integers(300, 1500)))
        f.write(json.dumps({'text': ' '.join(letter * int(k) for k in lengths)}) + '\n')
    out[letter] = folder
  return out


# ---------------------------------------------------------------------------------------------
# Children.

def _pin_one_core() -> None:
  os.sched_setaffinity(0, {min(os.sched_getaffinity(0))})
  os.environ['RAYON_NUM_THREADS'] = '1'


def _data_config(path: str, tokenizer: str, workers: int, cache_dir: str, vocab: int,
                 sp_train_bytes: int):
  from configs import base
  d = base.get_config().data
  d.corpus, d.path, d.text_field = 'text', path, 'text'
  d.tokenizer, d.vocab_size, d.sp_train_bytes = tokenizer, vocab, sp_train_bytes
  d.workers, d.cache_dir = workers, cache_dir
  return d


def _timed(module, name: str, times: dict) -> None:
  """Replaces module.name by a wrapper that adds its seconds to times[name]."""
  fn = getattr(module, name)

  def wrapper(*args, **kwargs):
    t0 = time.perf_counter()
    try:
      return fn(*args, **kwargs)
    finally:
      times[name] = times.get(name, 0.0) + time.perf_counter() - t0
  setattr(module, name, wrapper)


def child_prepare(task: dict) -> dict:
  import resource
  if task['pin']:
    _pin_one_core()
  from lm.data import build as build_lib
  from lm.data import sources
  from lm.data import tokenizer as tokenizer_lib
  from lm.data import tokens
  times: dict = {}
  for module, name in ((sources, 'list_source'), (build_lib, 'training_sample'),
                       (tokenizer_lib, 'train_sentencepiece'), (tokenizer_lib, 'train_bpe'),
                       (build_lib, 'build'), (build_lib, '_assemble')):
    _timed(module, name, times)
  cfg = _data_config(task['path'], task['tokenizer'], task['workers'], task['cache_dir'],
                     task['vocab'], task['sp_train_bytes'])
  t0 = time.perf_counter()
  ds = tokens.prepare(cfg, progress=False)
  wall = time.perf_counter() - t0
  splits = ds.info['splits']
  me, kids = resource.getrusage(resource.RUSAGE_SELF), resource.getrusage(resource.RUSAGE_CHILDREN)
  return {'wall_s': wall, 'cpu_s': me.ru_utime + me.ru_stime + kids.ru_utime + kids.ru_stime,
          'phases_s': times, 'path': ds.path, 'corpus_hash': ds.corpus_hash,
          'tokenizer_hash': ds.tokenizer_hash,
          'text_bytes': sum(splits[s]['bytes'] for s in splits),
          'tokens': sum(splits[s]['tokens'] for s in splits),
          'train_tokens': splits['train']['tokens'], 'vocab_size': ds.tokenizer.vocab_size,
          'cores': len(os.sched_getaffinity(0)),
          'ru_maxrss_self_mb': resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024 / MB,
          'ru_maxrss_children_mb':
              resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss * 1024 / MB}


def child_loader(task: dict) -> dict:
  _pin_one_core()
  from lm.data import tokens
  cfg = _data_config(task['path'], 'bytes', task['workers'], task['cache_dir'], task['vocab'],
                     task['sp_train_bytes'])
  ds = tokens.prepare(cfg, progress=False)
  bs, sl, steps = task['batch_size'], task['seq_len'], task['steps']
  t0 = time.perf_counter()
  first = ds.batch('train', 0, bs, sl, seed=0)
  first_s = time.perf_counter() - t0
  checksum = int(first[:, 0].sum())
  t0 = time.perf_counter()
  for step in range(1, steps + 1):
    b = ds.batch('train', step, bs, sl, seed=0)
    checksum += int(b[0, 0])
  seconds = time.perf_counter() - t0
  return {'train_tokens': int(len(ds.train)), 'windows': ds.n_windows('train', sl),
          'batch_size': bs, 'seq_len': sl, 'steps': steps, 'seconds': seconds,
          'first_batch_s': first_s, 'ms_per_batch': 1e3 * seconds / steps,
          'tokens_per_s': steps * bs * sl / seconds, 'cores': len(os.sched_getaffinity(0)),
          'checksum': checksum}


def run_child(task: dict, timeout: float) -> dict:
  """Runs task in a fresh `python -m benchmarks.data_prep --child=...`, polling the resident set
  of it and of its descendants; its result plus 'rss'."""
  import psutil
  result_path = task['result']
  if os.path.exists(result_path):
    os.remove(result_path)
  cmd = [sys.executable, '-m', 'benchmarks.data_prep', f'--child={json.dumps(task)}']
  t0 = time.perf_counter()
  proc = subprocess.Popen(cmd)
  me = psutil.Process(proc.pid)
  peaks: dict = {}
  roles: dict = {}
  peak_sum = 0
  while proc.poll() is None:
    if time.perf_counter() - t0 > timeout:
      proc.kill()
      proc.wait()
      raise RuntimeError(f'the child {task["kind"]} ran past {timeout} s')
    now = 0
    try:
      family = [me] + me.children(recursive=True)
    except psutil.NoSuchProcess:
      family = []
    for p in family:
      try:
        rss = p.memory_info().rss
        if p.pid not in roles:
          line = ' '.join(p.cmdline())
          roles[p.pid] = ('main' if p.pid == proc.pid else 'resource_tracker'
                          if 'resource_tracker' in line else 'worker')
      except (psutil.NoSuchProcess, psutil.AccessDenied, psutil.ZombieProcess):
        continue
      peaks[p.pid] = max(peaks.get(p.pid, 0), rss)
      now += rss
    peak_sum = max(peak_sum, now)
    time.sleep(FLAGS.poll_s)
  seconds = time.perf_counter() - t0
  if proc.returncode:
    raise RuntimeError(f'the child {task["kind"]} failed with exit status {proc.returncode}')
  with open(result_path) as f:
    out = json.load(f)
  by_role: dict = {}
  for pid, rss in peaks.items():
    by_role.setdefault(roles[pid], []).append(rss / MB)
  polled_max = max(peaks.values(), default=0) / MB
  largest = max([polled_max, out.get('ru_maxrss_self_mb', 0), out.get('ru_maxrss_children_mb', 0)])
  out['rss'] = {'largest_process_mb': largest, 'sum_mb': max(peak_sum / MB, largest),
                'polled_largest_mb': polled_max, 'polled_sum_mb': peak_sum / MB,
                'main_mb': max(by_role.get('main', [0]) + [out.get('ru_maxrss_self_mb', 0)]),
                'workers_mb': sorted(by_role.get('worker', []), reverse=True),
                'processes': len(peaks)}
  out['child_seconds'] = seconds
  return out


# ---------------------------------------------------------------------------------------------
# The parent.

def _machine() -> dict:
  model = ''
  try:
    with open('/proc/cpuinfo') as f:
      model = next((ln.split(':', 1)[1].strip() for ln in f if ln.startswith('model name')), '')
  except OSError:
    pass
  import psutil
  return {'cpu': model or platform.machine(), 'cores': len(os.sched_getaffinity(0)),
          'memory_gb': round(psutil.virtual_memory().total / 2**30, 1),
          'python': sys.version.split()[0], 'platform': platform.platform()}


def _disk_free_gb(path: str) -> float:
  return shutil.disk_usage(path).free / 1e9


def prepare_row(spec: str, corpora: dict, work: str) -> dict:
  name, tokenizer, workers = spec.split(':')
  workers = int(workers)
  row = {'run': spec, 'corpus': name, 'tokenizer': tokenizer, 'workers': workers,
         'load_before': [round(x, 2) for x in os.getloadavg()]}
  if tokenizer == 'bpe':
    from lm.data import tokenizer as tokenizer_lib
    if not hasattr(tokenizer_lib, 'train_bpe'):
      row['skipped'] = 'lm.data.tokenizer has no train_bpe'
      print(f'{spec}: skipped: {row["skipped"]}', flush=True)
      return row
  cache = os.path.join(work, f'cache-{name}-{tokenizer}-{workers}')
  shutil.rmtree(cache, ignore_errors=True)
  task = {'kind': 'prepare', 'path': corpora[name]['folder'], 'tokenizer': tokenizer,
          'workers': workers, 'cache_dir': cache, 'vocab': FLAGS.vocab,
          'sp_train_bytes': int(FLAGS.sp_train_mb * MB), 'pin': workers == 1,
          'result': os.path.join(work, 'child.json')}
  print(f'{spec}: preparing {corpora[name]["text_bytes"] / 1e9:.2f} GB ({_disk_free_gb(work):.1f} '
        f'GB free, load {row["load_before"][0]})', flush=True)
  out = run_child(task, FLAGS.run_timeout)
  row.update(out)
  row['load_after'] = [round(x, 2) for x in os.getloadavg()]
  ph = out['phases_s']
  row['tokenizer_s'] = ph.get('training_sample', 0.0) + ph.get('train_sentencepiece', 0.0) + \
      ph.get('train_bpe', 0.0)
  row['tokenize_s'] = ph.get('build', 0.0) - ph.get('_assemble', 0.0)
  row['assemble_s'] = ph.get('_assemble', 0.0)
  mb = out['text_bytes'] / MB
  row['mb_s'] = mb / out['wall_s']
  row['tokenize_mb_s'] = mb / max(row['tokenize_s'], 1e-9)
  row['mb_s_per_core'] = row['tokenize_mb_s'] / workers
  row['bytes_per_token'] = out['text_bytes'] / max(out['tokens'], 1)
  if name == 'large' and tokenizer == 'bytes' and FLAGS.loader_steps and 'loader' not in corpora:
    corpora['loader'] = run_child(dict(task, kind='loader', batch_size=64, seq_len=1024,
                                       steps=FLAGS.loader_steps), FLAGS.run_timeout)
    print(f'loader: {json.dumps(corpora["loader"])}', flush=True)
  shutil.rmtree(cache, ignore_errors=True)
  print(json.dumps({k: v for k, v in row.items() if k != 'path'}), flush=True)
  return row


def mixture(work: str) -> dict:
  from lm.data import tokens
  folders = make_mix_corpora(work)
  cache = os.path.join(work, 'cache-mix')
  shutil.rmtree(cache, ignore_errors=True)
  d = _data_config('', 'bytes', 1, cache, FLAGS.vocab, 0)
  d.path = ''
  d.sources = ({'path': folders['a'], 'weight': 0.7, 'name': 'a'},
               {'path': folders['b'], 'weight': 0.3, 'name': 'b'})
  ds = tokens.prepare(d, progress=False)
  steps, bs, sl = FLAGS.mix_steps, 32, 64
  draws = ds.draws(steps, bs, sl)
  counted = {'a': 0, 'b': 0, 'both': 0, 'neither': 0}
  t0 = time.perf_counter()
  for step in range(steps):
    b = ds.batch('train', step, bs, sl, seed=0)
    has_a, has_b = (b == ord('a')).any(1), (b == ord('b')).any(1)
    counted['a'] += int((has_a & ~has_b).sum())
    counted['b'] += int((has_b & ~has_a).sum())
    counted['both'] += int((has_a & has_b).sum())
    counted['neither'] += int((~has_a & ~has_b).sum())
  seconds = time.perf_counter() - t0
  rows = steps * bs
  out = {'steps': steps, 'batch_size': bs, 'seq_len': sl, 'weights': {'a': 0.7, 'b': 0.3},
         'draws': {x['name']: x['rows_drawn'] for x in draws}, 'counted': counted,
         'seconds': seconds, 'source_tokens': {x['name']: x['tokens'] for x in draws}}
  out['draws_share'] = {k: v / rows for k, v in out['draws'].items()}
  out['counted_share'] = {k: counted[k] / rows for k in 'ab'}
  shutil.rmtree(cache, ignore_errors=True)
  for f in folders.values():
    shutil.rmtree(f, ignore_errors=True)
  print(f'mixture: {json.dumps(out)}', flush=True)
  return out


def verdicts(result: dict) -> list[tuple[str, bool, str]]:
  """(target, passed, the numbers) per target that the runs measured."""
  rows = [r for r in result['rows'] if 'skipped' not in r]
  out = []
  if rows:
    worst = max(rows, key=lambda r: r['rss']['largest_process_mb'])
    out.append((f'peak RSS < {TARGETS["rss_gb"]:g} GB in every process', worst['rss'][
        'largest_process_mb'] < TARGETS['rss_gb'] * 1e3,
        f'largest {worst["rss"]["largest_process_mb"]:.0f} MB ({worst["run"]})'))
  by = {(r['corpus'], r['tokenizer'], r['workers']): r for r in rows}
  for (c, tok, w), small in sorted(by.items()):
    large = by.get(('large', tok, w))
    if c != 'small' or large is None:
      continue
    a, b = large['rss']['largest_process_mb'], small['rss']['largest_process_mb']
    spread = abs(a - b) / max(a, b)
    out.append((f'peak RSS independent of corpus size ({tok}, {w} workers, within '
                f'{TARGETS["rss_spread"]:.0%})', spread <= TARGETS['rss_spread'],
                f'{large["text_bytes"] / 1e9:.2f} GB: {a:.0f} MB, {small["text_bytes"] / 1e9:.2f} '
                f'GB: {b:.0f} MB ({spread:.1%} apart)'))
  for tok in ('bytes', 'sentencepiece', 'bpe'):
    for c in ('large', 'small'):
      one, two = by.get((c, tok, 1)), by.get((c, tok, 2))
      if one and two:
        s = one['wall_s'] / two['wall_s']
        st = one['tokenize_s'] / max(two['tokenize_s'], 1e-9)
        out.append((f'2 workers >= {TARGETS["speedup"]}x one ({tok}, {c}, wall time)',
                    s >= TARGETS['speedup'],
                    f'{s:.2f}x wall ({one["wall_s"]:.0f} s -> {two["wall_s"]:.0f} s); '
                    f'{st:.2f}x in the tokenizing phase'))
  bpe = [r for r in rows if r['tokenizer'] == 'bpe' and r['workers'] == 1]
  for r in bpe:
    out.append((f'HF BPE >= {TARGETS["bpe_mb_s_core"]:g} MB/s per core ({r["corpus"]}, '
                'tokenizing, one pinned core)', r['mb_s_per_core'] >= TARGETS['bpe_mb_s_core'],
                f'{r["mb_s_per_core"]:.2f} MB/s'))
  ld = result.get('loader')
  if ld:
    out.append((f'loader >= {TARGETS["loader_tokens_s"]:.0e} tokens/s on one core',
                ld['tokens_per_s'] >= TARGETS['loader_tokens_s'],
                f'{ld["tokens_per_s"] / 1e6:.1f}M tokens/s ({ld["ms_per_batch"]:.2f} ms per '
                f'{ld["batch_size"]}x{ld["seq_len"]} batch)'))
  mx = result.get('mixture')
  if mx:
    errs = [abs(mx[k][s] - mx['weights'][s])
            for k in ('draws_share', 'counted_share') for s in 'ab']
    out.append((f'mixture shares within {TARGETS["mix_share"]:.0%} of 0.7/0.3', max(errs) <=
                TARGETS['mix_share'],
                f'draws() {mx["draws_share"]["a"]:.4f}/{mx["draws_share"]["b"]:.4f}, counted '
                f'{mx["counted_share"]["a"]:.4f}/{mx["counted_share"]["b"]:.4f}'))
  return out


def _table(result: dict) -> str:
  m = result['machine']
  lines = [f"Machine: {m['cpu']}, {m['cores']} CPU cores, {m['memory_gb']} GiB; Python "
           f"{m['python']}. Command: `{result['command']}`. {result['seconds']:.0f} s in all. "
           f"The driver process held {result['driver_rss_mb']:.0f} MB (a child's ru_maxrss counts "
           "from its parent's size at the start, so that is the floor of the kernel's numbers).",
           '']
  for name, c in result['corpora'].items():
    lines.append(f"Corpus {name}: {c['text_bytes'] / 1e9:.3f} GB of text, {c['documents']} "
                 f"documents, {c['shards']} parquet shards, {c['row_groups']} row groups, "
                 f"{c['file_bytes'] / 1e9:.3f} GB on disk; generated in "
                 f"{c['generate_seconds']:.1f} s"
                 f"{' (cached from an earlier run)' if c['cached'] else ''}.")
  lines += ['', 'Preparation (`lm.data.tokens.prepare`, fresh child process each; a one-worker '
            'child is pinned to one core). Tokenizer s: the training sample plus training; '
            'tokenizing s: the parallel phase of lm.data.build.build; concat s: joining the parts '
            'into train.bin/val.bin. MB/s per core: tokenizing phase / workers. RSS: largest '
            'single process, and the largest sum over the processes alive at one time.', '',
            '| corpus | tokenizer | workers | text GB | bytes/token | wall s | CPU s | tokenizer s '
            '| tokenizing s | concat s | MB/s overall | MB/s tokenizing | MB/s per core '
            '| RSS main MB | RSS largest MB | RSS sum MB | load before |',
            '|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|']
  for r in result['rows']:
    if 'skipped' in r:
      lines.append(f"| {r['corpus']} | {r['tokenizer']} | {r['workers']} | skipped: "
                   f"{r['skipped']} |" + ' |' * 13)
      continue
    lines.append(
        f"| {r['corpus']} | {r['tokenizer']} | {r['workers']} | {r['text_bytes'] / 1e9:.3f} "
        f"| {r['bytes_per_token']:.2f} | {r['wall_s']:.1f} | {r['cpu_s']:.0f} "
        f"| {r['tokenizer_s']:.1f} "
        f"| {r['tokenize_s']:.1f} | {r['assemble_s']:.1f} | {r['mb_s']:.1f} "
        f"| {r['tokenize_mb_s']:.1f} | {r['mb_s_per_core']:.1f} | {r['rss']['main_mb']:.0f} "
        f"| {r['rss']['largest_process_mb']:.0f} | {r['rss']['sum_mb']:.0f} "
        f"| {r['load_before'][0]} |")
  ld = result.get('loader')
  if ld:
    lines += ['', f"Loader: `Dataset.batch('train', step, {ld['batch_size']}, {ld['seq_len']}, "
              f"seed=0)` on one core over {ld['train_tokens'] / 1e9:.2f}e9 training tokens "
              f"({ld['windows']} windows, page cache warm): {ld['steps']} steps in "
              f"{ld['seconds']:.2f} s, {ld['ms_per_batch']:.2f} ms per batch, "
              f"**{ld['tokens_per_s'] / 1e6:.1f}M tokens/s** (the first batch, which builds the "
              f"epoch permutation, {ld['first_batch_s'] * 1e3:.0f} ms)."]
  mx = result.get('mixture')
  if mx:
    lines += ['', f"Mixture: sources a/b at weights 0.7/0.3 (bytes tokenizer; "
              f"{mx['source_tokens']['a']} / {mx['source_tokens']['b']} training tokens), "
              f"{mx['steps']} batches of {mx['batch_size']} x {mx['seq_len']}: rows by draws() "
              f"{mx['draws']['a']} / {mx['draws']['b']} "
              f"({mx['draws_share']['a']:.4f} / {mx['draws_share']['b']:.4f}); counted "
              f"{mx['counted']['a']} / {mx['counted']['b']} "
              f"({mx['counted_share']['a']:.4f} / {mx['counted_share']['b']:.4f}; rows with both "
              f"letters {mx['counted']['both']}, with neither {mx['counted']['neither']})."]
  by = {}
  for r in result['rows']:
    if 'skipped' not in r:
      by.setdefault((r['corpus'], r['tokenizer']), []).append(r)
  same = []
  for (c, tok), rs in sorted(by.items()):
    if len(rs) > 1:
      agree = {k: len({r[k] for r in rs}) == 1 for k in ('corpus_hash', 'tokenizer_hash', 'tokens')}
      same.append(f"{c} {tok}: corpus hash {'same' if agree['corpus_hash'] else 'DIFFERS'}, "
                  f"tokenizer {'same' if agree['tokenizer_hash'] else 'differs'}, "
                  f"tokens {'same' if agree['tokens'] else 'differ'}")
  if same:
    lines += ['', 'One worker against two: ' + '; '.join(same) + '.']
  lines += ['', '| target | result | measured |', '|---|---|---|']
  for name, ok, what in result['verdicts']:
    lines.append(f"| {name} | {'PASS' if ok else 'FAIL'} | {what} |")
  return '\n'.join(lines) + '\n'


def main(argv):
  del argv
  if FLAGS.child:
    task = json.loads(FLAGS.child)
    if task['kind'] == 'corpus':
      out = make_corpus(task['folder'], task['gb'], task['seed'], task['shard_mb'],
                        task['row_group_mb'])
    else:
      out = child_prepare(task) if task['kind'] == 'prepare' else child_loader(task)
    with open(task['result'], 'w') as f:
      json.dump(out, f)
    return
  t_start = time.time()
  work = os.path.abspath(FLAGS.work)
  os.makedirs(work, exist_ok=True)
  names = {spec.split(':')[0] for spec in FLAGS.runs}
  bad = names - {'large', 'small'}
  if bad:
    raise app.UsageError(f'--runs names the corpus {sorted(bad)[0]!r}; use large or small')
  need = 4.2 * FLAGS.gb * ('large' in names) + 4.2 * FLAGS.small_gb * ('small' in names) + 1
  free = _disk_free_gb(work)
  print(f'{work}: {free:.1f} GB free; the largest bytes preparation needs about '
        f'{4 * max(FLAGS.gb, FLAGS.small_gb):.1f} GB at once', flush=True)
  if free < need:
    raise app.UsageError(f'{work} has {free:.1f} GB free, less than the {need:.1f} GB these runs '
                         'need; free disk space or lower --gb')
  import psutil
  driver_mb = psutil.Process().memory_info().rss / MB
  corpora = {}
  for name, gb in (('large', FLAGS.gb), ('small', FLAGS.small_gb)):
    if name in names:
      folder = os.path.join(work, f'corpus-{gb:g}gb')
      # Generated in a child: a child's ru_maxrss starts from its parent's high-water mark (the
      # kernel keeps it across exec), so this process stays small.
      task = {'kind': 'corpus', 'folder': folder, 'gb': gb, 'seed': FLAGS.seed,
              'shard_mb': FLAGS.shard_mb, 'row_group_mb': FLAGS.row_group_mb,
              'result': os.path.join(work, 'child.json')}
      corpora[name] = dict(run_child(task, FLAGS.run_timeout), folder=folder)
      corpora[name].pop('rss')
      c = corpora[name]
      print(f'corpus {name}: {c["text_bytes"] / 1e9:.3f} GB, {c["documents"]} documents, '
            f'{c["shards"]} shards, {c["file_bytes"] / 1e9:.3f} GB on disk, generated in '
            f'{c["generate_seconds"]:.1f} s{" (cached)" if c["cached"] else ""}', flush=True)
  rows = [prepare_row(spec, corpora, work) for spec in FLAGS.runs]
  driver_mb = max(driver_mb, psutil.Process().memory_info().rss / MB)
  loader = corpora.pop('loader', None)
  mix = mixture(work) if FLAGS.mix_steps else None
  result = {'command': ' '.join(['python -m benchmarks.data_prep'] + sys.argv[1:]),
            'machine': _machine(), 'targets': TARGETS, 'vocab': FLAGS.vocab,
            'sp_train_mb': FLAGS.sp_train_mb, 'driver_rss_mb': driver_mb, 'rows': rows,
            'loader': loader, 'mixture': mix,
            'corpora': {k: {x: y for x, y in v.items() if x != 'folder'}
                        for k, v in corpora.items()},
            'seconds': time.time() - t_start}
  result['verdicts'] = verdicts(result)
  os.makedirs(FLAGS.out, exist_ok=True)
  with open(os.path.join(FLAGS.out, 'results.json'), 'w') as f:
    json.dump(result, f, indent=1)
  table = _table(result)
  with open(os.path.join(FLAGS.out, 'results.md'), 'w') as f:
    f.write(table)
  print(table)


if __name__ == '__main__':
  app.run(main)
