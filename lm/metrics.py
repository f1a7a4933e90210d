"""Metrics: metrics.jsonl (the source of truth), TensorBoard event files, and terminal progress."""
import json
import math
import os
import sys
import time

from lm.errors import UserError


def read_json_object(path: str, fix: str) -> dict:
  """A JSON object from a file the project wrote; an unreadable or damaged one is refused in one
  sentence naming the file and `fix` (what the user can do about it)."""
  try:
    with open(path) as f:
      obj = json.load(f)
  except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
    raise UserError(f'{path} cannot be read ({type(e).__name__}); {fix}.') from None
  if not isinstance(obj, dict):
    raise UserError(f'{path} does not hold a JSON object; {fix}.')
  return obj


def read_jsonl(path: str) -> list[dict]:
  if not os.path.exists(path):
    return []
  rows = []
  # A damaged byte is read as U+FFFD instead of raising UnicodeDecodeError (a line it leaves
  # unparsable ends the rows, as a torn last line does).
  with open(path, encoding='utf-8', errors='replace') as f:
    for line in f:
      line = line.strip()
      if line:
        try:
          rows.append(json.loads(line))
        except json.JSONDecodeError:
          break  # a torn last line from a kill mid-write; later rows cannot exist
  return rows


def write_text_atomic(path, text: str) -> None:
  """Text through a temporary file, fsync and a rename: a reader never sees half a file."""
  path = str(path)
  tmp = f'{path}.tmp{os.getpid()}'
  try:
    with open(tmp, 'w') as f:
      f.write(text)
      f.flush()
      os.fsync(f.fileno())
    os.replace(tmp, path)
  except BaseException:
    if os.path.exists(tmp):
      os.unlink(tmp)
    raise


def write_json_atomic(path, obj) -> None:
  """JSON, written atomically (write_text_atomic). NaN and infinity are refused (they are not
  JSON); callers store them as null."""
  write_text_atomic(path, json.dumps(obj, indent=2, sort_keys=True, allow_nan=False) + '\n')


def _finite(v):
  return v if not isinstance(v, float) or math.isfinite(v) else str(v)


class MetricsWriter:
  """Appends one JSON object per logged step; mirrors scalars to TensorBoard."""

  def __init__(self, workdir: str, resume_step: int, enabled: bool = True, tracker=None):
    self.enabled = enabled
    self.tracker = tracker   # lm.tracking.Tracker (W&B) or None
    self.path = os.path.join(workdir, 'metrics.jsonl')
    self.tb = None
    if not enabled:
      return
    # Rows past the restored step were written by the interrupted run and are recomputed
    # exactly, so they are dropped (atomically) rather than duplicated.
    rows = [r for r in read_jsonl(self.path) if r.get('step', 0) <= resume_step]
    tmp = self.path + '.tmp'
    with open(tmp, 'w') as f:
      for r in rows:
        f.write(json.dumps(r) + '\n')
    os.replace(tmp, self.path)
    self.file = open(self.path, 'a')
    from tensorboardX import SummaryWriter  # here: lm.metrics is also imported by the fits
    self.tb = SummaryWriter(os.path.join(workdir, 'tensorboard'))

  def write(self, row: dict) -> None:
    if not self.enabled:
      return
    self.file.write(json.dumps({k: _finite(v) for k, v in row.items()}) + '\n')
    self.file.flush()
    for k, v in row.items():
      if k != 'step' and isinstance(v, (int, float)) and math.isfinite(v):
        self.tb.add_scalar(k, v, row['step'])
    if self.tracker is not None:
      self.tracker.log(row)

  def close(self):
    if self.enabled:
      self.file.close()
      self.tb.close()
    if self.tracker is not None:
      self.tracker.finish()
      self.tracker = None


class Progress:
  """A tqdm bar on a terminal, plain log lines otherwise (or nothing)."""

  def __init__(self, total: int, start: int, mode: str, enabled: bool = True):
    if mode == 'auto':
      mode = 'bar' if sys.stderr.isatty() else 'log'
    self.mode = mode if enabled else 'none'
    self.total, self.start, self.t0 = total, start, time.time()
    self.bar = None
    if self.mode == 'bar':
      from tqdm import tqdm
      self.bar = tqdm(total=total, initial=start, unit='step', dynamic_ncols=True)

  def update(self, step: int, row: dict) -> None:
    text = f"loss {row['loss_avg']:.4f}  {row['tokens_per_s']:,.0f} tok/s"
    if row.get('mfu'):
      text += f"  MFU {100 * row['mfu']:.1f}%"
    if self.mode == 'bar':
      self.bar.n = step
      self.bar.set_postfix_str(text, refresh=True)
    elif self.mode == 'log':
      done = step - self.start
      eta = (time.time() - self.t0) / max(done, 1) * (self.total - step)
      print(f'step {step}/{self.total}  {text}  eta {eta:,.0f}s', flush=True)

  def message(self, text: str) -> None:
    if self.mode == 'bar':
      self.bar.write(text)
    elif self.mode == 'log':
      print(text, flush=True)

  def close(self):
    if self.bar is not None:
      self.bar.close()
