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
import shutil
import sys
import tempfile
import time

import numpy as np

from lm.data import arith
from lm.data import corpus as corpus_lib
from lm.data import tokenizer as tokenizer_lib
from lm.config import read_section
from lm.errors import UserError

# Bump when the layout or meaning of the token files changes, so old cache folders are not reused.
FORMAT_VERSION = 1
CORPORA = ('pystdlib', 'text', 'synthetic')
TOKENIZERS = ('bytes', 'sentencepiece', 'file')
SP_MODEL_TYPES = ('bpe', 'unigram')
SPLITS = ('train', 'val')
INFO_JSON = 'info.json'
TOKENIZER_DIR = 'tokenizer'
# Below this many bytes tokenizing is too quick for a progress bar to help.
_PROGRESS_MIN_BYTES = 8 << 20
# A temporary build folder this old belongs to a process that died (builds take minutes at most).
_STALE_SECONDS = 24 * 3600


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

  @classmethod
  def from_config(cls, cfg) -> DataConfig:
    """Reads every field from cfg (cfg.data of configs/base.py) and validates it."""
    c = cls(**read_section(cls, cfg, 'data'))
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
      bad('tokenizer_path', 'is not a folder, but data.tokenizer=file reads the tokenizer a run '
          'saved there', "point it at a run's tokenizer/ folder")
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
    if self.corpus == 'text' and not self.path:
      bad('path', 'is empty but data.corpus=text needs a file, folder or glob')
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


def _key_material(cfg: DataConfig, files) -> dict:
  """Everything the token files depend on (only settings that matter for this corpus/tokenizer)."""
  m = {'format': FORMAT_VERSION, 'corpus': cfg.corpus, 'val_fraction': cfg.val_fraction}
  if cfg.corpus == 'synthetic':
    m['synthetic'] = {'vocab': cfg.synthetic_vocab, 'order': cfg.synthetic_order,
                      'branching': cfg.synthetic_branching,
                      'concentration': cfg.synthetic_concentration,
                      'tokens': cfg.synthetic_tokens, 'seed': cfg.synthetic_seed}
    m['tokenizer'] = {'type': 'symbols'}
    return m
  m['max_bytes'] = cfg.max_bytes
  if cfg.arith_fraction:   # absent when off, so folders built before the mix stay valid
    m['arith'] = {'fraction': cfg.arith_fraction, 'digits': cfg.arith_digits}
  if any(f.relpath.endswith('.jsonl') for f in files):
    m['text_field'] = cfg.text_field
  m['files'] = [[f.relpath, f.size, f.mtime_ns] for f in files]
  if cfg.tokenizer == 'bytes':
    m['tokenizer'] = {'type': 'bytes'}
  elif cfg.tokenizer == 'file':
    m['tokenizer'] = {'type': 'file', 'hash': tokenizer_lib.load_tokenizer(cfg.tokenizer_path).hash}
    return m
  else:
    m['tokenizer'] = {'type': 'sentencepiece', 'vocab_size': cfg.vocab_size,
                      'model_type': cfg.sp_model_type, 'train_bytes': cfg.sp_train_bytes}
  if cfg.chat_tokens:   # absent when off, so folders built before chat tokens stay valid
    m['tokenizer']['chat'] = True
  return m


def prepare(cfg, progress: bool | None = None) -> Dataset:
  """The Dataset of cfg (cfg.data or a DataConfig), building its token files on first use.

  progress: show a tqdm bar while tokenizing; None means when stderr is a terminal and the corpus
  is large enough to take a while.
  """
  if not isinstance(cfg, DataConfig):
    cfg = DataConfig.from_config(cfg)
  files = [] if cfg.corpus == 'synthetic' else corpus_lib.list_files(cfg.corpus, cfg.path)
  material = _key_material(cfg, files)
  key = _digest(material)
  tok_name = 'symbols' if cfg.corpus == 'synthetic' else cfg.tokenizer
  root = cache_root(cfg)
  final = os.path.join(root, f'{cfg.corpus}-{tok_name}-{key[:16]}')
  if os.path.isdir(final):
    ds = _open(final, key)
    if ds is not None:
      return ds
  _build(cfg, files, material, key, root, final, progress)
  ds = _open(final, key)
  if ds is None:
    raise RuntimeError(f'the token files just built in {final} do not load')
  return ds


def _not_writable(root: str, e: OSError) -> UserError:
  return UserError(f'the data cache folder {root} is not writable ({e.strerror or e}); set '
                   '--config.data.cache_dir=... (or $LM_CACHE_DIR) to a writable folder')


def _build(cfg: DataConfig, files, material: dict, key: str, root: str, final: str,
           progress: bool | None) -> None:
  """Builds the cache folder under a temporary name and renames it into place."""
  prefix = f'.tmp-{os.path.basename(final)}-'
  try:
    os.makedirs(root, exist_ok=True)
    tmp = tempfile.mkdtemp(prefix=prefix, dir=root)
  except OSError as e:
    raise _not_writable(root, e) from None
  _remove_stale(root, prefix)
  try:
    info = _write_contents(cfg, files, material, key, tmp, progress)
    _write_json(os.path.join(tmp, INFO_JSON), info)  # Last: its presence marks the files complete.
    _fsync_dir(tmp)
    if os.path.isdir(final) and _open(final, key) is not None:
      # Another process finished the same folder meanwhile and may be reading it: keep it.
      shutil.rmtree(tmp, ignore_errors=True)
      return
    if os.path.isdir(final):
      # A folder that failed to load (damaged by hand or by the disk) is replaced.
      broken = final + f'.broken-{os.getpid()}'
      os.rename(final, broken)
      shutil.rmtree(broken, ignore_errors=True)
    try:
      os.rename(tmp, final)
    except OSError:
      if not os.path.isdir(final):
        raise
      # Another process finished the same folder first; its copy is equally good.
      shutil.rmtree(tmp, ignore_errors=True)
    _fsync_dir(root)
  except BaseException as e:
    shutil.rmtree(tmp, ignore_errors=True)
    if isinstance(e, PermissionError) or (isinstance(e, OSError) and e.errno == 30):  # EROFS
      raise _not_writable(root, e) from None
    raise


def _remove_stale(root: str, prefix: str) -> None:
  """Deletes temporary folders of this key that a killed process left more than a day ago."""
  now = time.time()
  for name in os.listdir(root):
    path = os.path.join(root, name)
    try:
      if name.startswith(prefix) and now - os.stat(path).st_mtime > _STALE_SECONDS:
        shutil.rmtree(path, ignore_errors=True)
    except OSError:
      pass  # Another process removed it first.


def _write_contents(cfg: DataConfig, files, material: dict, key: str, out: str,
                    progress: bool | None) -> dict:
  """Writes tokenizer/, train.bin and val.bin into out; returns the info dict."""
  info = {'format': FORMAT_VERSION, 'key': key, 'corpus': cfg.corpus,
          'settings': {k: v for k, v in material.items() if k != 'files'},
          'created': datetime.datetime.now(datetime.timezone.utc).isoformat(timespec='seconds'),
          'entropy_rate': None, 'synthetic': None, 'corpus_stats': None}
  if cfg.corpus == 'synthetic':
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
  else:
    text = corpus_lib.read_text_corpus(cfg.corpus, files, text_field=cfg.text_field,
                                       val_fraction=cfg.val_fraction, max_bytes=cfg.max_bytes)
    if cfg.arith_fraction:
      mix_arith(text, cfg)
    if cfg.tokenizer == 'bytes':
      tok = tokenizer_lib.ByteTokenizer(chat=cfg.chat_tokens)
    elif cfg.tokenizer == 'file':
      tok = tokenizer_lib.load_tokenizer(cfg.tokenizer_path)
    else:
      tok = tokenizer_lib.train_sentencepiece(text.train, vocab_size=cfg.vocab_size,
                                              model_type=cfg.sp_model_type,
                                              max_train_bytes=cfg.sp_train_bytes,
                                              chat=cfg.chat_tokens)
    dtype = _dtype(tok.vocab_size)
    show = progress if progress is not None else (sys.stderr.isatty()
                                                  and text.stats['bytes'] >= _PROGRESS_MIN_BYTES)
    splits = {}
    for split, docs in (('train', text.train), ('val', text.val)):
      with open(os.path.join(out, f'{split}.bin'), 'wb') as f:
        n_tokens, n_bytes = _tokenize_docs(f, tok, docs, dtype, show, split)
        _sync(f)
      splits[split] = {'tokens': n_tokens, 'bytes': n_bytes, 'documents': len(docs)}
    info.update(corpus_hash=text.content_hash, corpus_stats=text.stats)
  tok.save(os.path.join(out, TOKENIZER_DIR))
  info.update(tokenizer=tok.settings(), tokenizer_hash=tok.hash, dtype=np.dtype(dtype).name,
              splits=splits)
  return info


def mix_arith(text, cfg: DataConfig) -> None:
  """Adds generated arithmetic documents to both splits of a text corpus, so that they hold
  data.arith_fraction of the mixed bytes; they split by document id like the corpus does."""
  f = cfg.arith_fraction
  docs = arith.arith_documents(int(text.stats['bytes'] * f / (1 - f)), cfg.arith_digits)
  train, val = corpus_lib.split_documents(docs, cfg.val_fraction)
  text.train += train
  text.val += val
  n = sum(len(t) for _, t in docs)      # ASCII: characters are bytes
  text.stats.update(arith_bytes=n, arith_documents=len(docs), bytes=text.stats['bytes'] + n,
                    documents=text.stats['documents'] + len(docs))
  text.content_hash = hashlib.sha256(
      f"{text.content_hash}+arith:{f}:{cfg.arith_digits}".encode()).hexdigest()


def _dtype(vocab_size: int):
  return np.uint16 if vocab_size <= 65535 else np.uint32


def _tokenize_docs(f, tok, docs: list[str], dtype, show: bool, split: str) -> tuple[int, int]:
  """Writes each document's tokens followed by EOS; returns (tokens, UTF-8 bytes of the text)."""
  from tqdm import tqdm
  n_tokens = n_bytes = 0
  eos = np.array([tok.eos_id], dtype)
  sizes = [len(d.encode('utf-8')) for d in docs]
  with tqdm(total=sum(sizes), unit='B', unit_scale=True, desc=f'tokenizing {split}',
            disable=not show) as bar:
    chunk = 256  # Documents per encode call: batching lets sentencepiece use its threads.
    for i in range(0, len(docs), chunk):
      encoded = tok.encode_many(docs[i:i + chunk])
      for ids in encoded:
        _write_tokens(f, np.concatenate([ids.astype(dtype), eos]))
        n_tokens += len(ids) + 1
      done = sum(sizes[i:i + chunk])
      n_bytes += done
      bar.update(done)
  return n_tokens, n_bytes


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
