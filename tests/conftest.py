"""Shared test settings."""
import pytest
from threadpoolctl import threadpool_limits


@pytest.fixture(scope='module')
def cache_dir(tmp_path_factory):
  """A corpus cache shared by the tests of one module."""
  return str(tmp_path_factory.mktemp('cache'))


@pytest.fixture(scope='session', autouse=True)
def single_threaded_blas():
  """Tiny numpy/scipy problems run faster on one BLAS thread, above all on a loaded machine."""
  with threadpool_limits(limits=1, user_api='blas'):
    yield
