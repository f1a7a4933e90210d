"""Replay: rows of a base run's pretraining corpus mixed into the batches of a later stage.

Fine-tuning on chat examples alone moves a model away from the text it was pretrained on: the
pretraining corpus's validation loss rises, sometimes above the uniform guess. Mixing some rows of
the pretraining corpus into every batch ("replay", as in the mid-training and SFT mixtures of
nanochat and most published recipes) keeps that text likely while the chat examples are learned.

A replay row is an ordinary pretraining window of seq_len + 1 tokens of the base corpus's training
split (the same token files and tokenizer the base run trained on), laid out like a packed
fine-tuning row: one segment, positions 0 .. seq_len - 1 and the loss on every token. The rows of
step s are `Dataset.batch('train', s, ...)` under their own seed, so they are a pure function of
the step and a resumed run sees exactly the rows an uninterrupted one would.

`split(batch_size, fraction)` decides how many of a step's rows are replay rows; the rest come
from the stage's own stream.
"""
from __future__ import annotations

import numpy as np

from lm.errors import UserError

SEED_SALT = 0x5E9    # replay windows are ordered apart from the base run's own training order


def split(batch_size: int, fraction: float, what: str = 'finetune.replay_fraction',
          process_count: int = 1) -> int:
  """The replay rows of a batch of batch_size rows: round(fraction * batch_size), refused when it
  leaves no row of either kind (for fraction > 0) or does not divide over the processes."""
  if not 0 <= fraction < 1:
    raise UserError(f'{what}={fraction} must be in [0, 1): the share of each batch\'s rows taken '
                    'from the pretraining corpus (0 switches replay off).')
  n = int(round(fraction * batch_size))
  if fraction > 0 and not 1 <= n < batch_size:
    raise UserError(f'{what}={fraction} of train.batch_size={batch_size} gives {n} replay rows; '
                    'choose a share that leaves at least one row of each kind, or a larger '
                    'batch.')
  if n % process_count or (batch_size - n) % process_count:
    raise UserError(f'{what}={fraction} gives {n} replay and {batch_size - n} other rows per '
                    f'batch, which do not divide over {process_count} processes; choose a share '
                    'whose row counts do.')
  return n


class Replay:
  """Packed-layout rows of a pretraining corpus (lm/data/tokens.py Dataset), by step."""

  def __init__(self, dataset, rows_per_step: int, seq_len: int, seed: int):
    self.dataset, self.rows_per_step, self.seq_len = dataset, rows_per_step, seq_len
    self.seed = int(seed) * 7919 + SEED_SALT
    windows = dataset.n_windows('train', seq_len)
    if windows < max(rows_per_step, 1):
      raise UserError(f'the pretraining corpus {dataset.path} has {windows} training windows of '
                      f'{seq_len + 1} tokens, fewer than the {rows_per_step} replay rows a step '
                      'needs; lower the replay share or train.seq_len.')

  def windows(self, step: int, process_index: int = 0, process_count: int = 1) -> np.ndarray:
    """int32 [rows_per_step // process_count, seq_len + 1]: this process's windows of `step`."""
    return self.dataset.batch('train', step, self.rows_per_step, self.seq_len, self.seed,
                              process_index, process_count)

  def rows(self, step: int, process_index: int = 0, process_count: int = 1) -> dict:
    """The windows of `step` as packed rows: tokens, targets, weights (all 1), segments (all 1),
    positions."""
    w = self.windows(step, process_index, process_count)
    n, T = w.shape[0], self.seq_len
    return {'tokens': w[:, :-1], 'targets': w[:, 1:], 'weights': np.ones((n, T), np.float32),
            'segments': np.ones((n, T), np.int32),
            'positions': np.broadcast_to(np.arange(T, dtype=np.int32), (n, T)).copy()}

  def info(self) -> dict:
    return {'corpus': self.dataset.path, 'rows_per_step': self.rows_per_step,
            'train_windows': self.dataset.n_windows('train', self.seq_len)}


def mix(own: dict, replay: dict) -> dict:
  """A batch of the stage's own rows followed by the replay rows, with 'replay' marking the
  replay rows' tokens (1.0) so the loss can report each part."""
  out = {k: np.concatenate([own[k], replay[k]]) for k in own}
  out['replay'] = np.concatenate([np.zeros(own['weights'].shape, np.float32),
                                  np.ones(replay['weights'].shape, np.float32)])
  return out
