"""Tokenizing a text corpus into token files: work units in parallel worker processes, each writing
its own part files, resumable, with memory bounded by the chunk size rather than the corpus.

`build(listing, settings, tokenizer_dir, folder, ...)` reads the units of a source
(lm/data/sources.py), tokenizes them (one process per unit at a time, `workers` at once) and
concatenates the parts in unit order into train.bin and val.bin, so the result never depends on
the number of workers. Rules:
  * Split: a document goes to validation when `corpus.split_fraction(id) < val_fraction`, a pure
    function of its id (forced splits aside: the two halves of a one-document corpus). A small
    corpus can come out with too little validation text that way: when validation holds less than
    half of val_fraction of the bytes, training documents move to it in order of their fraction
    (smallest first) until it holds val_fraction, keeping at least one for training; an empty
    training split takes the validation document with the largest fraction. Only the units
    holding moved documents are redone. Large corpora never need this (their share is within a
    fraction of a percent of val_fraction).
  * `max_bytes > 0` keeps documents in corpus order until that many bytes of text; the document
    that crosses the budget is cut at its last newline inside it. Units are tokenized in parallel
    as if there were no budget and the one that crosses it is redone with what is left.
  * Each document is followed by EOS (a .txt document read in pieces: after its last piece).
  * A unit's parts are `parts/<unit>.{train,val}.bin` and `parts/<unit>.json`, written last, after
    the token files are synced: an interrupted build resumes from the units whose .json exists
    and matches (the same budget and forced splits).
  * `corpus_hash` is sha256 over the units' digests, each sha256 over (id, length, UTF-8 text) of
    every document kept.
"""
from __future__ import annotations

import concurrent.futures as cf
import contextlib
import ctypes
import dataclasses
import hashlib
import heapq
import json
import multiprocessing
import os
import shutil
import signal
import sys

import numpy as np

from lm.data import arith
from lm.data import corpus as corpus_lib
from lm.data import sources
from lm.data import tokenizer as tokenizer_lib
from lm.errors import UserError

SPLITS = ('train', 'val')
PARTS = 'parts'
# Below this many bytes a corpus is tokenized in this process: starting workers would take longer.
_PARALLEL_MIN_BYTES = 4 << 20
_PROGRESS_MIN_BYTES = 8 << 20
_PR_SET_PDEATHSIG = 1
# Train documents per unit kept as candidates for a validation split that came out short.
_CANDIDATES = 64


@dataclasses.dataclass(frozen=True)
class Settings:
  """What the token files depend on beyond the listing and the tokenizer."""
  text_field: str
  val_fraction: float
  max_bytes: int
  max_chunk_bytes: int
  arith_fraction: float = 0.0
  arith_digits: int = 4


def default_workers() -> int:
  """One worker per core this process may run on."""
  try:
    return max(1, len(os.sched_getaffinity(0)))
  except AttributeError:   # not Linux
    return max(1, os.cpu_count() or 1)


def split_of(doc_id: str, val_fraction: float) -> str:
  return 'val' if corpus_lib.split_fraction(doc_id) < val_fraction else 'train'


def cut_utf8(text: str, n_bytes: int) -> str:
  """The longest prefix of text within n_bytes UTF-8 bytes, ending at a newline if there is one."""
  head = text.encode('utf-8')[:n_bytes].decode('utf-8', errors='ignore')
  nl = head.rfind('\n')
  return head[:nl + 1] if nl >= 0 else head


# ---------------------------------------------------------------------------------------------
# One unit (runs in a worker process, or in this one).

@dataclasses.dataclass(frozen=True)
class Task:
  unit: sources.Unit | None      # None: the generated arithmetic documents
  settings: Settings
  tokenizer_dir: str
  dtype: str
  prefix: str                    # parts/<unit>; the unit writes <prefix>.{train,val}.bin, .json
  budget: int = 0                # 0: no limit
  forced: tuple = ()             # ((doc id, split), ...)
  arith_bytes: int = 0


_tokenizers: dict = {}


def _tokenizer(directory: str):
  if directory not in _tokenizers:
    _tokenizers[directory] = tokenizer_lib.load_tokenizer(directory)
  return _tokenizers[directory]


def _chunks(task: Task, bad: sources.Bad, stats: dict):
  s = task.settings
  if task.unit is not None:
    yield from sources.read_unit(task.unit, s.text_field, s.max_chunk_bytes, bad, stats)
    return
  docs = arith.arith_documents(task.arith_bytes, s.arith_digits)
  for i in range(0, len(docs), 4096):
    yield [sources.Doc(d, t) for d, t in docs[i:i + 4096]]


def _part_matches(task: Task, path: str) -> dict | None:
  try:
    with open(path, encoding='utf-8') as f:
      done = json.load(f)
  except (OSError, ValueError):
    return None
  want = {'budget': task.budget, 'forced': [list(x) for x in task.forced],
          'arith_bytes': task.arith_bytes}
  return done if all(done.get(k) == v for k, v in want.items()) else None


def run_task(task: Task) -> dict:
  """Tokenizes one unit into its part files and returns its record (also written as .json)."""
  record_path = task.prefix + '.json'
  done = _part_matches(task, record_path)
  if done is not None:
    return done
  if os.path.exists(record_path):
    os.remove(record_path)   # the part files are rewritten below: the old record no longer holds
  tok = _tokenizer(task.tokenizer_dir)
  dtype = np.dtype(task.dtype).newbyteorder('<')
  eos = np.array([tok.eos_id], dtype)
  forced = dict(task.forced)
  vf = task.settings.val_fraction
  bad, stats = sources.Bad(), {}
  sha = hashlib.sha256()
  splits = {s: {'tokens': 0, 'bytes': 0, 'documents': 0} for s in SPLITS}
  low: list = []        # heap of (-fraction, id, bytes)
  high = None           # [fraction, id] of the val document with the largest fraction
  used, records, exhausted = 0, 0, False
  seen_files: set = set()
  with open(task.prefix + '.train.bin', 'wb') as ft, open(task.prefix + '.val.bin', 'wb') as fv:
    files = {'train': ft, 'val': fv}
    for chunk in _chunks(task, bad, stats):
      keep = []
      for d in chunk:
        records += 1
        if task.budget:
          left = task.budget - used
          if len(d.text) > left // 4 and len(d.text.encode('utf-8')) > left:
            # The document that crosses the budget is cut, and it is the last one.
            d = dataclasses.replace(d, text=cut_utf8(d.text, left), eos=True)
            exhausted = True
            if not d.text:
              break
        split = d.split or forced.get(d.id) or split_of(d.id, vf)
        raw = d.text.encode('utf-8')
        if not d.split and split == 'train':
          # The train documents with the smallest fractions: candidates for validation when a
          # small corpus leaves it short (_rebalance).
          item = (-corpus_lib.split_fraction(d.id), d.id, len(raw))
          if len(low) < _CANDIDATES:
            heapq.heappush(low, item)
          elif item > low[0]:
            heapq.heapreplace(low, item)
        if not d.split and split == 'val':
          frac = corpus_lib.split_fraction(d.id)
          if high is None or frac > high[0]:
            high = [frac, d.id]
        used += len(raw)
        seen_files.add(d.file)
        sha.update(f'{d.id}\0{len(raw)}\0'.encode('utf-8'))
        sha.update(raw)
        keep.append((split, d, len(raw)))
        if exhausted:
          break
      encoded = tok.encode_many([d.text for _, d, _ in keep])
      for (split, d, n), ids in zip(keep, encoded):
        arr = ids.astype(dtype)
        if d.eos:
          arr = np.concatenate([arr, eos])
        files[split].write(arr.tobytes())
        s = splits[split]
        s['tokens'] += len(arr)
        s['bytes'] += n
        s['documents'] += int(d.eos)
      if exhausted or (task.budget and used >= task.budget):
        exhausted = True
        break
    for f in files.values():
      f.flush()
      os.fsync(f.fileno())
  record = {'budget': task.budget, 'forced': [list(x) for x in task.forced],
            'arith_bytes': task.arith_bytes, 'bytes': used, 'records': records,
            'hash': sha.hexdigest(),
            'splits': splits, 'bad': bad.count, 'bad_examples': bad.examples,
            'replaced_chars': stats.get('replaced_chars', 0), 'files': sorted(seen_files),
            'skipped_files': stats.get('skipped_files', 0),
            'low_train': sorted([-f, i, n] for f, i, n in low), 'max_val': high}
  tmp = record_path + '.tmp'
  with open(tmp, 'w', encoding='utf-8') as f:
    json.dump(record, f)
    f.flush()
    os.fsync(f.fileno())
  os.replace(tmp, record_path)
  return record


def _worker_init() -> None:
  # One process per core: the tokenizers' own thread pools would only compete.
  os.environ['RAYON_NUM_THREADS'] = '1'
  os.environ['LM_TOKENIZER_THREADS'] = '1'
  # A worker ends with the process that started it (killed by SIGTERM or SIGKILL, it cannot
  # shut the pool down), instead of tokenizing on as an orphan: Linux's parent-death signal.
  if sys.platform.startswith('linux'):
    try:
      libc = ctypes.CDLL(None, use_errno=True)
      libc.prctl(_PR_SET_PDEATHSIG, signal.SIGTERM)
    except (OSError, AttributeError):
      pass
    if os.getppid() == 1:   # the parent was already gone before prctl took effect
      os._exit(1)


# ---------------------------------------------------------------------------------------------
# The whole corpus.

@contextlib.contextmanager
def _bare_main():
  """While worker processes are spawned: a spawned process first imports its parent's main
  module, and run.py's imports (JAX among them) would cost each tokenizing worker about 3 s and
  290 MB. Without __file__ and __spec__ on __main__ the workers import only what they run."""
  main = sys.modules.get('__main__')
  saved = {k: main.__dict__.pop(k) for k in ('__file__',) if main and k in main.__dict__}
  spec = getattr(main, '__spec__', None)
  if main is not None:
    main.__spec__ = None
  try:
    yield
  finally:
    if main is not None:
      main.__dict__.update(saved)
      main.__spec__ = spec


class _Runner:
  """Runs tasks inline or in a spawn-started process pool, results in submission order."""

  def __init__(self, workers: int):
    self.pool = None
    if workers > 1:
      self.pool = cf.ProcessPoolExecutor(workers, mp_context=multiprocessing.get_context('spawn'),
                                         initializer=_worker_init)
    self.workers = workers

  def map(self, tasks, stop=None):
    """Yields (task, record) in order; `stop(record)` True ends submitting more tasks."""
    tasks = iter(tasks)
    if self.pool is None:
      for t in tasks:
        r = run_task(t)
        yield t, r
        if stop and stop(r):
          return
      return
    pending: list = []
    ahead = 2 * self.workers
    ended = False
    while True:
      while not ended and len(pending) < ahead:
        t = next(tasks, None)
        if t is None:
          ended = True
          break
        with _bare_main():   # the pool spawns its processes inside submit
          pending.append((t, self.pool.submit(run_task, t)))
      if not pending:
        return
      t, fut = pending.pop(0)
      r = fut.result()
      yield t, r
      if stop and stop(r):
        ended = True
        for _, f in pending:
          f.cancel()
        for _, f in pending:
          if not f.cancelled():
            f.result()
        return

  def close(self):
    if self.pool is not None:
      self.pool.shutdown(cancel_futures=True)


def build(listing: sources.Listing, settings: Settings, tokenizer_dir: str, dtype: str,
          folder: str, workers: int = 0, progress: bool | None = None,
          name: str = 'corpus') -> dict:
  """Writes folder/train.bin and folder/val.bin (parts under folder/parts, removed at the end);
  returns {'splits', 'corpus_hash', 'corpus_stats'}."""
  parts = os.path.join(folder, PARTS)
  os.makedirs(parts, exist_ok=True)
  units = listing.units
  est = sum(u.est_bytes for u in units)
  if settings.max_bytes:
    est = min(est, settings.max_bytes)
  workers = workers or default_workers()
  if est < _PARALLEL_MIN_BYTES or len(units) < 2:
    workers = 1
  show = progress if progress is not None else (sys.stderr.isatty() and est >= _PROGRESS_MIN_BYTES)
  from tqdm import tqdm
  bar = tqdm(total=est, unit='B', unit_scale=True, desc=f'tokenizing {name}', disable=not show,
             smoothing=0.1)

  def task(unit, budget=0, forced=()):
    return Task(unit, settings, tokenizer_dir, dtype,
                os.path.join(parts, f'{unit.index:06d}'), budget, tuple(forced))

  runner = _Runner(workers)
  kept: list[list] = []     # [task, record] of the units kept, in order
  try:
    total = 0

    def crossed(r):
      return bool(settings.max_bytes) and total + r['bytes'] >= settings.max_bytes

    for t, r in runner.map((task(u, settings.max_bytes) for u in units), stop=crossed):
      if settings.max_bytes and total + r['bytes'] > settings.max_bytes:
        t = task(t.unit, settings.max_bytes - total)
        r = run_task(t)
      kept.append([t, r])
      bar.update(r['bytes'])
      total += r['bytes']
      if settings.max_bytes and total >= settings.max_bytes:
        break
    if settings.arith_fraction:
      f = settings.arith_fraction
      t = Task(None, settings, tokenizer_dir, dtype, os.path.join(parts, 'arith'),
               arith_bytes=int(total * f / (1 - f)))
      kept.append([t, run_task(t)])
    _check_bad(kept, settings.text_field)
    _rebalance(kept, settings.val_fraction, listing.describe)
  finally:
    runner.close()
    bar.close()
  out = _assemble(kept, folder, dtype)
  shutil.rmtree(parts, ignore_errors=True)
  return out


def _rebalance(kept: list, val_fraction: float, describe: str) -> None:
  """Tops up a validation split that the id rule left short (module docstring)."""
  def total(split, k='bytes'):
    return sum(r['splits'][split][k] for _, r in kept)
  all_bytes = total('train') + total('val')
  moves: dict[int, list] = {}
  if total('val') < 0.5 * val_fraction * all_bytes or not total('val', 'tokens'):
    cands = sorted((f, doc_id, n, i) for i, (t, r) in enumerate(kept) if t.unit is not None
                   for f, doc_id, n in r['low_train'])
    val, docs = total('val'), total('train', 'documents')
    for f, doc_id, n, i in cands:
      if (val >= val_fraction * all_bytes and val > 0) or docs <= 1:
        break
      moves.setdefault(i, []).append((doc_id, 'val'))
      val += n
      docs -= 1
  if not total('train', 'tokens'):
    cands = [(r['max_val'][0], r['max_val'][1], i) for i, (_, r) in enumerate(kept)
             if r.get('max_val')]
    if cands:
      f, doc_id, i = max(cands)
      moves.setdefault(i, []).append((doc_id, 'train'))
  for i, forced in moves.items():
    t = dataclasses.replace(kept[i][0], forced=kept[i][0].forced + tuple(forced))
    kept[i] = [t, run_task(t)]
  if not all_bytes:
    raise UserError(f'the corpus in {describe} holds no text; point it at non-empty files')
  for split in SPLITS:
    if not total(split, 'tokens'):
      raise UserError(f'the corpus in {describe} is too small to split into training and '
                      f'validation (its {split} split came out empty); add documents')


def _assemble(kept: list, folder: str, dtype: str) -> dict:
  item = np.dtype(dtype).itemsize
  splits = {s: {'tokens': 0, 'bytes': 0, 'documents': 0} for s in SPLITS}
  for split in SPLITS:
    with open(os.path.join(folder, f'{split}.bin'), 'wb') as out:
      for t, r in kept:
        path = f'{t.prefix}.{split}.bin'
        with open(path, 'rb') as f:
          while True:
            block = f.read(8 << 20)
            if not block:
              break
            out.write(block)
        for k in ('tokens', 'bytes', 'documents'):
          splits[split][k] += r['splits'][split][k]
      out.flush()
      os.fsync(out.fileno())
    if os.path.getsize(os.path.join(folder, f'{split}.bin')) != splits[split]['tokens'] * item:
      raise RuntimeError(f'the {split} token file does not hold the tokens its parts counted')
  sha = hashlib.sha256()
  for _, r in kept:
    sha.update(r['hash'].encode('ascii'))
  records = [r for t, r in kept if t.unit is not None]
  stats = {'files': len(set().union(*[r['files'] for r in records])),
           'skipped_files': sum(r['skipped_files'] for r in records),
           'documents': sum(r['splits'][s]['documents'] for r in records for s in SPLITS),
           'replaced_chars': sum(r['replaced_chars'] for r in records),
           'bytes': sum(r['bytes'] for r in records),
           'bad_records': sum(r['bad'] for r in records),
           'bad_examples': [e for r in records for e in r['bad_examples']][:sources.MAX_BAD_EXAMPLES]}
  arith_rec = [r for t, r in kept if t.unit is None]
  if arith_rec:
    r = arith_rec[0]
    stats.update(arith_bytes=r['bytes'],
                 arith_documents=sum(r['splits'][s]['documents'] for s in SPLITS))
    stats['bytes'] += r['bytes']
    stats['documents'] += stats['arith_documents']
  return {'splits': splits, 'corpus_hash': sha.hexdigest(), 'corpus_stats': stats}


def _check_bad(kept: list, text_field: str) -> None:
  records = [r for t, r in kept if t.unit is not None]
  n_bad = sum(r['bad'] for r in records)
  n_all = n_bad + sum(r['records'] for r in records)
  if n_bad and n_bad > sources.MAX_BAD_FRACTION * n_all:
    first = next(e for r in records for e in r['bad_examples'])
    raise UserError(f'{n_bad} of {n_all} records cannot be read; the first: {first}; set '
                    f'--config.data.text_field to the field that holds the text (now '
                    f'{text_field!r}) or fix those records')
  if n_bad:
    print(f'note: {n_bad} of {n_all} records could not be read and were left out (first: '
          f'{records and next(e for r in records for e in r["bad_examples"])}); info.json '
          'counts them', file=sys.stderr)


# ---------------------------------------------------------------------------------------------
# The tokenizer's training text.

def training_sample(listing: sources.Listing, settings: Settings, budget: int) -> list[str]:
  """Training-split documents for a tokenizer to learn from, about `budget` bytes (0 = all): with
  max_bytes, from the documents kept, in order; else each document with a probability that spreads
  the budget over the estimated corpus, units visited in a seeded order."""
  est = sum(u.est_bytes for u in listing.units)
  limit = settings.max_bytes
  if limit:
    est = min(est, limit)
  rate = 1.0 if not budget or est <= budget else min(1.0, 4.0 * budget / est)
  units = list(listing.units)
  if not limit and rate < 1.0:
    order = np.random.default_rng(0x70C).permutation(len(units))
    units = [units[i] for i in order]
  out, taken, seen = [], 0, 0
  bad, stats = sources.Bad(), {}
  for u in units:
    for chunk in sources.read_unit(u, settings.text_field, settings.max_chunk_bytes, bad, stats):
      for d in chunk:
        text = d.text
        if limit:
          if seen >= limit:
            break
          if len(text.encode('utf-8')) > limit - seen:
            text = cut_utf8(text, limit - seen)
          seen += len(text.encode('utf-8'))
        split = d.split or split_of(d.id, settings.val_fraction)
        if split != 'train' or not text:
          continue
        if rate < 1.0 and corpus_lib.split_fraction('tokenizer:' + d.id) >= rate:
          continue
        out.append(text)
        taken += len(text.encode('utf-8'))
        if budget and taken >= budget:
          return _with_arith(out, settings)
      if limit and seen >= limit:
        return _with_arith(out, settings)
  return _with_arith(out, settings)


def _with_arith(texts: list[str], settings: Settings) -> list[str]:
  """The sample plus generated arithmetic in the corpus's proportion (data.arith_fraction)."""
  f = settings.arith_fraction
  if not f:
    return texts
  n = int(sum(len(t.encode('utf-8')) for t in texts) * f / (1 - f))
  docs = arith.arith_documents(n, settings.arith_digits)
  return texts + [t for d, t in docs if split_of(d, settings.val_fraction) == 'train']
