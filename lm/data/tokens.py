"""Token files and batches.

Entry point: `prepare(cfg.data, progress=None) -> Dataset` (a `DataConfig` works too). It reads the
corpus (lm/data/corpus.py), builds the tokenizer (lm/data/tokenizer.py), tokenizes both splits once into
memory-mapped token files and returns a `Dataset` over them.

Token files. Each corpus x tokenizer lives in `<cache>/<corpus>-<tokenizer>-<key>/` with train.bin,
val.bin (uint16 when the vocabulary has at most 65535 ids, else uint32), info.json and tokenizer/
(what `load_tokenizer` reads). `<cache>` is data.cache_dir, else $LM_CACHE_DIR, else ~/.cache/lm.
The key hashes the corpus settings, the tokenizer settings and, for file corpora, every source
file's (relative path, size, mtime_ns), so a later call finds the folder without reading the files;
an edit that keeps both size and mtime_ns is not noticed. info.json records the sha256 content hash
of what was read. In text corpora every document is followed by EOS; the synthetic streams are
single runs of the source with no EOS. A folder is built under a temporary name, fsynced and renamed
into place, so a crash never leaves a folder that looks complete.

Batches. The train stream is cut into windows of seq_len + 1 tokens with stride seq_len (neighbours
share their boundary token, so each token is a target once per epoch; a tail shorter than a window
is never read).
Global row r of step s is window perm_e[g % n_windows] with g = s * batch_size + r, e = g //
n_windows and perm_e a permutation seeded by (seed, e). Process p of P takes rows
[p * B / P, (p + 1) * B / P). A batch is thus a pure function of (seed, step, process index, process
count): hosts read disjoint rows, resuming needs only the step, and no window repeats in an epoch.
`eval_batches` reads fixed validation windows, evenly spaced over the validation stream.

Dataset: `.tokenizer`, `.train` / `.val` (memmaps), `.info` (info.json: corpus_hash, tokenizer_hash,
entropy_rate, splits with tokens/bytes/documents, settings, created), `.batch(...)`,
`.eval_batches(...)`, `.epochs(...)`, `.bytes_per_token(split)` (text bytes / tokens, for bits per
byte; None for synthetic), `.check(batch_size, seq_len, process_count)` (UserError early).
"""
from __future__ import annotations

import dataclasses
import datetime
import functools
import hashlib
import json
import os
import re
import shutil
import sys
import tempfile
import time

import numpy as np

from lm import lock as lock_lib
from lm.data import build as build_lib
from lm.data import corpus as corpus_lib
from lm.data import mixture as mixture_lib
from lm.data import sources
from lm.data import tokenizer as tokenizer_lib
from lm.config import read_section
from lm.errors import UserError

# Bump when the layout or meaning of the token files changes, so old cache folders are not reused.
FORMAT_VERSION = 2
CORPORA = ('pystdlib', 'text', 'hf', 'synthetic')
TOKENIZERS = ('bytes', 'sentencepiece', 'bpe', 'file')
SP_MODEL_TYPES = ('bpe', 'unigram')
SPLITS = ('train', 'val')
INFO_JSON = 'info.json'
TOKENIZER_DIR = 'tokenizer'


@dataclasses.dataclass(frozen=True)
class DataConfig:
  """The validated `data` section of the config (keys and defaults: configs/base.py)."""
  corpus: str
  path: str
  text_field: str
  tokenizer: str
  vocab_size: int
  sp_model_type: str
  sp_train_bytes: int
  chat_tokens: bool
  val_fraction: float
  max_bytes: int
  cache_dir: str
  synthetic_vocab: int
  synthetic_order: int
  synthetic_branching: int
  synthetic_concentration: float
  synthetic_tokens: int
  synthetic_seed: int
  # data.tokenizer=file: a tokenizer folder that Tokenizer.save wrote (a run's tokenizer/).
  # Optional so that configs written before it existed still read.
  tokenizer_path: str = ''
  # Generated "a+b=c" lines (lm/eval/tasks.py, training-side problems only) mixed into a text corpus:
  # their share of the mixed corpus's bytes, and the largest operand digit count.
  arith_fraction: float = 0.0
  arith_digits: int = 4
  # A Hugging Face dataset (lm/data/sources.py): a save_to_disk folder, a local data folder or a
  # hub name; its config, split, and whether to stream it instead of preparing Arrow files.
  hf_dataset: str = ''
  hf_config: str = ''
  hf_split: str = 'train'
  hf_streaming: bool = False
  # Tokenizing processes (0 = one per core) and the most text one of them holds at a time.
  workers: int = 0
  max_chunk_bytes: int = 16 << 20
  # A weighted mixture: a list of {path | hf_dataset | corpus, weight, text_field, name, ...}.
  sources: tuple = ()

  @property
  def source_kind(self) -> str:
    """The corpus actually read: 'hf' whenever data.hf_dataset is set."""
    return 'hf' if self.hf_dataset and self.corpus != 'synthetic' else self.corpus

  def hf_spec(self) -> dict:
    return {'dataset': self.hf_dataset, 'config': self.hf_config, 'split': self.hf_split,
            'streaming': self.hf_streaming}

  @classmethod
  def from_config(cls, cfg) -> DataConfig:
    """Reads every field from cfg (cfg.data of configs/base.py) and validates it."""
    values = read_section(cls, cfg, 'data')
    values['sources'] = tuple(x.to_dict() if hasattr(x, 'to_dict') else x
                              for x in values.get('sources', ()))
    c = cls(**values)
    c._validate()
    return c

  def _validate(self) -> None:
    def bad(key, why, fix=None):
      fix = fix or f'fix --config.data.{key}'
      raise UserError(f'data.{key}={getattr(self, key)!r} {why}; {fix}')
    if self.corpus not in CORPORA:
      bad('corpus', f'is not a corpus (choose one of {", ".join(CORPORA)})')
    if self.tokenizer not in TOKENIZERS:
      bad('tokenizer', f'is not a tokenizer (choose one of {", ".join(TOKENIZERS)})')
    if self.tokenizer == 'file' and not os.path.isdir(self.tokenizer_path):
      bad('tokenizer_path', 'is not a folder, but data.tokenizer=file reads the tokenizer saved '
          'there', "point it at a run's tokenizer/ folder or a Hugging Face tokenizer folder")
    if self.sp_model_type not in SP_MODEL_TYPES:
      bad('sp_model_type',
          f'is not a sentencepiece model type (choose one of {", ".join(SP_MODEL_TYPES)})')
    if not 0.0 < self.val_fraction < 1.0:
      bad('val_fraction', 'must lie strictly between 0 and 1')
    if self.vocab_size < 1:
      bad('vocab_size', 'must be at least 1')
    if not 0.0 <= self.arith_fraction < 1.0:
      bad('arith_fraction', 'must lie in [0, 1) (the share of the bytes that is arithmetic)')
    if self.arith_fraction and self.corpus == 'synthetic':
      bad('arith_fraction', 'applies to text corpora only', 'leave it at 0 for corpus=synthetic')
    if not 1 <= self.arith_digits <= 4:
      bad('arith_digits', 'must be 1, 2, 3 or 4')
    for key in ('max_bytes', 'sp_train_bytes'):
      if getattr(self, key) < 0:
        bad(key, 'must be 0 (no limit) or positive')
    if self.corpus == 'text' and not self.path and not self.sources:
      bad('path', 'is empty but data.corpus=text needs a file, folder or glob')
    if self.corpus == 'hf' and not self.hf_dataset and not self.sources:
      bad('hf_dataset', 'is empty but data.corpus=hf reads a Hugging Face dataset',
          'set --config.data.hf_dataset=NAME_OR_FOLDER')
    if self.hf_dataset and self.corpus in ('text', 'synthetic'):
      bad('hf_dataset', f'is set, but data.corpus={self.corpus} reads other data',
          "leave data.corpus at 'pystdlib' or set it to 'hf', or clear data.hf_dataset")
    if self.hf_dataset and self.path:
      bad('path', 'is set as well as data.hf_dataset; a source is one or the other',
          'clear one of --config.data.path and --config.data.hf_dataset')
    if self.workers < 0:
      bad('workers', 'must be 0 (one per core) or positive')
    if self.max_chunk_bytes < 4096:
      bad('max_chunk_bytes', 'must be at least 4096')
    if self.sources:
      if self.corpus == 'synthetic':
        bad('sources', 'cannot mix with data.corpus=synthetic', 'use text sources')
      for i, src in enumerate(self.sources):
        if not isinstance(src, dict):
          raise UserError(f'data.sources[{i}] is a {type(src).__name__}, not a dict such as '
                          "{'path': ..., 'weight': 0.7}; fix --config.data.sources")
    if self.corpus == 'synthetic':
      if self.tokenizer != 'bytes':
        bad('tokenizer', 'does not apply to data.corpus=synthetic, whose tokens are its symbols',
            "leave --config.data.tokenizer at its default 'bytes'")
      if self.synthetic_vocab < 2:
        bad('synthetic_vocab', 'must be at least 2')
      if self.synthetic_order < 1:
        bad('synthetic_order', 'must be at least 1')
      if not 1 <= self.synthetic_branching <= self.synthetic_vocab:
        bad('synthetic_branching', 'must lie between 1 and data.synthetic_vocab')
      if not self.synthetic_concentration > 0:
        bad('synthetic_concentration', 'must be positive')
      if self.synthetic_tokens < 2:
        bad('synthetic_tokens', 'must be at least 2')
      contexts = self.synthetic_vocab**self.synthetic_order
      if contexts > corpus_lib.MAX_SYNTHETIC_CONTEXTS:
        bad('synthetic_order',
            f'gives {contexts} contexts (data.synthetic_vocab**data.synthetic_order), more than '
            f'{corpus_lib.MAX_SYNTHETIC_CONTEXTS}',
            'lower --config.data.synthetic_order or --config.data.synthetic_vocab')


def cache_root(cfg: DataConfig) -> str:
  """data.cache_dir, else $LM_CACHE_DIR, else ~/.cache/lm."""
  root = cfg.cache_dir or os.environ.get('LM_CACHE_DIR') or os.path.join('~', '.cache', 'lm')
  return os.path.abspath(os.path.expanduser(root))


def _digest(obj) -> str:
  return hashlib.sha256(json.dumps(obj, sort_keys=True).encode('utf-8')).hexdigest()


def _tokenizer_material(cfg: DataConfig) -> dict:
  if cfg.tokenizer == 'bytes':
    m = {'type': 'bytes'}
  elif cfg.tokenizer == 'file':
    return {'type': 'file', 'hash': tokenizer_lib.load_tokenizer(cfg.tokenizer_path).hash}
  elif cfg.tokenizer == 'bpe':
    m = {'type': 'bpe', 'vocab_size': cfg.vocab_size, 'train_bytes': cfg.sp_train_bytes}
  else:
    m = {'type': 'sentencepiece', 'vocab_size': cfg.vocab_size, 'model_type': cfg.sp_model_type,
         'train_bytes': cfg.sp_train_bytes}
  if cfg.chat_tokens:   # absent when off, so folders built before chat tokens stay valid
    m['chat'] = True
  return m


def _key_material(cfg: DataConfig, listing) -> dict:
  """Everything the token files depend on (only settings that matter for this corpus/tokenizer)."""
  m = {'format': FORMAT_VERSION, 'corpus': cfg.source_kind, 'val_fraction': cfg.val_fraction}
  if cfg.corpus == 'synthetic':
    m['synthetic'] = {'vocab': cfg.synthetic_vocab, 'order': cfg.synthetic_order,
                      'branching': cfg.synthetic_branching,
                      'concentration': cfg.synthetic_concentration,
                      'tokens': cfg.synthetic_tokens, 'seed': cfg.synthetic_seed}
    m['tokenizer'] = {'type': 'symbols'}
    return m
  m['max_bytes'] = cfg.max_bytes
  if cfg.arith_fraction:   # absent when off
    m['arith'] = {'fraction': cfg.arith_fraction, 'digits': cfg.arith_digits}
  m.update(listing.key)
  m['tokenizer'] = _tokenizer_material(cfg)
  return m


def prepare(cfg, progress: bool | None = None):
  """The Dataset of cfg (cfg.data or a DataConfig), building its token files on first use; a
  MixtureDataset when data.sources lists several sources.

  progress: show a tqdm bar while tokenizing; None means when stderr is a terminal and the corpus
  is large enough to take a while.
  """
  if not isinstance(cfg, DataConfig):
    cfg = DataConfig.from_config(cfg)
  if cfg.sources:
    return _prepare_mixture(cfg, progress)
  listing = None
  if cfg.corpus != 'synthetic':
    listing = sources.list_source(cfg.source_kind, cfg.path, cfg.text_field, cfg.max_chunk_bytes,
                                  cfg.val_fraction, cfg.hf_spec())
  material = _key_material(cfg, listing)
  key = _digest(material)
  tok_name = 'symbols' if cfg.corpus == 'synthetic' else cfg.tokenizer
  root = cache_root(cfg)
  final = os.path.join(root, f'{cfg.source_kind}-{tok_name}-{key[:16]}')
  if os.path.isdir(final):
    ds = _open(final, key)
    if ds is not None:
      return ds

  def write(out: str) -> dict:
    if cfg.corpus == 'synthetic':
      return _write_synthetic(cfg, material, key, out)
    return _write_text(cfg, listing, material, key, out, progress)

  _build(final, key, root, write)
  ds = _open(final, key)
  if ds is None:
    raise RuntimeError(f'the token files just built in {final} do not load')
  return ds


def _not_writable(root: str, e: OSError) -> UserError:
  return UserError(f'the data cache folder {root} is not writable ({e.strerror or e}); set '
                   '--config.data.cache_dir=... (or $LM_CACHE_DIR) to a writable folder')


def _build(final: str, key: str, root: str, write) -> None:
  """Builds the cache folder `final` in `<root>/.partial-<name>/out` under that folder's lock,
  then renames it into place. Another process building the same folder is waited for; a build
  that was interrupted resumes from its finished parts (lm/data/build.py)."""
  try:
    os.makedirs(root, exist_ok=True)
    probe = tempfile.NamedTemporaryFile(dir=root, prefix='.probe-')
    probe.close()
  except OSError as e:
    raise _not_writable(root, e) from None
  partial = os.path.join(root, f'.partial-{os.path.basename(final)}')
  told = False
  while True:
    try:
      held = lock_lib.acquire(partial)
      break
    except UserError as e:
      if os.path.isdir(final) and _open(final, key) is not None:
        return
      if not told:
        print(f'waiting for another process to prepare the same token files ({e})',
              file=sys.stderr)
        told = True
      time.sleep(2)
  try:
    if os.path.isdir(final) and _open(final, key) is not None:
      return   # another process finished it while this one waited
    out = os.path.join(partial, 'out')
    os.makedirs(out, exist_ok=True)
    info = write(out)
    _write_json(os.path.join(out, INFO_JSON), info)  # Last: its presence marks the files complete.
    _fsync_dir(out)
    if os.path.isdir(final):
      # A folder that failed to load (damaged by hand or by the disk) is replaced.
      broken = final + f'.broken-{os.getpid()}'
      os.rename(final, broken)
      shutil.rmtree(broken, ignore_errors=True)
    os.rename(out, final)
    _fsync_dir(root)
  except UserError:
    # Bad input: the fix changes the key, so these parts would never be resumed.
    shutil.rmtree(os.path.join(partial, 'out'), ignore_errors=True)
    raise
  except OSError as e:
    if isinstance(e, PermissionError) or e.errno == 30:  # EROFS
      raise _not_writable(root, e) from None
    raise
  finally:
    held.release()
  shutil.rmtree(partial, ignore_errors=True)


def _base_info(cfg: DataConfig, material: dict, key: str) -> dict:
  return {'format': FORMAT_VERSION, 'key': key, 'corpus': cfg.source_kind,
          'settings': {k: v for k, v in material.items() if k != 'files'},
          'created': datetime.datetime.now(datetime.timezone.utc).isoformat(timespec='seconds'),
          'entropy_rate': None, 'synthetic': None, 'corpus_stats': None}


def _write_synthetic(cfg: DataConfig, material: dict, key: str, out: str) -> dict:
  info = _base_info(cfg, material, key)
  syn = corpus_lib.make_synthetic(cfg.synthetic_vocab, cfg.synthetic_order,
                                  cfg.synthetic_branching, cfg.synthetic_concentration,
                                  cfg.synthetic_seed, cfg.synthetic_tokens, cfg.val_fraction)
  tok = tokenizer_lib.SymbolTokenizer(cfg.synthetic_vocab)
  dtype = _dtype(tok.vocab_size)
  splits = {}
  for split, arr in (('train', syn.train), ('val', syn.val)):
    with open(os.path.join(out, f'{split}.bin'), 'wb') as f:
      _write_tokens(f, arr.astype(dtype))
      _sync(f)
    splits[split] = {'tokens': int(len(arr)), 'bytes': None, 'documents': 1}
  info.update(corpus_hash=syn.content_hash, entropy_rate=syn.entropy_rate,
              synthetic=dict(syn.source.settings(), tokens=cfg.synthetic_tokens))
  tok.save(os.path.join(out, TOKENIZER_DIR))
  info.update(tokenizer=tok.settings(), tokenizer_hash=tok.hash, dtype=np.dtype(dtype).name,
              splits=splits)
  return info


def _settings(cfg: DataConfig) -> build_lib.Settings:
  return build_lib.Settings(cfg.text_field, cfg.val_fraction, cfg.max_bytes, cfg.max_chunk_bytes,
                            cfg.arith_fraction, cfg.arith_digits)


def _train_tokenizer(cfg: DataConfig, texts: list[str]):
  if cfg.tokenizer == 'bpe':
    return tokenizer_lib.train_bpe(texts, vocab_size=cfg.vocab_size, chat=cfg.chat_tokens)
  return tokenizer_lib.train_sentencepiece(texts, vocab_size=cfg.vocab_size,
                                           model_type=cfg.sp_model_type,
                                           max_train_bytes=cfg.sp_train_bytes,
                                           chat=cfg.chat_tokens)


def _make_tokenizer(cfg: DataConfig, listing):
  if cfg.tokenizer == 'bytes':
    return tokenizer_lib.ByteTokenizer(chat=cfg.chat_tokens)
  if cfg.tokenizer == 'file':
    return tokenizer_lib.load_tokenizer(cfg.tokenizer_path)
  texts = build_lib.training_sample(listing, _settings(cfg), cfg.sp_train_bytes)
  if not texts:
    raise UserError(f'the training split of {listing.describe} has no text to train the '
                    'tokenizer on; add text to the corpus')
  return _train_tokenizer(cfg, texts)


def _write_text(cfg: DataConfig, listing, material: dict, key: str, out: str,
                progress: bool | None) -> dict:
  """tokenizer/ (kept from an interrupted build: its parts were made with it), train.bin and
  val.bin into out; returns the info dict."""
  info = _base_info(cfg, material, key)
  tok_dir = os.path.join(out, TOKENIZER_DIR)
  try:
    tok = tokenizer_lib.load_tokenizer(tok_dir)
  except UserError:
    shutil.rmtree(os.path.join(out, build_lib.PARTS), ignore_errors=True)
    tok = _make_tokenizer(cfg, listing)
    tmp = tok_dir + '.tmp'
    shutil.rmtree(tmp, ignore_errors=True)
    tok.save(tmp)
    os.replace(tmp, tok_dir)
  dtype = np.dtype(_dtype(tok.vocab_size)).name
  result = build_lib.build(listing, _settings(cfg), tok_dir, dtype, out, workers=cfg.workers,
                           progress=progress, name=cfg.source_kind)
  info.update(result)
  info.update(tokenizer=tok.settings(), tokenizer_hash=tok.hash, dtype=dtype)
  return info


def _prepare_mixture(cfg: DataConfig, progress: bool | None):
  """The MixtureDataset of data.sources: each source's token files are prepared (and cached) on
  their own with one shared tokenizer; a trained tokenizer learns from every source, each giving
  its weight's share of data.sp_train_bytes."""
  parts = [source_config(cfg, i) for i in range(len(cfg.sources))]
  weights = [float(s.get('weight', 1.0)) for s in cfg.sources]
  names = [source_name(s, i) for i, s in enumerate(cfg.sources)]
  if cfg.tokenizer in ('sentencepiece', 'bpe'):
    tok_dir = _shared_tokenizer(cfg, parts, weights)
    parts = [dataclasses.replace(p, tokenizer='file', tokenizer_path=tok_dir) for p in parts]
  datasets = []
  for i, p in enumerate(parts):
    try:
      datasets.append(prepare(p, progress))
    except UserError as e:
      text = re.sub(r'--config\.data\.(path|text_field|hf_\w+)', 'its key in --config.data.sources',
                    str(e))
      raise UserError(f'data.sources[{i}] ({names[i]}): {text}') from None
  return mixture_lib.MixtureDataset(datasets, weights, names)


def source_name(source: dict, i: int) -> str:
  return str(source.get('name') or source.get('hf_dataset') or source.get('path')
             or source.get('corpus') or f'source{i}')


_SOURCE_KEYS = ('corpus', 'path', 'text_field', 'hf_dataset', 'hf_config', 'hf_split',
                'hf_streaming', 'weight', 'name')


def source_config(cfg: DataConfig, i: int) -> DataConfig:
  """The DataConfig of source i of data.sources: the data section with the source's keys."""
  s = dict(cfg.sources[i])
  unknown = sorted(set(s) - set(_SOURCE_KEYS))
  if unknown:
    raise UserError(f'data.sources[{i}] has the key {unknown[0]!r}, which a source does not take '
                    f'(it takes {", ".join(_SOURCE_KEYS)}); fix --config.data.sources')
  if not (s.get('path') or s.get('hf_dataset') or s.get('corpus') == 'pystdlib'):
    raise UserError(f'data.sources[{i}] names no data: give it a path, an hf_dataset or '
                    "corpus='pystdlib'; fix --config.data.sources")
  w = s.get('weight', 1.0)
  if isinstance(w, bool) or not isinstance(w, (int, float)) or not 0 < w < float('inf'):
    raise UserError(f'data.sources[{i}] has weight {w!r}; a weight is a positive number; fix '
                    '--config.data.sources')
  corpus = s.get('corpus') or ('hf' if s.get('hf_dataset') else 'text')
  c = dataclasses.replace(
      cfg, sources=(), corpus=corpus, path=str(s.get('path', '')),
      text_field=str(s.get('text_field', cfg.text_field)),
      hf_dataset=str(s.get('hf_dataset', '')), hf_config=str(s.get('hf_config', '')),
      hf_split=str(s.get('hf_split', cfg.hf_split)),
      hf_streaming=bool(s.get('hf_streaming', cfg.hf_streaming)))
  c._validate()
  return c


def _shared_tokenizer(cfg: DataConfig, parts: list[DataConfig], weights: list[float]) -> str:
  """The folder of the tokenizer trained on all sources (cached under <cache>/tokenizers/)."""
  listings = [sources.list_source(p.source_kind, p.path, p.text_field, p.max_chunk_bytes,
                                  p.val_fraction, p.hf_spec()) for p in parts]
  total = sum(weights)
  material = {'format': FORMAT_VERSION, 'tokenizer': _tokenizer_material(cfg),
              'sources': [[_key_material(p, li), w / total]
                          for p, li, w in zip(parts, listings, weights)]}
  root = cache_root(cfg)
  folder = os.path.join(root, 'tokenizers', f'{cfg.tokenizer}-{_digest(material)[:16]}')
  try:
    tokenizer_lib.load_tokenizer(folder)
    return folder
  except UserError:
    pass
  texts = []
  for p, li, w in zip(parts, listings, weights):
    budget = int(cfg.sp_train_bytes * w / total) if cfg.sp_train_bytes else 0
    texts += build_lib.training_sample(li, _settings(p), budget)
  tok = _train_tokenizer(cfg, texts)
  tmp = f'{folder}.tmp-{os.getpid()}'
  try:
    tok.save(tmp)
    os.replace(tmp, folder)
  except OSError as e:
    shutil.rmtree(tmp, ignore_errors=True)
    if not os.path.isdir(folder):
      raise _not_writable(root, e) from None
  return folder


def _dtype(vocab_size: int):
  return np.uint16 if vocab_size <= 65535 else np.uint32


def _write_tokens(f, ids: np.ndarray) -> None:
  """Appends token ids (already of the file's dtype) to an open file, little-endian."""
  f.write(ids.astype(ids.dtype.newbyteorder('<'), copy=False).tobytes())


def _sync(f) -> None:
  f.flush()
  os.fsync(f.fileno())


def _write_json(path: str, obj) -> None:
  with open(path, 'w', encoding='utf-8') as f:
    json.dump(obj, f, indent=2, sort_keys=True)
    f.write('\n')
    _sync(f)


def _fsync_dir(path: str) -> None:
  fd = os.open(path, os.O_RDONLY)
  try:
    os.fsync(fd)
  finally:
    os.close(fd)


def _open(folder: str, key: str) -> Dataset | None:
  """The Dataset in a complete cache folder, or None when the folder is incomplete or damaged."""
  try:
    with open(os.path.join(folder, INFO_JSON), encoding='utf-8') as f:
      info = json.load(f)
    if info.get('format') != FORMAT_VERSION or info.get('key') != key:
      return None
    dtype = np.dtype(info['dtype']).newbyteorder('<')
    arrays = {}
    for split in SPLITS:
      path = os.path.join(folder, f'{split}.bin')
      n = int(info['splits'][split]['tokens'])
      if os.path.getsize(path) != n * dtype.itemsize:
        return None
      arrays[split] = (np.memmap(path, dtype=dtype, mode='r', shape=(n,)) if n
                       else np.zeros(0, dtype))
    tok = tokenizer_lib.load_tokenizer(os.path.join(folder, TOKENIZER_DIR))
    if tok.hash != info['tokenizer_hash']:
      return None
  except (OSError, ValueError, KeyError, TypeError, UserError):
    return None
  return Dataset(folder, info, tok, arrays['train'], arrays['val'])


@functools.lru_cache(maxsize=8)
def _permutation(seed: int, epoch: int, n: int, salt: int) -> np.ndarray:
  """The window order of one epoch (salt keeps train and val orders apart)."""
  return np.random.default_rng([seed, epoch, salt, 0xBA7C]).permutation(n)


class Dataset:
  """Token streams of both splits, their tokenizer and info, and the batch functions."""

  def __init__(self, path: str, info: dict, tokenizer, train: np.ndarray, val: np.ndarray):
    self.path = path
    self.info = info
    self.tokenizer = tokenizer
    self.train = train
    self.val = val

  def tokens(self, split: str) -> np.ndarray:
    if split not in SPLITS:
      raise ValueError(f'split must be one of {SPLITS}, not {split!r}')
    return self.train if split == 'train' else self.val

  def n_windows(self, split: str, seq_len: int) -> int:
    """How many windows of seq_len + 1 tokens (stride seq_len) the split holds."""
    return max(0, (len(self.tokens(split)) - 1) // seq_len)

  def check(self, batch_size: int, seq_len: int, process_count: int = 1) -> None:
    """UserError unless these batch settings work with both splits."""
    if seq_len < 1:
      raise UserError(f'train.seq_len={seq_len} must be at least 1; fix --config.train.seq_len')
    if batch_size < 1:
      raise UserError(f'train.batch_size={batch_size} must be at least 1; fix '
                      '--config.train.batch_size')
    if process_count < 1 or batch_size % process_count:
      raise UserError(f'train.batch_size={batch_size} is not divisible by the {process_count} '
                      'processes; set --config.train.batch_size to a multiple of the process count')
    n_train, windows = len(self.train), self.n_windows('train', seq_len)
    if windows < batch_size:
      raise UserError(f'train.seq_len={seq_len} is too long for the training split: its {n_train} '
                      f'tokens give {windows} windows of seq_len + 1 tokens, '
                      f'fewer than train.batch_size={batch_size}; lower train.seq_len or '
                      'train.batch_size, or use more data')
    if self.n_windows('val', seq_len) < 1:
      raise UserError(f'train.seq_len={seq_len} is too long for the validation split of '
                      f'{len(self.val)} tokens (one window needs seq_len + 1); lower train.seq_len '
                      'or raise data.val_fraction')

  def _rows(self, split: str, windows: np.ndarray, seq_len: int) -> np.ndarray:
    starts = windows.astype(np.int64) * seq_len
    return np.asarray(self.tokens(split)[starts[:, None] + np.arange(seq_len + 1)], np.int32)

  def _process_rows(self, batch_size: int, process_index: int, process_count: int) -> np.ndarray:
    if not 0 <= process_index < process_count:
      raise ValueError(f'process_index {process_index} is outside [0, {process_count})')
    per = batch_size // process_count
    return np.arange(process_index * per, (process_index + 1) * per, dtype=np.int64)

  def batch(self, split: str, step: int, batch_size: int, seq_len: int, seed: int,
            process_index: int = 0, process_count: int = 1) -> np.ndarray:
    """int32 [batch_size // process_count, seq_len + 1]: this process's rows of global step `step`.

    Inputs are [:, :-1] and targets [:, 1:]. Rows follow the per-epoch seeded window permutation
    (module docstring); 'val' works the same way with its own permutation.
    """
    self.check(batch_size, seq_len, process_count)
    if step < 0:
      raise ValueError(f'step must be non-negative, not {step}')
    n = self.n_windows(split, seq_len)
    g = step * batch_size + self._process_rows(batch_size, process_index, process_count)
    epochs, pos = g // n, g % n
    windows = np.empty_like(g)
    salt = SPLITS.index(split)
    for e in np.unique(epochs):
      sel = epochs == e
      windows[sel] = _permutation(int(seed), int(e), n, salt)[pos[sel]]
    return self._rows(split, windows, seq_len)

  def eval_batches(self, n: int, batch_size: int, seq_len: int, process_index: int = 0,
                   process_count: int = 1) -> list[np.ndarray]:
    """n fixed validation batches of this process's rows (int32, shaped like `batch`).

    The n * batch_size global rows are evenly spaced windows of the validation stream; when it has
    fewer windows than that, they repeat in order.
    """
    self.check(batch_size, seq_len, process_count)
    nw = self.n_windows('val', seq_len)
    total = n * batch_size
    rows = self._process_rows(batch_size, process_index, process_count)
    out = []
    for i in range(n):
      g = i * batch_size + rows
      windows = g % nw if total >= nw else (g * nw) // total
      out.append(self._rows('val', windows, seq_len))
    return out

  def epochs(self, steps: int, batch_size: int, seq_len: int) -> float:
    """Passes over the training windows that `steps` steps make."""
    return steps * batch_size / max(1, self.n_windows('train', seq_len))

  def bytes_per_token(self, split: str = 'train') -> float | None:
    """Text bytes per token (EOS tokens included) of a split; None for the synthetic corpus."""
    s = self.info['splits'][split]
    if s['bytes'] is None or not s['tokens']:
      return None
    return s['bytes'] / s['tokens']

  @property
  def corpus_hash(self) -> str:
    return self.info['corpus_hash']

  @property
  def tokenizer_hash(self) -> str:
    return self.info['tokenizer_hash']

  @property
  def entropy_rate(self) -> float | None:
    """nats/token of the synthetic source (the best achievable loss); None for text corpora."""
    return self.info['entropy_rate']
