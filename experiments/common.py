"""Shared plumbing for the teaching experiments: the --out flag, output folders and figures."""
import os
import time

from absl import flags
from absl import logging
import matplotlib

# Agg renders to files only, so the experiments run on machines without a display.
matplotlib.use('Agg')

# Defined once here (not per experiment) so that importing several experiments in one
# process, as the tests do, does not register the same flag twice.
_OUT = flags.DEFINE_string('out', None, 'Folder for the plots (default out/experiments/NAME).')
_RUNS = flags.DEFINE_string('runs', None, 'Folder for the training runs of the experiments that '
                            'train (default runs/NAME).')
_BASE = flags.DEFINE_string('base', None, 'An already pretrained run to start from (default: '
                            'pretrain configs/pretrain_small.py into RUNS/base).')


def runs_dir(name: str, runs: str | None = None) -> str:
  """The folder an experiment's training runs go to: `runs`, else --runs, else runs/NAME."""
  if runs is None:
    runs = _RUNS.value if flags.FLAGS.is_parsed() else None
  return runs or os.path.join('runs', name)


def base_run(base: str | None = None) -> str | None:
  """A pretrained run to start from: `base`, else --base, else None (pretrain one)."""
  if base is None:
    base = _BASE.value if flags.FLAGS.is_parsed() else None
  return base or None


def out_dir(name: str, out: str | None = None) -> str:
  """The folder an experiment writes to (created): `out`, else --out, else out/experiments/NAME."""
  if out is None:
    out = _OUT.value if flags.FLAGS.is_parsed() else None
  path = out or os.path.join('out', 'experiments', name)
  os.makedirs(path, exist_ok=True)
  return path


def save(fig, folder: str, filename: str, tight_layout: bool = True) -> str:
  """Writes `fig` as a PNG into `folder`, closes it and returns the path.

  Pass tight_layout=False for figures with a colorbar shared by several axes, which
  tight_layout cannot arrange.
  """
  import matplotlib.pyplot as plt
  path = os.path.join(folder, filename)
  if tight_layout:
    fig.tight_layout()
  fig.savefig(path, dpi=110, bbox_inches='tight')
  plt.close(fig)
  return path


def main(name: str, run, report, plot):
  """The body of every experiment's `main`: run, print the numbers, write the plots."""
  # absl logs at INFO under app.run; JAX's backend probing and matplotlib's font cache are
  # noise here.
  logging.set_verbosity(logging.WARNING)
  start = time.time()
  result = run()
  report(result)
  folder = out_dir(name)
  for path in plot(result, folder):
    print(f'wrote {path}')
  print(f'{name}: done in {time.time() - start:.1f} s; plots in {folder}')
