"""Orbax checkpoints of the train state: atomic, keep-N, sharded, restorable onto any mesh.

The state is {'params', 'opt_state', 'step'}; the batch stream is a pure function of the step,
so the step is the whole data position. Orbax writes each step into a temporary folder and
renames it when complete, so a kill mid-save leaves no step that looks finished.

Training saves asynchronously (train.async_checkpoint): `save` returns once the arrays are
copied off the devices, and the files are written by a background thread while the next steps
train. A new save, a restore and `close` first wait for the one in flight.
"""
import logging
import os

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
    self.manager = ocp.CheckpointManager(self.directory, options=options)

  def steps(self) -> list[int]:
    return sorted(self.manager.all_steps())

  def save(self, step: int, state) -> None:
    """Writes `step`; asynchronously, this returns while its files are still being written."""
    self.manager.save(step, args=ocp.args.StandardSave(state), force=True)

  def wait(self) -> None:
    """Blocks until the save in flight (if any) is complete on disk."""
    self.manager.wait_until_finished()

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
    self.manager.close()


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
