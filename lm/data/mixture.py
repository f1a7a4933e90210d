"""A weighted mixture of token Datasets that share one tokenizer, behind the Dataset batch API.

`MixtureDataset(parts, weights, names)` offers what the training loop reads from a Dataset
(lm/stages/pretrain.py, lm/scaling/packed.py): `.batch`, `.eval_batches`, `.epochs`,
`.bytes_per_token`, `.check`, `.info`, `.tokenizer`, `.entropy_rate`, `.corpus_hash`,
`.tokenizer_hash`, plus `.draws` (per source rows, tokens and epochs, for the manifest) and
`.n_windows` (summed over the sources). It has no single token stream or folder, so `.tokens`,
`.train`, `.val` and `.path` are left out; nothing in the loop reads them.

Weights. The weights are normalised to sum 1 and held as integers m_s out of M = 2**20
(largest-remainder rounding, so they sum to M exactly; a positive weight gets at least 1, so a
weight below 1 / M is drawn at 1 / M).

Rows. Global row g = step * batch_size + r goes to a source by nested Beatty sequences, in exact
integer arithmetic: source 0 takes row g iff floor(m_0 (g + 1) / M) > floor(m_0 g / M), as its
local row floor(m_0 g / M); a row it does not take gets index h = g - floor(m_0 (g + 1) / M) among
the rows left over, which sources 1..K-1 split the same way with m_1 out of M - m_0, and so on (the
last source takes all rows that reach it). Among the first n rows source 0 thus holds
floor(m_0 n / M) (`counts`), every source stays within K rows of its share over any prefix, and the
sources interleave evenly inside every batch, so each process's slice is a mix too (rows are not
shuffled within a step).
Source s's local row i is window perm_{s,e}[i % n_s] of that source, with n_s its windows of
seq_len + 1 tokens at stride seq_len, e = i // n_s and perm_{s,e} a permutation seeded by
(seed, s, e, split). Process p of P takes global rows [p * B / P, (p + 1) * B / P). A batch is thus
a pure function of (seed, step, process index, process count), as a Dataset's is: resuming needs
only the step, and no window of a source repeats within one of that source's epochs.

`eval_batches` assigns its n * batch_size fixed validation rows the same way; each source reads its
share as evenly spaced windows of its validation stream (repeating in order when it has fewer).
"""
from __future__ import annotations

import functools
import hashlib
import json
import math
import numbers

import numpy as np

from lm.data.build import SPLITS
from lm.errors import UserError

# The weights' integer denominator: rows are assigned in exact integer arithmetic with it.
WEIGHT_DENOMINATOR = 2**20
# m * (g + 1) must fit in int64: with m <= 2**20, global rows below 2**42 are safe.
_MAX_ROW = 2**42


def integer_weights(weights: list[float], total: int = WEIGHT_DENOMINATOR) -> list[int]:
  """Positive weights as integers that sum to `total` (largest-remainder rounding; none is 0)."""
  top = max(weights)   # scaled first, so that huge weights do not sum to inf
  s = math.fsum(w / top for w in weights)
  exact = [w / top / s * total for w in weights]
  m = [max(1, math.floor(x)) for x in exact]
  short = total - sum(m)
  if short > 0:   # fewer than len(weights): hand them out by the largest remainders
    order = sorted(range(len(m)), key=lambda i: (-(exact[i] - math.floor(exact[i])), i))
    for i in order[:short]:
      m[i] += 1
  while short < 0:   # tiny weights lifted to 1: take back from the largest
    i = max(range(len(m)), key=lambda j: (m[j], -j))
    m[i] -= 1
    short += 1
  return m


@functools.lru_cache(maxsize=16)
def _permutation(seed: int, source: int, epoch: int, n: int, salt: int) -> np.ndarray:
  """The window order of one source's epoch (salt keeps train and val orders apart)."""
  return np.random.default_rng([seed, source, epoch, salt, 0x313C]).permutation(n)


def _read_rows(tokens: np.ndarray, windows: np.ndarray, seq_len: int) -> np.ndarray:
  """int32 rows of seq_len + 1 tokens starting at window * seq_len (as Dataset reads them)."""
  starts = windows.astype(np.int64) * seq_len
  return np.asarray(tokens[starts[:, None] + np.arange(seq_len + 1)], np.int32)


class MixtureDataset:
  """Sources drawn in fixed proportions, row by row, with a Dataset's batch functions."""

  def __init__(self, parts: list, weights: list[float], names: list[str]):
    parts, weights, names = list(parts), list(weights), list(names)
    if not parts:
      raise UserError('data.sources is empty; list at least one source with a positive weight')
    if not len(parts) == len(weights) == len(names):
      raise ValueError(f'{len(parts)} parts, {len(weights)} weights and {len(names)} names differ '
                       'in number')
    if len(parts) > WEIGHT_DENOMINATOR:
      raise UserError(f'data.sources lists {len(parts)} sources, more than '
                      f'{WEIGHT_DENOMINATOR}; merge some of them')
    for name, w in zip(names, weights):
      if isinstance(w, bool) or not isinstance(w, numbers.Real) or not (
          math.isfinite(w) and w > 0):
        raise UserError(f'data.sources gives source {name!r} the weight {w!r}, which is not a '
                        'positive finite number; give every source a weight > 0')
    if len(set(names)) != len(names):
      dup = next(n for n in names if names.count(n) > 1)
      raise UserError(f'data.sources names the source {dup!r} twice; give every source its own '
                      'name')
    hashes = [p.tokenizer_hash for p in parts]
    for name, h in zip(names, hashes):
      if h != hashes[0]:
        raise UserError(f'all sources of data.sources must share one tokenizer, but {names[0]!r} '
                        f'and {name!r} differ; prepare every source with the same data.tokenizer '
                        'settings')
    self.parts = parts
    self.names = names
    self.m = integer_weights([float(w) for w in weights])
    top = max(float(w) for w in weights)
    total = math.fsum(float(w) / top for w in weights)
    self.weights = [float(w) / top / total for w in weights]
    self.tokenizer = parts[0].tokenizer
    self.info = self._info()

  def _info(self) -> dict:
    splits = {}
    for split in SPLITS:
      s = [p.info['splits'][split] for p in self.parts]
      b = [x.get('bytes') for x in s]
      splits[split] = {'tokens': sum(int(x['tokens']) for x in s),
                       'bytes': None if any(v is None for v in b) else sum(int(v) for v in b),
                       'documents': sum(int(x.get('documents') or 0) for x in s)}
    material = [[p.corpus_hash, m] for p, m in zip(self.parts, self.m)]
    corpus_hash = hashlib.sha256(json.dumps(material).encode('utf-8')).hexdigest()
    return {'mixture': [{'name': n, 'weight': w, 'info': p.info}
                        for n, w, p in zip(self.names, self.weights, self.parts)],
            'corpus_hash': corpus_hash, 'tokenizer_hash': self.parts[0].tokenizer_hash,
            'tokenizer': self.parts[0].info.get('tokenizer'), 'entropy_rate': None,
            'splits': splits}

  # Row assignment.

  def assign(self, g) -> tuple[np.ndarray, np.ndarray]:
    """(source, local row) of each global row index in g, as int64 arrays of g's shape (module
    docstring)."""
    g = np.asarray(g, np.int64)
    if g.size and (g.min() < 0 or g.max() >= _MAX_ROW):
      raise ValueError(f'global row indices must lie in [0, {_MAX_ROW})')
    source = np.full(g.size, len(self.m) - 1, np.int64)
    local = np.empty(g.size, np.int64)
    at, h = np.arange(g.size), g.ravel()   # the rows still unassigned, and their index among them
    denom = WEIGHT_DENOMINATOR
    for s, a in enumerate(self.m[:-1]):
      hi = (a * (h + 1)) // denom
      lo = (a * h) // denom
      take = hi > lo
      source[at[take]] = s
      local[at[take]] = lo[take]
      at, h = at[~take], (h - hi)[~take]
      denom -= a
    local[at] = h
    return source.reshape(g.shape), local.reshape(g.shape)

  def counts(self, n: int) -> list[int]:
    """How many of the first n global rows each source takes (closed form of `assign`)."""
    out, rest, denom = [], int(n), WEIGHT_DENOMINATOR
    for a in self.m[:-1]:
      c = a * rest // denom
      out.append(c)
      rest -= c
      denom -= a
    return out + [rest]

  # The Dataset API.

  def n_windows(self, split: str, seq_len: int) -> int:
    """The windows of seq_len + 1 tokens (stride seq_len) of the split, summed over the sources."""
    return sum(p.n_windows(split, seq_len) for p in self.parts)

  def check(self, batch_size: int, seq_len: int, process_count: int = 1) -> None:
    """UserError unless every source works with these batch settings on its own."""
    for name, p in zip(self.names, self.parts):
      try:
        p.check(batch_size, seq_len, process_count)
      except UserError as e:
        raise UserError(f'data.sources {name!r}: {e}') from None

  def _process_rows(self, batch_size: int, process_index: int, process_count: int) -> np.ndarray:
    if not 0 <= process_index < process_count:
      raise ValueError(f'process_index {process_index} is outside [0, {process_count})')
    per = batch_size // process_count
    return np.arange(process_index * per, (process_index + 1) * per, dtype=np.int64)

  def batch(self, split: str, step: int, batch_size: int, seq_len: int, seed: int,
            process_index: int = 0, process_count: int = 1) -> np.ndarray:
    """int32 [batch_size // process_count, seq_len + 1]: this process's rows of global step `step`.

    Inputs are [:, :-1] and targets [:, 1:]; rows come from the sources as the module docstring
    describes ('val' works the same way with its own permutations).
    """
    if split not in SPLITS:
      raise ValueError(f'split must be one of {SPLITS}, not {split!r}')
    self.check(batch_size, seq_len, process_count)
    if step < 0:
      raise ValueError(f'step must be non-negative, not {step}')
    g = step * batch_size + self._process_rows(batch_size, process_index, process_count)
    source, local = self.assign(g)
    out = np.empty((len(g), seq_len + 1), np.int32)
    salt = SPLITS.index(split)
    for s in np.unique(source):
      sel = source == s
      part = self.parts[s]
      n = part.n_windows(split, seq_len)
      i = local[sel]
      epochs, pos = i // n, i % n
      windows = np.empty_like(i)
      for e in np.unique(epochs):
        at = epochs == e
        windows[at] = _permutation(int(seed), int(s), int(e), n, salt)[pos[at]]
      out[sel] = _read_rows(part.tokens(split), windows, seq_len)
    return out

  def eval_batches(self, n: int, batch_size: int, seq_len: int, process_index: int = 0,
                   process_count: int = 1) -> list[np.ndarray]:
    """n fixed validation batches of this process's rows (int32, shaped like `batch`).

    The n * batch_size global rows go to the sources as in `batch`; a source that takes c of them
    reads c evenly spaced windows of its validation stream, repeating in order when it has fewer.
    """
    self.check(batch_size, seq_len, process_count)
    counts = self.counts(n * batch_size)
    rows = self._process_rows(batch_size, process_index, process_count)
    out = []
    for b in range(n):
      source, local = self.assign(b * batch_size + rows)
      batch = np.empty((len(rows), seq_len + 1), np.int32)
      for s in np.unique(source):
        sel = source == s
        part, c = self.parts[s], counts[s]
        nw = part.n_windows('val', seq_len)
        i = local[sel]
        windows = i % nw if c >= nw else (i * nw) // c
        batch[sel] = _read_rows(part.tokens('val'), windows, seq_len)
      out.append(batch)
    return out

  def draws(self, steps: int, batch_size: int, seq_len: int) -> list[dict]:
    """Per source, what `steps` training steps draw: name, weight (normalised), tokens (its train
    tokens), rows_drawn, tokens_drawn (rows_drawn * seq_len targets) and epochs (rows_drawn over
    its training windows)."""
    out = []
    for name, w, p, rows in zip(self.names, self.weights, self.parts,
                                self.counts(steps * batch_size)):
      out.append({'name': name, 'weight': w, 'tokens': int(len(p.tokens('train'))),
                  'rows_drawn': rows, 'tokens_drawn': rows * seq_len,
                  'epochs': rows / max(1, p.n_windows('train', seq_len))})
    return out

  def epochs(self, steps: int, batch_size: int, seq_len: int) -> float:
    """The most passes over its training windows that `steps` steps make any source take."""
    return max(d['epochs'] for d in self.draws(steps, batch_size, seq_len))

  def bytes_per_token(self, split: str = 'train') -> float | None:
    """Text bytes per token of the mixed stream: sum over sources of weight * that source's bytes
    per token. Rows are drawn in proportion to the weights and every row holds seq_len targets, so
    this is the stream's total bytes over its total tokens, and a mean loss over mixed rows divided
    by ln 2 and by it is bits per byte of the mix (exact up to how far a finite set of rows strays
    from the weights: K rows at most). None when any source has no bytes (the synthetic corpus)."""
    bpt = [p.bytes_per_token(split) for p in self.parts]
    if any(b is None for b in bpt):
      return None
    return math.fsum(w * b for w, b in zip(self.weights, bpt))

  @property
  def corpus_hash(self) -> str:
    """sha256 over the sources' corpus hashes and integer weights, in order."""
    return self.info['corpus_hash']

  @property
  def tokenizer_hash(self) -> str:
    return self.info['tokenizer_hash']

  @property
  def entropy_rate(self) -> float | None:
    """None: a mixture's best achievable loss is not the weighted sum of its sources' rates."""
    return None
