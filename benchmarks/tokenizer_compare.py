"""Bytes, SentencePiece BPE and Hugging Face byte-level BPE on the same text.

    python -m benchmarks.tokenizer_compare [--out=DIR] [--max_mb=30] [--sizes=4096,16384,32768]

The corpus is what this machine has: English prose (the Python documentation's topics in
pydoc_data, the licence texts of /usr/share/common-licenses, Vim's manual and the text, Markdown
and reStructuredText files of /usr/share/doc without change logs) and code (the running
interpreter's standard library .py files). A file (a pydoc topic) is a document; duplicates are
dropped. A hash of each document's name holds out 10% of them. The tokenizers train on at most
--max_mb of the other documents, half prose and half code (a seeded sample), all of them on the
same text: lm's ByteTokenizer (nothing to train), `train_sentencepiece(model_type='bpe')` and
`train_bpe`, at each of --sizes. A size a tokenizer cannot learn from this text is skipped with
the reason. Measured: bytes per token on the held-out prose, code and both; training seconds on
all cores (the fastest of --train_rounds trainings, which must all give the same tokenizer);
encode throughput, MB/s of held-out UTF-8 through `encode_many` in a child process pinned to one
core (the fastest of --encode_rounds passes). Writes results.md and results.json to --out.
"""
import glob
import hashlib
import json
import os
import platform
import sys
import sysconfig
import tempfile
import time
from concurrent import futures
import multiprocessing

from absl import app
from absl import flags
import numpy as np

FLAGS = flags.FLAGS
flags.DEFINE_string('out', 'runs/tokenizer_compare', 'Output folder (results.md, results.json).')
flags.DEFINE_float('max_mb', 30.0, 'Training text cap in MB (10^6 bytes of UTF-8).')
flags.DEFINE_list('sizes', ['4096', '16384', '32768'], 'Vocabulary sizes to train.')
flags.DEFINE_float('held_out', 0.1, 'Fraction of the documents held out, by a hash of their name.')
flags.DEFINE_integer('train_rounds', 2, 'Trainings of each tokenizer (the fastest counts; all '
                     'must give the same tokenizer).')
flags.DEFINE_integer('encode_rounds', 3, 'Timed encoding passes over the held-out text.')
flags.DEFINE_integer('seed', 0, 'Seed of the training sample.')

_SKIP_DIRS = {'site-packages', 'dist-packages', '__pycache__'}
PROSE_SOURCES = ('pydoc_data.topics', '/usr/share/common-licenses/*',
                 '/usr/share/vim/vim*/doc/*.txt',
                 '/usr/share/doc/**/*.{txt,md,rst} (no change logs)')


def _read(path: str) -> str | None:
  try:
    with open(path, 'rb') as f:
      return f.read().decode('utf-8')
  except (OSError, UnicodeDecodeError):
    return None


def prose_documents() -> dict[str, str]:
  """name -> text of the English prose found on this machine."""
  import pydoc_data.topics
  docs = {f'pydoc/{k}': v for k, v in sorted(pydoc_data.topics.topics.items())}
  paths = sorted(glob.glob('/usr/share/common-licenses/*'))
  paths += sorted(glob.glob('/usr/share/vim/vim*/doc/*.txt'))
  for ext in ('txt', 'md', 'rst'):
    paths += sorted(p for p in glob.glob(f'/usr/share/doc/**/*.{ext}', recursive=True)
                    if 'changelog' not in p.lower())
  for p in paths:
    if os.path.isfile(p):
      text = _read(p)
      if text:
        docs[p] = text
  return docs


def code_documents() -> dict[str, str]:
  """name -> text of the standard library's .py files."""
  root = sysconfig.get_paths()['stdlib']
  docs = {}
  for dirpath, dirnames, filenames in os.walk(root):
    dirnames[:] = sorted(d for d in dirnames if d not in _SKIP_DIRS and not d.startswith('.'))
    for f in sorted(filenames):
      if f.endswith('.py'):
        text = _read(os.path.join(dirpath, f))
        if text and '\x00' not in text:
          docs[os.path.relpath(os.path.join(dirpath, f), root)] = text
  return docs


def _held_out(name: str, fraction: float) -> bool:
  h = hashlib.sha256(name.encode('utf-8')).digest()
  return int.from_bytes(h[:8], 'big') / 2.0**64 < fraction


def _mb(texts) -> float:
  return sum(len(t.encode('utf-8')) for t in texts) / 1e6


def corpus(max_mb: float, held_out: float, seed: int):
  """(train texts, {'prose': [...], 'code': [...]} held out, a description dict)."""
  seen, kinds = set(), {}
  for kind, docs in (('prose', prose_documents()), ('code', code_documents())):
    kept = {}
    for name, text in docs.items():
      digest = hashlib.sha256(text.encode('utf-8')).digest()
      if digest not in seen:
        seen.add(digest)
        kept[name] = text
    kinds[kind] = kept
  rng = np.random.default_rng(seed)
  train, test, info = [], {}, {}
  budget = {k: max_mb * 1e6 / 2 for k in kinds}
  pools = {}
  for kind, docs in kinds.items():
    names = sorted(docs)
    test[kind] = [docs[n] for n in names if _held_out(f'{kind}/{n}', held_out)]
    pool = [docs[n] for n in names if not _held_out(f'{kind}/{n}', held_out)]
    pools[kind] = [pool[i] for i in rng.permutation(len(pool))]
    info[kind] = {'documents': len(docs), 'mb': round(_mb(docs.values()), 2),
                  'held_out_documents': len(test[kind]), 'held_out_mb': round(_mb(test[kind]), 2)}
  spare = {k: max(0.0, budget[k] - _mb(pools[k]) * 1e6) for k in kinds}
  for kind in kinds:    # what one kind cannot fill goes to the other
    budget[kind] += sum(v for k, v in spare.items() if k != kind)
  for kind, pool in pools.items():
    used = 0
    taken = []
    for text in pool:
      n = len(text.encode('utf-8'))
      if used + n > budget[kind]:
        continue
      used += n
      taken.append(text)
    train += taken
    info[kind].update(train_documents=len(taken), train_mb=round(used / 1e6, 2))
  return train, test, info


def _pin_to_one_core():
  os.sched_setaffinity(0, {min(os.sched_getaffinity(0))})


def _encode(directory: str, test: dict, rounds: int) -> dict:
  """In the pinned child: tokens per held-out kind, and the fastest pass's seconds."""
  from lm.data import tokenizer as tokenizer_lib
  tok = tokenizer_lib.load_tokenizer(directory)
  everything = [t for texts in test.values() for t in texts]
  best, cpu = float('inf'), 0.0
  for _ in range(rounds):
    c0, t0 = time.process_time(), time.perf_counter()
    ids = tok.encode_many(everything)
    seconds = time.perf_counter() - t0
    if seconds < best:
      best, cpu = seconds, time.process_time() - c0
  tokens, start = {}, 0
  for kind, texts in test.items():
    tokens[kind] = int(sum(len(x) for x in ids[start:start + len(texts)]))
    start += len(texts)
  return {'tokens': tokens, 'seconds': best, 'cpu_seconds': cpu,
          'cores': len(os.sched_getaffinity(0))}


def main(argv):
  del argv
  from lm.data import tokenizer as tokenizer_lib
  from lm.errors import UserError
  t_start, load_before = time.time(), os.getloadavg()[0]
  sizes = [int(s) for s in FLAGS.sizes]
  train, test, info = corpus(FLAGS.max_mb, FLAGS.held_out, FLAGS.seed)
  test_bytes = {k: sum(len(t.encode('utf-8')) for t in texts) for k, texts in test.items()}
  train_mb = _mb(train)
  print(f'corpus: {json.dumps(info)}; training text {train_mb:.2f} MB', flush=True)
  candidates = [('bytes', None, lambda v: tokenizer_lib.ByteTokenizer())]
  for v in sizes:
    candidates.append(('sentencepiece bpe', v, lambda v: tokenizer_lib.train_sentencepiece(
        train, vocab_size=v, model_type='bpe', max_train_bytes=0)))
    candidates.append(('hf bpe', v, lambda v: tokenizer_lib.train_bpe(train, vocab_size=v,
                                                                       chat=True)))
  rows = []
  spawn = multiprocessing.get_context('spawn')
  with tempfile.TemporaryDirectory() as tmp, futures.ProcessPoolExecutor(
      1, mp_context=spawn, initializer=_pin_to_one_core) as pool:
    for i, (name, vocab, make) in enumerate(candidates):
      times, hashes = [], set()
      try:
        for _ in range(FLAGS.train_rounds if vocab else 1):
          t0 = time.perf_counter()
          tok = make(vocab)
          times.append(time.perf_counter() - t0)
          hashes.add(tok.hash)
      except UserError as e:
        rows.append({'tokenizer': name, 'vocab': vocab, 'skipped': str(e)})
        print(f'{name} {vocab}: skipped: {e}', flush=True)
        continue
      if len(hashes) != 1:
        raise RuntimeError(f'{name} {vocab}: {len(hashes)} different tokenizers from the same text')
      seconds = min(times) if vocab else None
      directory = os.path.join(tmp, str(i))
      tok.save(directory)
      enc = pool.submit(_encode, directory, test, FLAGS.encode_rounds).result()
      row = {'tokenizer': name, 'vocab': tok.vocab_size, 'train_seconds': seconds,
             'train_seconds_all': times if vocab else None,
             'bytes_per_token': {k: test_bytes[k] / max(enc['tokens'][k], 1) for k in test},
             'encode_mb_per_s': sum(test_bytes.values()) / 1e6 / enc['seconds'],
             'encode_cpu_per_wall': enc['cpu_seconds'] / enc['seconds'],
             'encode_cores': enc['cores']}
      row['bytes_per_token']['all'] = sum(test_bytes.values()) / max(sum(enc['tokens'].values()), 1)
      rows.append(row)
      print(json.dumps(row), flush=True)
  result = {'command': ' '.join(['python -m benchmarks.tokenizer_compare'] + sys.argv[1:]),
            'sources': {'prose': PROSE_SOURCES,
                        'code': os.path.join(sysconfig.get_paths()['stdlib'], '**/*.py')},
            'corpus': info, 'train_mb': train_mb, 'max_mb': FLAGS.max_mb, 'sizes': sizes,
            'held_out': FLAGS.held_out, 'seed': FLAGS.seed, 'rows': rows,
            'cpu_cores': len(os.sched_getaffinity(0)), 'cpu': platform.processor() or
            platform.machine(), 'python': sys.version.split()[0],
            'seconds': time.time() - t_start,
            'load_average_1min': [round(load_before, 2), round(os.getloadavg()[0], 2)]}
  os.makedirs(FLAGS.out, exist_ok=True)
  with open(os.path.join(FLAGS.out, 'results.json'), 'w') as f:
    json.dump(result, f, indent=1)
  table = _table(result)
  with open(os.path.join(FLAGS.out, 'results.md'), 'w') as f:
    f.write(table)
  print(table)


def _table(result: dict) -> str:
  c = result['corpus']
  p, k = c['prose'], c['code']
  lines = [f"Held out: {p['held_out_mb']} MB of prose ({p['held_out_documents']} documents) and "
           f"{k['held_out_mb']} MB of code ({k['held_out_documents']}). Training text: "
           f"{result['train_mb']:.1f} MB ({p['train_mb']} prose, {k['train_mb']} code) of the "
           f"{p['mb'] + k['mb']:.1f} MB corpus. {result['cpu_cores']} CPU cores; "
           f"{result['seconds']:.0f} s in all; load average "
           f"{result['load_average_1min'][0]} before, {result['load_average_1min'][1]} after.", '',
           f"Prose: {', '.join(result['sources']['prose'])}. Code: {result['sources']['code']}.",
           f"Command: `{result['command']}`.", '',
           '| tokenizer | vocab | bytes/token prose | bytes/token code | bytes/token all '
           '| train s | encode MB/s (1 core) |', '|---|---|---|---|---|---|---|']
  for r in result['rows']:
    if 'skipped' in r:
      lines.append(f"| {r['tokenizer']} | {r['vocab']} | skipped: {r['skipped']} | | | | |")
      continue
    b = r['bytes_per_token']
    train = f"{r['train_seconds']:.1f}" if r['train_seconds'] is not None else '-'
    lines.append(f"| {r['tokenizer']} | {r['vocab']} | {b['prose']:.3f} | {b['code']:.3f} | "
                 f"{b['all']:.3f} | {train} | {r['encode_mb_per_s']:.2f} |")
  return '\n'.join(lines) + '\n'


if __name__ == '__main__':
  app.run(main)
