"""One training run in a child process of a parallel sweep: python -m lm.worker RUN_DIR.

Reads RUN_DIR/run_config.json (written by the sweep runner), trains into RUN_DIR and records the
wall time in summary.json. Before JAX starts it pins itself to the CPU cores named in
LM_WORKER_CPUS (if set) and asks the kernel for SIGTERM when the sweep process dies, so killing
the sweep at any moment also stops its runs at a checkpoint instead of orphaning them.

Exit status: 0 finished, 3 stopped by SIGTERM (checkpoint saved; rerun resumes), 2 bad input
(one sentence on stderr), 1 anything else (traceback on stderr).
"""
import os
import signal
import sys

STOPPED = 3


def _die_with_parent() -> None:
  """PR_SET_PDEATHSIG (Linux): SIGTERM to this process when the sweep process exits."""
  parent = int(os.environ.get('LM_WORKER_PARENT', '0'))
  if not parent or not sys.platform.startswith('linux'):
    return
  import ctypes
  try:
    ctypes.CDLL(None, use_errno=True).prctl(1, signal.SIGTERM)   # 1 = PR_SET_PDEATHSIG
  except (OSError, AttributeError):
    return
  if os.getppid() != parent:   # the sweep died before the request was in place
    sys.exit(STOPPED)


def main(argv) -> int:
  if len(argv) != 2:
    print('usage: python -m lm.worker RUN_DIR', file=sys.stderr)
    return 2
  _die_with_parent()
  # Ctrl-C reaches the whole process group; the sweep process turns it into SIGTERM for us.
  signal.signal(signal.SIGINT, signal.SIG_IGN)
  cpus = os.environ.get('LM_WORKER_CPUS')
  if cpus and hasattr(os, 'sched_setaffinity'):
    os.sched_setaffinity(0, {int(c) for c in cpus.split(',')})   # before XLA sizes its threads
  import json

  import ml_collections

  from lm.stages import pretrain as train_lib
  from lm.errors import UserError
  from lm.scaling import runner as runner_lib
  from lm.training.checkpoint import quiet_failed_save_tracebacks

  quiet_failed_save_tracebacks()   # a failed save is one line in train.log, its last

  rdir = argv[1]
  with open(os.path.join(rdir, 'run_config.json')) as f:
    cfg = ml_collections.ConfigDict(json.load(f))
  try:
    if not runner_lib.branch_in_worker(rdir, train_lib.train):   # a WSD branch: its trunk first
      return STOPPED
    summary = runner_lib.train_and_record(train_lib.train, cfg, rdir)
  except UserError as e:
    print(f'error: {e}', file=sys.stderr)
    return 2
  return 0 if summary.get('finished') else STOPPED


if __name__ == '__main__':
  sys.exit(main(sys.argv))
