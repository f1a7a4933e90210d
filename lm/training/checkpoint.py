"""Orbax checkpoints of the train state: atomic, keep-N, sharded, restorable onto any mesh.

The state is {'params', 'opt_state', 'step'}; the batch stream is a pure function of the step,
so the step is the whole data position. Orbax writes each step into a temporary folder and
renames it when complete, so a kill mid-save leaves no step that looks finished.

Training saves asynchronously (train.async_checkpoint): `save` returns once the arrays are
copied off the devices, and the files are written by a background thread while the next steps
train. A new save, a restore and `close` first wait for the one in flight.

A save that fails (a full disk, no permission) stops the run: the failure of an asynchronous
save is noticed at the next step (`poll`) or the next wait, and becomes one UserError naming the
path, the cause and the checkpoint that is still intact (orbax writes a step into a temporary
folder and renames it only when complete, and deletes old steps only after a new one is, so the
previous checkpoint survives; the failed step's partial files are removed). Before each save the
free space is compared with the size of the last checkpoint, with a warning when it may not fit.
"""
import errno
import glob
import logging
import os
import re
import shutil
import sys
import threading

import jax
from jax.experimental import multihost_utils
import orbax.checkpoint as ocp

from lm.errors import UserError


class Checkpoints:
  """Save/restore of one run's `checkpoints/` folder."""

  def __init__(self, directory: str, keep: int, async_save: bool = False):
    self.directory = os.path.abspath(directory)
    options = ocp.CheckpointManagerOptions(max_to_keep=keep, create=True,
                                           enable_async_checkpointing=async_save)
    try:
      self.manager = ocp.CheckpointManager(self.directory, options=options)
    except OSError as e:
      raise UserError(f'the checkpoint folder {self.directory} cannot be created '
                      f'({_cause(e)}); name a --workdir you can write to.') from None
    _quiet_orbax_errors()
    self.in_flight = None   # the step an asynchronous save is writing
    self.sizes = {}         # step -> bytes on disk, of the steps this object saved or measured
    self.failed_step = None

  def steps(self) -> list[int]:
    return sorted(self.manager.all_steps())

  def save(self, step: int, state) -> None:
    """Writes `step`; asynchronously, this returns while its files are still being written. The
    previous save is complete first (as orbax itself would wait), so its failure stops the run
    before a new one starts; a failure of this save raises UserError (sync) or is raised by
    `poll` or `wait` (async)."""
    self.wait()
    self._check_space(step)
    try:
      self.manager.save(step, args=ocp.args.StandardSave(state), force=True)
    except Exception as e:  # orbax and tensorstore raise several types for a failed write
      self._failed(step, e)
    self.in_flight = step

  def poll(self) -> None:
    """Raises the failure of an asynchronous save that has ended (cheap: no wait while it is
    still being written, nothing when none is)."""
    if self.in_flight is not None and not self.manager.is_saving_in_progress():
      self.wait()

  def wait(self) -> None:
    """Blocks until the save in flight (if any) is complete on disk; a failed one raises
    UserError."""
    step, self.in_flight = self.in_flight, None
    try:
      self.manager.wait_until_finished()
    except Exception as e:  # the background write's own exception, whatever its type
      self._failed(step, e)

  def _remove_partial(self) -> None:
    """The temporary folder of the failed step (written into until the last pending write)."""
    if jax.process_index() == 0 and self.failed_step is not None:
      pattern = f'{self.failed_step}.orbax-*'
      for partial in glob.glob(os.path.join(glob.escape(self.directory), pattern)):
        shutil.rmtree(partial, ignore_errors=True)

  def _check_space(self, step: int) -> None:
    """A warning when the disk's free space is below the size of the last checkpoint."""
    last = self._last_size()
    if not last:
      return
    try:
      free = shutil.disk_usage(self.directory).free
    except OSError:
      return
    if free < 1.1 * last:
      print(f'warning: the disk of {self.directory} has {_mb(free)} free and the last '
            f'checkpoint took {_mb(last)}, so the checkpoint of step {step} may not fit; free '
            'some space (a save that fails stops the run, keeping the checkpoint before it).',
            flush=True)

  def _last_size(self) -> int:
    steps = self.steps()
    if not steps:
      return 0
    last = steps[-1]
    if last not in self.sizes:
      total = 0
      for root, _, files in os.walk(os.path.join(self.directory, str(last))):
        for f in files:
          try:
            total += os.path.getsize(os.path.join(root, f))
          except OSError:
            pass
      self.sizes[last] = total
    return self.sizes[last]

  def _failed(self, step: int | None, e: Exception):
    """One sentence for a save that failed: the path, the cause, the checkpoint still intact.
    The failed step's partial files are removed (they would only fill the disk further)."""
    self.failed_step = step
    self._remove_partial()
    try:
      self.manager.reload()
      intact = [s for s in self.steps() if s != step]
    except Exception:  # the folder may be unreadable too
      intact = []
    kept = (f'the checkpoint of step {intact[-1]} is intact and a rerun resumes from it'
            if intact else 'no earlier checkpoint exists, so a rerun starts from step 0')
    raise UserError(f'The checkpoint of step {step} could not be written into {self.directory} '
                    f'({_cause(e)}), so the run stopped; {kept} once the disk has space (or the '
                    'folder is writable again).') from None

  def restore_latest(self, abstract_state):
    """Restores the newest readable step onto the shardings in `abstract_state`.

    A step that fails to restore (a damaged file) is reported and the previous one is tried;
    returns (state, step) or (None, None) when no checkpoint exists.
    """
    self.wait()
    steps = self.steps()
    bad = []
    for step in reversed(steps):
      try:
        state = self.manager.restore(step, args=ocp.args.StandardRestore(abstract_state))
        self._set_aside(bad)
        return state, step
      except Exception as e:  # orbax raises several types for damaged or mismatched files
        if _is_shape_mismatch(e):
          raise UserError(f'The checkpoint at step {step} in {self.directory} does not fit '
                          'this model (its shapes differ); use a new --workdir.') from e
        logging.warning('checkpoint step %d could not be restored (%s: %s); '
                        'falling back to the previous one', step, type(e).__name__, e)
        print(f'warning: checkpoint step {step} is unreadable ({type(e).__name__}); '
              'falling back to the previous checkpoint.', flush=True)
        bad.append(step)
    if steps:
      raise UserError(f'No checkpoint in {self.directory} could be restored; '
                      'move that folder away to start afresh.')
    return None, None

  def _set_aside(self, steps: list[int]) -> None:
    """Moves unreadable steps to checkpoints.unreadable/ (kept for inspection, never reused).
    On a shared filesystem every process found the same steps unreadable: the first process
    moves them while the others wait for it, then all of them reread the folder."""
    if not steps:
      return
    if jax.process_index() == 0:
      aside = self.directory + '.unreadable'
      os.makedirs(aside, exist_ok=True)
      for step in steps:
        target = os.path.join(aside, str(step))
        while os.path.exists(target):
          target += '_'
        os.replace(os.path.join(self.directory, str(step)), target)
        print(f'warning: moved the unreadable checkpoint {step} to {target}', flush=True)
    if jax.process_count() > 1:
      multihost_utils.sync_global_devices('lm.training.checkpoint.set_aside')
    self.manager.reload()

  def close(self):
    """Waits for the save in flight (a failed one raises UserError) and closes the manager."""
    try:
      self.wait()
    finally:
      try:
        self.manager.close()
      except Exception:  # the failure was reported by wait(); orbax may re-raise it here
        pass
      self._remove_partial()   # again: writes still pending at the failure may have recreated it


_CAUSES = (errno.ENOSPC, errno.EDQUOT, errno.EACCES, errno.EPERM, errno.EROFS, errno.EFBIG,
           errno.EIO)


def _chain(e: BaseException):
  seen = set()
  while e is not None and id(e) not in seen:
    seen.add(id(e))
    yield e
    e = e.__cause__ or e.__context__


def _cause(e: BaseException) -> str:
  """What went wrong, in words: the OS error of an exception or of one it came from (orbax
  wraps tensorstore's, which names it as os_error_code), else the exception's first line."""
  for x in _chain(e):
    if isinstance(x, OSError) and x.errno:
      return os.strerror(x.errno)
    code = re.search(r"os_error_code='?(\d+)", str(x))
    if code:
      return os.strerror(int(code.group(1)))
  for x in _chain(e):
    for no in _CAUSES:
      if os.strerror(no).lower() in str(x).lower():
        return os.strerror(no)
  line = (str(e).strip().splitlines() or [''])[0]
  return f'{type(e).__name__}: {line[:200]}' if line else type(e).__name__


def _mb(n: float) -> str:
  return f'{n / 2**30:.1f} GiB' if n >= 2**30 else f'{n / 2**20:.1f} MiB'


class _OrbaxErrors(logging.Filter):
  """Drops orbax's own error records (a failed background save logs several tracebacks from
  its threads): Checkpoints reports a failed save itself, in one sentence."""

  def filter(self, record: logging.LogRecord) -> bool:
    return not (record.levelno >= logging.ERROR
                and f'{os.sep}orbax{os.sep}checkpoint{os.sep}' in record.pathname)



class _OrbaxTasks(logging.Filter):
  """Drops asyncio's "Task exception was never retrieved" for orbax's write tasks: after one
  write of a save fails, the others fail too and are never awaited."""

  def filter(self, record: logging.LogRecord) -> bool:
    return f'{os.sep}orbax{os.sep}checkpoint{os.sep}' not in record.getMessage()


_FILTER, _TASKS = _OrbaxErrors(), _OrbaxTasks()


def _quiet_orbax_errors() -> None:
  for name, f in (('absl', _FILTER), ('orbax', _FILTER), ('asyncio', _TASKS)):
    logger = logging.getLogger(name)
    if f not in logger.filters:
      logger.addFilter(f)


def restore_subtree(directory: str, keys: tuple[str, ...] = ('params',)):
  """(subtree, step): the part of the newest readable checkpoint in `directory` at the nested
  `keys`, on the first device, with the shapes and dtypes it was saved with, so reading a run's
  weights needs neither its model nor its optimizer. An unreadable step is reported and the one
  before it read (nothing is moved: a reader leaves the run as it is). (None, None) when the
  folder holds no step."""
  directory = os.path.abspath(directory)
  if not os.path.isdir(directory):
    return None, None
  manager = ocp.CheckpointManager(directory, item_handlers=ocp.PyTreeCheckpointHandler())
  device = jax.sharding.SingleDeviceSharding(jax.devices()[0])
  is_leaf = lambda x: hasattr(x, 'shape') and hasattr(x, 'dtype')
  try:
    steps = sorted(manager.all_steps())
    for step in reversed(steps):
      try:
        tree = manager.item_metadata(step).tree
        for k in keys:
          tree = tree[k]
        target = jax.tree.map(lambda m: jax.ShapeDtypeStruct(m.shape, m.dtype, sharding=device),
                              tree, is_leaf=is_leaf)
        args = jax.tree.map(lambda _: ocp.ArrayRestoreArgs(sharding=device), target)
        for k in reversed(keys):
          target, args = {k: target}, {k: args}
        state = manager.restore(step, args=ocp.args.PyTreeRestore(
            target, restore_args=args, partial_restore=True))
        for k in keys:
          state = state[k]
        return state, step
      except Exception as e:  # orbax raises several types for damaged files
        logging.warning('checkpoint step %d could not be read (%s: %s)', step, type(e).__name__, e)
        print(f'warning: checkpoint step {step} in {directory} is unreadable '
              f'({type(e).__name__}); reading the previous one.', flush=True)
    if steps:
      raise UserError(f'No checkpoint in {directory} could be read; train the run again.')
    return None, None
  finally:
    manager.close()


def _is_shape_mismatch(e: Exception) -> bool:
  text = str(e).lower()
  return 'shape' in text and ('mismatch' in text or 'does not match' in text
                              or 'incompatible' in text)


def abstract(state_shapes, shardings):
  """ShapeDtypeStructs carrying the target shardings (what restore lays the arrays onto)."""
  return jax.tree.map(lambda s, sh: jax.ShapeDtypeStruct(s.shape, s.dtype, sharding=sh),
                      state_shapes, shardings)


def on_one_device(state_shapes):
  """The abstract state of a run held whole on the first device (no mesh)."""
  device = jax.sharding.SingleDeviceSharding(jax.devices()[0])
  return abstract(state_shapes, jax.tree.map(lambda _: device, state_shapes))


class _ClosedLoopFilter:
  """sys.stderr without the tracebacks tensorstore prints when the writes of a failed save
  complete on orbax's already closed event loop ("RuntimeError: Event loop is closed" from
  asyncio's call_soon_threadsafe): one per pending write, dozens for one failed save, and nothing
  the one-sentence failure does not say. Everything else passes through unchanged (text outside
  a traceback at once, so progress bars still draw; a traceback when it is complete)."""

  def __init__(self, stream):
    self._stream = stream
    self._lock = threading.Lock()
    self._held = None     # the lines of a traceback being written
    self._partial = ''    # an unfinished line inside a traceback

  def write(self, text: str) -> int:
    with self._lock:
      out = []
      for piece in text.splitlines(keepends=True):
        if self._held is None and not (self._partial or piece.startswith('Traceback')):
          out.append(piece)
          continue
        line = self._partial + piece
        if not line.endswith('\n'):
          self._partial = line
          continue
        self._partial = ''
        if self._held is None:
          if line.startswith('Traceback (most recent call last):'):
            self._held = [line]
          else:
            out.append(line)
          continue
        self._held.append(line)
        if line[:1] in (' ', '\t') or line.startswith('Traceback'):
          continue
        block, self._held = ''.join(self._held), None
        if not (line.startswith('RuntimeError: Event loop is closed')
                and 'call_soon_threadsafe' in block):
          out.append(block)
      if out:
        self._stream.write(''.join(out))
    return len(text)

  def flush(self):
    self._stream.flush()

  def __getattr__(self, name):
    return getattr(self._stream, name)


def quiet_failed_save_tracebacks() -> None:
  """Filters sys.stderr (_ClosedLoopFilter) for the rest of the process: the programs call this
  (run.py, the sweep's worker), the library does not touch sys.stderr."""
  if not isinstance(sys.stderr, _ClosedLoopFilter):
    sys.stderr = _ClosedLoopFilter(sys.stderr)
