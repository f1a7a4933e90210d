"""Tests of the weighted mixture of Datasets (lm/data/mixture.py)."""
import math

import numpy as np
import pytest

from lm.data import mixture
from lm.data.mixture import MixtureDataset
from lm.data.tokenizer import ByteTokenizer
from lm.data.tokens import Dataset
from lm.errors import UserError

TOK = ByteTokenizer()
SEQ = 8


def part(lo, hi, n_train, n_val, seed, bytes_per_token=2, tok=TOK):
  """A Dataset whose tokens all lie in [lo, hi): the range tells which source a row came from."""
  rng = np.random.default_rng(seed)
  train = rng.integers(lo, hi, n_train).astype(np.uint16)
  val = rng.integers(lo, hi, n_val).astype(np.uint16)
  split = lambda n: {'tokens': n, 'bytes': None if bytes_per_token is None else bytes_per_token * n,
                     'documents': 3}
  info = {'corpus_hash': f'corpus-{lo}-{hi}-{seed}', 'tokenizer_hash': tok.hash,
          'entropy_rate': None, 'splits': {'train': split(n_train), 'val': split(n_val)}}
  return Dataset('/nonexistent', info, tok, train, val)


def windows_of(ds, split):
  """Row contents -> window index, over every window of the split (contents are unique)."""
  t = ds.tokens(split)
  out = {tuple(int(x) for x in t[w * SEQ:w * SEQ + SEQ + 1]): w
         for w in range(ds.n_windows(split, SEQ))}
  assert len(out) == ds.n_windows(split, SEQ)
  return out


def source_of(rows, bounds=(100,)):
  """The source of each row from its first token: source i's tokens lie in [bounds[i - 1],
  bounds[i])."""
  return np.searchsorted(np.array(bounds), rows[:, 0], side='right')


def two(weights=(0.7, 0.3), n_b=4000):
  return MixtureDataset([part(0, 100, 4000, 400, 1), part(100, 256, n_b, 400, 2)],
                        list(weights), ['web', 'code'])


def test_shares_follow_weights_over_10000_batches():
  mx, bs = two(), 8
  counts = np.zeros(2, np.int64)
  for step in range(10_000):
    counts += np.bincount(source_of(mx.batch('train', step, bs, SEQ, seed=3)), minlength=2)
  n = 10_000 * bs
  shares = counts / n
  assert abs(shares[0] - 0.7) < 0.01 and abs(shares[1] - 0.3) < 0.01, shares
  # Exact integer assignment: within K rows of the weights, and equal to the closed form.
  assert np.abs(counts - np.array([0.7, 0.3]) * n).max() <= 2
  assert counts.tolist() == mx.counts(n)
  assert [d['rows_drawn'] for d in mx.draws(10_000, bs, SEQ)] == counts.tolist()


def test_three_sources_exact_shares():
  parts = [part(0, 100, 2000, 200, 1), part(100, 200, 2000, 200, 2), part(200, 256, 2000, 200, 3)]
  names = ['a', 'b', 'c']
  # Weights that are exact in 2**-20: every batch of 4 holds exactly 2, 1 and 1 rows.
  mx = MixtureDataset(parts, [2, 1, 1], names)
  for step in range(50):
    src = source_of(mx.batch('train', step, 4, SEQ, seed=0), (100, 200))
    assert np.bincount(src, minlength=3).tolist() == [2, 1, 1]
  # 0.5 / 0.3 / 0.2: every prefix of rows within K = 3 rows of the weights.
  mx = MixtureDataset(parts, [0.5, 0.3, 0.2], names)
  assert sum(mx.m) == mixture.WEIGHT_DENOMINATOR
  assert mx.weights == pytest.approx([0.5, 0.3, 0.2])
  rows = np.concatenate([mx.batch('train', s, 10, SEQ, seed=0) for s in range(1000)])
  src = source_of(rows, (100, 200))
  n = np.arange(1, len(src) + 1)
  for s, w in enumerate([0.5, 0.3, 0.2]):
    assert np.abs(np.cumsum(src == s) - w * n).max() <= 3
  assert np.bincount(src).tolist() == mx.counts(len(src))
  assert np.bincount(src).tolist() == [5000, 3000, 2000]
  # The source of each global row matches `assign`, and local rows count up per source.
  source, local = mx.assign(np.arange(len(src)))
  assert (source == src).all()
  for s in range(3):
    assert (local[source == s] == np.arange((source == s).sum())).all()


def test_tiny_weight_is_never_dropped():
  m = mixture.integer_weights([1e-9, 1.0, 1e-12])
  assert sum(m) == mixture.WEIGHT_DENOMINATOR and min(m) == 1
  assert mixture.integer_weights([1, 1, 1]) == [349526, 349525, 349525]
  assert mixture.integer_weights([1e308, 1e308, 5e-324]) == [524287, 524288, 1]


def test_batch_is_a_pure_function_of_seed_step_and_process():
  mx = two()
  seq = [mx.batch('train', s, 8, SEQ, seed=5) for s in range(40)]
  mixture._permutation.cache_clear()
  fresh = two()
  for s in (0, 17, 39):
    np.testing.assert_array_equal(fresh.batch('train', s, 8, SEQ, seed=5), seq[s])
  for s in (3, 39):
    halves = [mx.batch('train', s, 8, SEQ, seed=5, process_index=p, process_count=2)
              for p in range(2)]
    np.testing.assert_array_equal(np.concatenate(halves), seq[s])
    quarters = [mx.batch('train', s, 8, SEQ, seed=5, process_index=p, process_count=4)
                for p in range(4)]
    np.testing.assert_array_equal(np.concatenate(quarters), seq[s])
    assert seq[s].dtype == np.int32 and seq[s].shape == (8, SEQ + 1)
  assert not np.array_equal(mx.batch('train', 0, 8, SEQ, seed=6), seq[0])
  val = mx.batch('val', 2, 8, SEQ, seed=5)
  lookup = [windows_of(p, 'val') for p in mx.parts]
  assert all(tuple(r.tolist()) in lookup[s] for r, s in zip(val, source_of(val)))


def test_small_source_wraps_into_its_second_epoch():
  mx = two(weights=(0.5, 0.5), n_b=20 * SEQ + 1)   # 'code' holds 20 windows
  assert mx.parts[1].n_windows('train', SEQ) == 20
  rows = np.concatenate([mx.batch('train', s, 4, SEQ, seed=1) for s in range(15)])
  src = source_of(rows)
  lookup = windows_of(mx.parts[1], 'train')
  small = [lookup[tuple(r.tolist())] for r in rows[src == 1]]
  assert len(small) == 30
  assert sorted(small[:20]) == list(range(20))   # epoch 0: every window once
  assert len(set(small[20:])) == 10 and small[20:] != small[:10]   # epoch 1: a new order
  big = windows_of(mx.parts[0], 'train')
  assert len({big[tuple(r.tolist())] for r in rows[src == 0]}) == 30
  web, code = mx.draws(15, 4, SEQ)
  assert code == {'name': 'code', 'weight': 0.5, 'tokens': 20 * SEQ + 1, 'rows_drawn': 30,
                  'tokens_drawn': 30 * SEQ, 'epochs': 1.5}
  assert web['rows_drawn'] == 30 and web['epochs'] == pytest.approx(30 / 499)
  assert mx.epochs(15, 4, SEQ) == 1.5


def test_mismatched_tokenizer_is_refused():
  other = part(100, 256, 4000, 400, 2, tok=ByteTokenizer(chat=False))
  with pytest.raises(UserError, match='must share one tokenizer'):
    MixtureDataset([part(0, 100, 4000, 400, 1), other], [1, 1], ['web', 'code'])


@pytest.mark.parametrize('weights', [[1, 0], [1, -0.5], [1, math.nan], [1, math.inf], [1, True],
                                     [1, '0.5'], [1, None]])
def test_bad_weights_are_refused(weights):
  with pytest.raises(UserError, match="source 'code'.*positive finite"):
    MixtureDataset([part(0, 100, 400, 100, 1), part(100, 256, 400, 100, 2)], weights,
                   ['web', 'code'])


def test_empty_and_duplicate_sources_are_refused():
  with pytest.raises(UserError, match='empty'):
    MixtureDataset([], [], [])
  with pytest.raises(UserError, match="'web' twice"):
    MixtureDataset([part(0, 100, 400, 100, 1), part(100, 256, 400, 100, 2)], [1, 1],
                   ['web', 'web'])


def test_check_names_the_source_that_fails():
  mx = two(n_b=3 * SEQ + 1)   # 'code' has 3 training windows
  mx.check(2, SEQ)
  with pytest.raises(UserError, match="data.sources 'code': train.seq_len=8 is too long"):
    mx.check(4, SEQ)
  with pytest.raises(UserError, match="'web'.*not divisible"):
    mx.batch('train', 0, 2, SEQ, seed=0, process_count=4)


def test_eval_batches_are_fixed_and_drawn_from_both_sources():
  mx = two()
  first = mx.eval_batches(3, 8, SEQ)
  again = two().eval_batches(3, 8, SEQ)
  assert len(first) == 3
  for a, b in zip(first, again):
    np.testing.assert_array_equal(a, b)
  halves = [mx.eval_batches(3, 8, SEQ, process_index=p, process_count=2) for p in range(2)]
  for i in range(3):
    np.testing.assert_array_equal(np.concatenate([h[i] for h in halves]), first[i])
  rows = np.concatenate(first)
  src = source_of(rows)
  assert np.bincount(src).tolist() == mx.counts(24) == [16, 8]
  # Each source's share is evenly spaced windows of its validation stream, in order.
  for s in range(2):
    lookup = windows_of(mx.parts[s], 'val')
    got = [lookup[tuple(r.tolist())] for r in rows[src == s]]
    nw, c = mx.parts[s].n_windows('val', SEQ), len(got)
    assert got == [i * nw // c for i in range(c)]
  # A validation stream with fewer windows than its share repeats them in order.
  small = MixtureDataset([part(0, 100, 400, 3 * SEQ + 1, 1), part(100, 256, 400, 400, 2)],
                         [0.5, 0.5], ['web', 'code'])
  rows = np.concatenate(small.eval_batches(2, 4, SEQ))
  lookup = windows_of(small.parts[0], 'val')
  assert [lookup[tuple(r.tolist())] for r in rows[source_of(rows) == 0]] == [0, 1, 2, 0]


def test_info_hashes_and_bytes_per_token():
  a, b = part(0, 100, 4000, 400, 1, bytes_per_token=2), part(100, 256, 3000, 300, 2,
                                                              bytes_per_token=3)
  mx = MixtureDataset([a, b], [0.7, 0.3], ['web', 'code'])
  assert mx.bytes_per_token('val') == pytest.approx(0.7 * 2 + 0.3 * 3)
  assert mx.info['splits']['train'] == {'tokens': 7000, 'bytes': 17000, 'documents': 6}
  assert [(m['name'], m['weight'], m['info']) for m in mx.info['mixture']] == [
      ('web', pytest.approx(0.7), a.info), ('code', pytest.approx(0.3), b.info)]
  assert mx.tokenizer is TOK and mx.tokenizer_hash == TOK.hash and mx.entropy_rate is None
  assert mx.n_windows('train', SEQ) == a.n_windows('train', SEQ) + b.n_windows('train', SEQ)
  same = MixtureDataset([a, b], [7, 3], ['x', 'y'])
  assert same.corpus_hash == mx.corpus_hash and len(mx.corpus_hash) == 64
  assert MixtureDataset([a, b], [0.6, 0.4], ['web', 'code']).corpus_hash != mx.corpus_hash
  assert MixtureDataset([b, a], [0.3, 0.7], ['code', 'web']).corpus_hash != mx.corpus_hash
  synthetic = part(100, 256, 3000, 300, 2, bytes_per_token=None)
  mx = MixtureDataset([a, synthetic], [0.7, 0.3], ['web', 'symbols'])
  assert mx.bytes_per_token('val') is None and mx.info['splits']['val']['bytes'] is None
