"""Corpora: the standard library's files, the text reader every command uses, the document-id hash
that splits documents, and the synthetic Markov source.

  * `pystdlib` is the .py files under sysconfig's stdlib folder, sorted by relative path, skipping
    site-packages and __pycache__ (files holding NUL bytes, binary test data, are skipped when
    read). Other text corpora are listed and read by lm/data/sources.py, tokenized by
    lm/data/build.py (the split and max_bytes rules are there).
  * `split_fraction(doc id)` is the stable pseudo-random number in [0, 1) that decides a
    document's split (and the held-out problems of the generated tasks).
  * Invalid UTF-8 in a corpus is replaced with U+FFFD (the stdlib ships a few latin-1 test files)
    and counted; data files (fine-tuning examples, pairs, tables) refuse it (`read_text`).

The `synthetic` corpus is a seeded sparse Markov source (`MarkovSource`) whose exact entropy rate is
known, so a model's loss can be compared with the best achievable loss. With the defaults (64
symbols, order 1, 4 allowed successors, Dirichlet(1)) the rate is about 1.1 nats/token against
log 64 = 4.16 for guessing, and a model must learn all 64 x 4 transition probabilities to reach it.
"""
from __future__ import annotations

import bisect
import dataclasses
import hashlib
import json
import math
import os
import sysconfig

import numpy as np

from lm.errors import UserError

# Folders under the stdlib root that are not the standard library itself.
_STDLIB_SKIP_DIRS = {'site-packages', 'dist-packages', '__pycache__'}
# Bigger context spaces make the stationary-distribution solve and the tables too large.
MAX_SYNTHETIC_CONTEXTS = 1 << 22


@dataclasses.dataclass(frozen=True)
class SourceFile:
  """One file of a corpus: its absolute path, path relative to the corpus root, size and mtime."""
  path: str
  relpath: str
  size: int
  mtime_ns: int


def stat_file(path: str, relpath: str) -> SourceFile:
  st = os.stat(path)
  return SourceFile(path, relpath.replace(os.sep, '/'), st.st_size, st.st_mtime_ns)


def stdlib_files() -> list[SourceFile]:
  """The .py files of the running interpreter's standard library (no site-packages), sorted."""
  root = sysconfig.get_paths()['stdlib']
  if not os.path.isdir(root):
    raise UserError(f'the standard library folder {root} does not exist; use '
                    '--config.data.corpus=text with --config.data.path=... instead')
  out = []
  for dirpath, dirnames, filenames in os.walk(root):
    dirnames[:] = sorted(d for d in dirnames
                         if d not in _STDLIB_SKIP_DIRS and not d.startswith('.'))
    for f in filenames:
      if f.endswith('.py'):
        p = os.path.join(dirpath, f)
        if os.path.isfile(p):
          out.append(stat_file(p, os.path.relpath(p, root)))
  out.sort(key=lambda s: s.relpath)
  if not out:
    raise UserError(f'no .py files found under the standard library folder {root}; use '
                    '--config.data.corpus=text with --config.data.path=... instead')
  return out


def split_fraction(doc_id: str) -> float:
  """A stable pseudo-random number in [0, 1) for a document id (orders documents for the split)."""
  h = hashlib.sha256(doc_id.encode('utf-8')).digest()
  return int.from_bytes(h[:8], 'big') / 2.0**64


# ---------------------------------------------------------------------------------------------
# Text input: the one reader of the bytes a user hands the commands (corpora, JSONL examples and
# pairs, results tables, the chat's stdin and a prompt from the command line).
#
# Bytes that are not UTF-8 are handled one of two ways, chosen by the caller:
#   * refused (data files: fine-tuning examples, preference pairs, a results table): UserError
#     naming the file, the line and the byte offset of the first bad byte; a NUL byte is refused
#     the same way (such a file is binary, not text);
#   * replaced (corpora, typed or pasted text): each invalid sequence becomes U+FFFD and is
#     counted, and the caller reports the count.
# A leading byte-order mark (Windows editors write one) is dropped from files read as data.

BOM = '\ufeff'


def decode_text(raw: bytes) -> tuple[str, int]:
  """UTF-8 text and the number of characters that had to be replaced with U+FFFD."""
  try:
    return raw.decode('utf-8'), 0
  except UnicodeDecodeError:
    text = raw.decode('utf-8', errors='replace')
    # U+FFFD already present in the file is not a replacement.
    return text, text.count('\ufffd') - raw.count('\ufffd'.encode('utf-8'))


def read_bytes(path: str, what: str = 'file') -> bytes:
  """A file's bytes; a folder or an unreadable file is refused in one sentence."""
  if os.path.isdir(path):
    raise UserError(f'the {what} {path} is a folder; name a file.')
  try:
    with open(path, 'rb') as f:
      return f.read()
  except FileNotFoundError:
    raise UserError(f'the {what} {path} does not exist.') from None
  except OSError as e:
    raise UserError(f'cannot read the {what} {path} ({e.strerror}); fix its permissions or name '
                    'another file.') from None


def _where(raw: bytes, offset: int) -> str:
  line = raw.count(b'\n', 0, offset) + 1
  return f'line {line}, byte offset {offset}'


def decode_strict(raw: bytes, path: str, what: str = 'file') -> str:
  """UTF-8 text of a data file, a leading BOM dropped; a byte that is not UTF-8, or a NUL byte,
  is refused naming the file, line and byte offset."""
  try:
    text = raw.decode('utf-8')
  except UnicodeDecodeError as e:
    raise UserError(f'the {what} {path} is not UTF-8 text: byte 0x{raw[e.start]:02x} at '
                    f'{_where(raw, e.start)} is not valid UTF-8; save the file as UTF-8 (or fix '
                    'that line).') from None
  nul = raw.find(b'\x00')
  if nul >= 0:
    raise UserError(f'the {what} {path} holds a NUL byte at {_where(raw, nul)}, so it is binary, '
                    'not text; name the text file you meant.')
  return text[1:] if text.startswith(BOM) else text


def read_text(path: str, what: str = 'file', replace: bool = False) -> tuple[str, int]:
  """(text, characters replaced) of a file a user gave; invalid UTF-8 is refused (decode_strict)
  or, with replace=True, replaced with U+FFFD and counted."""
  raw = read_bytes(path, what)
  if not replace:
    return decode_strict(raw, path, what), 0
  text, bad = decode_text(raw)
  return (text[1:] if text.startswith(BOM) else text), bad


def read_lines(path: str, what: str = 'file') -> list[tuple[int, str]]:
  """(line number, line) of a line-oriented data file (JSONL), read as read_text refuses bad
  bytes; CRLF and a lone CR end a line as LF does."""
  text, _ = read_text(path, what)
  text = text.replace('\r\n', '\n').replace('\r', '\n')
  return list(enumerate(text.split('\n'), start=1))


def clean_text(text: str) -> tuple[str, int]:
  """Text that came in through Python's surrogateescape (stdin, command-line arguments) as valid
  Unicode: escaped bytes that are not UTF-8 become U+FFFD; returns (text, characters replaced)."""
  try:
    text.encode('utf-8')
    return text, 0
  except UnicodeEncodeError:
    pass
  try:
    raw = text.encode('utf-8', 'surrogateescape')
  except UnicodeEncodeError:     # a lone surrogate that is not an escaped byte
    raw = text.encode('utf-8', 'surrogatepass')
  return decode_text(raw)


# ----------------------------------------------------------------------------------------------
# Synthetic Markov source.


class MarkovSource:
  """A seeded random sparse Markov source over `vocab` symbols.

  The context is the previous `order` symbols (vocab**order contexts). Each context allows
  `branching` distinct next symbols with probabilities drawn from Dirichlet(concentration); the
  others have probability zero. The draw is repeated with derived seeds until the context chain has
  a single closed class, so the stationary distribution (and with it the entropy rate) is unique.
  Samples start from a stationary context, so every position is distributed like the long-run
  average and the mean -log p under the true model estimates the entropy rate without bias.
  """

  def __init__(self, vocab: int, order: int, branching: int, concentration: float, seed: int):
    self.vocab, self.order, self.branching = vocab, order, branching
    self.concentration, self.seed = concentration, seed
    self.n_contexts = vocab**order
    if self.n_contexts > MAX_SYNTHETIC_CONTEXTS:
      raise UserError(f'data.synthetic_vocab**data.synthetic_order = {self.n_contexts} contexts '
                      f'is more than {MAX_SYNTHETIC_CONTEXTS}; lower --config.data.synthetic_vocab '
                      'or --config.data.synthetic_order')
    for attempt in range(100):
      rng = np.random.default_rng([seed, attempt, 0x5EED])
      # next_sym[c, j]: the j-th allowed next symbol of context c; probs[c, j]: its probability.
      keys = rng.random((self.n_contexts, vocab))
      self.next_sym = np.argsort(keys, axis=1)[:, :branching].astype(np.int64)
      self.probs = rng.dirichlet(np.full(branching, concentration), size=self.n_contexts)
      # A Dirichlet draw can underflow to exact zeros at small concentration; keep every allowed
      # symbol possible so "allowed" and "probability > 0" agree.
      self.probs = np.maximum(self.probs, 1e-12)
      self.probs /= self.probs.sum(axis=1, keepdims=True)
      # The context after emitting symbol x in context c drops c's oldest symbol and appends x.
      shifted = (np.arange(self.n_contexts)[:, None] * vocab) % self.n_contexts
      self.next_ctx = shifted + self.next_sym
      self.stationary = self._stationary()
      if self._single_closed_class():
        break
    else:
      raise UserError('could not draw a synthetic source with a unique stationary distribution; '
                      'raise --config.data.synthetic_branching')
    ent = -(self.probs * np.log(self.probs)).sum(axis=1)
    self.context_entropy = ent
    self.entropy_rate = float(self.stationary @ ent)

  def _stationary(self) -> np.ndarray:
    """Power iteration on the lazy chain (P + I) / 2: same fixed point as P, but never periodic."""
    pi = np.full(self.n_contexts, 1.0 / self.n_contexts)
    flat_ctx = self.next_ctx.ravel()
    for _ in range(100_000):
      moved = np.bincount(flat_ctx, weights=(pi[:, None] * self.probs).ravel(),
                          minlength=self.n_contexts)
      new = 0.5 * (pi + moved)
      new /= new.sum()
      if np.abs(new - pi).sum() < 1e-13:
        return new
      pi = new
    return pi

  def _single_closed_class(self) -> bool:
    """True when every context can reach the most likely one, i.e. exactly one closed class."""
    reach = np.zeros(self.n_contexts, bool)
    reach[int(np.argmax(self.stationary))] = True
    while True:
      new = reach | reach[self.next_ctx].any(axis=1)
      if (new == reach).all():
        return bool(reach.all())
      reach = new

  def settings(self) -> dict:
    return {'vocab': self.vocab, 'order': self.order, 'branching': self.branching,
            'concentration': self.concentration, 'seed': self.seed}

  def sample(self, n: int, seed: int) -> np.ndarray:
    """n symbols (int64) of one stationary run of the chain, seeded by `seed`."""
    rng = np.random.default_rng([self.seed, seed, 0xD47A])
    ctx = int(rng.choice(self.n_contexts, p=self.stationary))
    u = rng.random(n)
    cum = np.cumsum(self.probs, axis=1)
    cum[:, -1] = 1.0  # So a uniform draw below 1 always lands on an allowed symbol.
    # The chain is sequential, so the loop runs on plain Python lists (several times faster than
    # per-step numpy calls).
    cum_l, sym_l, ctx_l = cum.tolist(), self.next_sym.tolist(), self.next_ctx.tolist()
    out = [0] * n
    for i, x in enumerate(u.tolist()):
      j = bisect.bisect_right(cum_l[ctx], x)
      out[i] = sym_l[ctx][j]
      ctx = ctx_l[ctx][j]
    return np.asarray(out, np.int64)

  def log_probs(self, symbols: np.ndarray) -> np.ndarray:
    """-log p(symbols[t] | previous `order` symbols) under the true model, for t >= order."""
    s = np.asarray(symbols, np.int64)
    ctx = np.zeros(len(s) - self.order, np.int64)
    for k in range(self.order):
      ctx = ctx * self.vocab + s[k:len(s) - self.order + k]
    nxt = s[self.order:]
    # Position of each emitted symbol within its context's allowed list.
    match = self.next_sym[ctx] == nxt[:, None]
    if not match.any(axis=1).all():
      raise ValueError('the sequence contains a transition the source does not allow')
    return -np.log(self.probs[ctx, match.argmax(axis=1)])


@dataclasses.dataclass
class SyntheticCorpus:
  """Train and validation token streams of a Markov source, with its entropy rate."""
  source: MarkovSource
  train: np.ndarray
  val: np.ndarray
  content_hash: str
  entropy_rate: float


def make_synthetic(vocab: int, order: int, branching: int, concentration: float, seed: int,
                   n_tokens: int, val_fraction: float) -> SyntheticCorpus:
  """Generates `n_tokens` training symbols and ceil(n_tokens * val_fraction) validation symbols."""
  src = MarkovSource(vocab, order, branching, concentration, seed)
  train = src.sample(n_tokens, seed=1)
  val = src.sample(max(1, math.ceil(n_tokens * val_fraction)), seed=2)
  sha = hashlib.sha256(json.dumps(src.settings(), sort_keys=True).encode())
  sha.update(train.astype('<u4').tobytes())
  sha.update(val.astype('<u4').tobytes())
  return SyntheticCorpus(src, train, val, sha.hexdigest(), src.entropy_rate)
