"""Generated addition: "a+b=c" problems, their held-out split and training documents.

A problem a+b is held out iff `corpus.split_fraction('arith:a+b')` falls below ARITH_HELDOUT, so
the split is the same in every process. `arith_documents` (the text that data.arith_fraction mixes
into a corpus) draws only problems that are not held out; the arithmetic tasks (lm/eval/tasks.py)
score only held-out ones, so a scored problem never occurs in training text.
"""
from __future__ import annotations

import numpy as np

from lm.data import corpus as corpus_lib
from lm.errors import UserError

ARITH_DIGITS = (1, 2, 3, 4)
ARITH_HELDOUT = 0.2
ARITH_LINES_PER_DOC = 16


def arith_is_heldout(a: int, b: int) -> bool:
  return corpus_lib.split_fraction(f'arith:{a}+{b}') < ARITH_HELDOUT


def arith_line(a: int, b: int) -> str:
  return f'{a}+{b}={a + b}\n'


def _operands(digits: int) -> tuple[int, int]:
  """[lo, hi) of an operand with exactly `digits` digits (0-9 for one digit)."""
  return (0 if digits == 1 else 10**(digits - 1)), 10**digits


def _check_digits(digits: int) -> None:
  if digits not in ARITH_DIGITS:
    raise UserError(f'arithmetic digits={digits} is not supported; use one of '
                    f'{", ".join(map(str, ARITH_DIGITS))}.')


def arith_problems(digits: int, n: int, heldout: bool, seed: int = 0) -> list[tuple[int, int]]:
  """n distinct problems (a, b) of `digits` digits from the held-out or the training side, in a
  seeded order; the whole side when it holds fewer than n (one digit: about 20 held out)."""
  _check_digits(digits)
  lo, hi = _operands(digits)
  rng = np.random.default_rng([seed, digits, int(heldout), 0xA21])
  if (hi - lo)**2 <= 20_000:                       # small spaces: enumerate the side
    pool = [(a, b) for a in range(lo, hi) for b in range(lo, hi)
            if arith_is_heldout(a, b) == heldout]
    order = rng.permutation(len(pool))[:n]
    return [pool[i] for i in order]
  out, seen = [], set()
  while len(out) < n:
    a, b = (int(x) for x in rng.integers(lo, hi, size=2))
    if (a, b) not in seen and arith_is_heldout(a, b) == heldout:
      seen.add((a, b))
      out.append((a, b))
  return out


def arith_documents(n_bytes: int, max_digits: int = 4, seed: int = 0) -> list[tuple[str, str]]:
  """(doc id, text) documents of ARITH_LINES_PER_DOC training-side "a+b=c" lines each, digit
  counts drawn uniformly from 1..max_digits, until they hold at least n_bytes bytes."""
  _check_digits(max_digits)
  rng = np.random.default_rng([seed, 0xA217])
  docs, total, lines = [], 0, []
  while total < n_bytes:
    d = int(rng.integers(1, max_digits + 1))
    lo, hi = _operands(d)
    a, b = (int(x) for x in rng.integers(lo, hi, size=2))
    if arith_is_heldout(a, b):
      continue
    line = arith_line(a, b)
    lines.append(line)
    total += len(line)
    if len(lines) == ARITH_LINES_PER_DOC:
      docs.append((f'arith/{len(docs)}', ''.join(lines)))
      lines = []
  if lines:
    docs.append((f'arith/{len(docs)}', ''.join(lines)))
  return docs
