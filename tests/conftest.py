"""Shared test settings."""
import pytest
from threadpoolctl import threadpool_limits


@pytest.fixture(scope='module')
def cache_dir(tmp_path_factory):
  """A corpus cache shared by the tests of one module."""
  return str(tmp_path_factory.mktemp('cache'))


@pytest.fixture(scope='module')
def sp_tokenizer(tmp_path_factory):
  """A small SentencePiece BPE tokenizer (400 pieces) trained on 150 KB of the default corpus."""
  from configs import base
  from lm import data as data_lib
  cfg = base.get_config().data
  cfg.tokenizer, cfg.vocab_size, cfg.max_bytes = 'sentencepiece', 400, 150_000
  cfg.cache_dir = str(tmp_path_factory.mktemp('sp'))
  return data_lib.prepare(data_lib.DataConfig.from_config(cfg)).tokenizer


@pytest.fixture(scope='session', autouse=True)
def single_threaded_blas():
  """Tiny numpy/scipy problems run faster on one BLAS thread, above all on a loaded machine."""
  with threadpool_limits(limits=1, user_api='blas'):
    yield
