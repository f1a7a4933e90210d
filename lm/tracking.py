"""Experiment tracking in Weights & Biases, beside metrics.jsonl and TensorBoard (which stay).

`train.wandb=True` (+ `train.wandb_project`, `train.wandb_group`, `train.wandb_tags`) makes every
training loop (pretraining, fine-tuning, reward, DPO, PPO) log the rows it writes to metrics.jsonl
to a W&B run, with the resolved config and the manifest attached. The W&B run's id is derived from
the run folder, so a resumed run continues the same W&B run. A sweep sets the group to the sweep
and tags each run with its N, D and C (lm/scaling/plan.py run_config), and logs its fit (plots,
report.md, results.csv) as an artifact of the group (log_sweep_fit).

`WANDB_MODE=offline` writes the runs under the run folder's `wandb/` without any network access;
`wandb sync RUN/wandb/offline-run-*` uploads them later. wandb is an optional dependency
(requirements-eval.txt), imported only here and only when tracking is on.
"""
from __future__ import annotations

import glob
import hashlib
import math
import os

from lm.errors import UserError

INSTALL = 'pip install -r requirements-eval.txt'


def require():
  try:
    import wandb
  except ImportError:
    raise UserError('train.wandb=True needs the wandb package, which is not installed; install '
                    f'it with `{INSTALL}` (or set train.wandb=False).') from None
  return wandb


def run_id(workdir: str) -> str:
  """A stable W&B run id for a run folder: a resumed run continues the same W&B run."""
  return hashlib.sha1(os.path.abspath(workdir).encode()).hexdigest()[:16]


def tags(text) -> list[str]:
  if isinstance(text, (list, tuple)):
    return [str(t) for t in text]
  return [t.strip() for t in str(text or '').split(',') if t.strip()]


class Tracker:
  """One training run's W&B run: log(row) per metrics row, finish() at the end."""

  def __init__(self, workdir: str, config: dict, manifest: dict, project: str, group: str = '',
               tag_text: str = ''):
    wandb = require()
    self.run = wandb.init(
        project=project or 'lm', group=group or None, tags=tags(tag_text) or None,
        name=os.path.basename(os.path.abspath(workdir)), id=run_id(workdir), resume='allow',
        dir=os.path.abspath(workdir), config=dict(config, manifest=manifest),
        settings=wandb.Settings(silent=True, console='off'))

  def log(self, row: dict) -> None:
    values = {k: v for k, v in row.items() if k != 'step' and isinstance(v, (int, float))
              and not isinstance(v, bool) and math.isfinite(v)}
    self.run.log(values, step=int(row['step']))

  def finish(self) -> None:
    self.run.finish()


def maybe_tracker(tc, workdir: str, config: dict, manifest: dict, enabled: bool = True):
  """A Tracker when train.wandb is on (and this process writes the run), else None."""
  if not enabled or not tc.wandb:
    return None
  return Tracker(workdir, config, manifest, tc.wandb_project, tc.wandb_group, tc.wandb_tags)


def log_sweep_fit(base_train, workdir: str, group: str) -> None:
  """A sweep's fit (plots, report.md, results.csv, fit.json) as an artifact of its W&B group."""
  wandb = require()
  name = os.path.basename(os.path.abspath(workdir))
  run = wandb.init(project=base_train.get('wandb_project', '') or 'lm', group=group or name,
                   job_type='fit', name=f'{name}-fit', id=run_id(workdir) + 'fit',
                   resume='allow', dir=os.path.abspath(workdir),
                   settings=wandb.Settings(silent=True, console='off'))
  artifact = wandb.Artifact(f'{name}-fit', type='sweep-fit')
  for path in sorted(glob.glob(os.path.join(workdir, '*.png'))) + [
      os.path.join(workdir, f) for f in ('report.md', 'results.csv', 'fit.json')]:
    if os.path.exists(path):
      artifact.add_file(path)
  run.log_artifact(artifact)
  images = {os.path.basename(p)[:-4]: wandb.Image(p)
            for p in sorted(glob.glob(os.path.join(workdir, '*.png')))}
  if images:
    run.log(images)
  run.finish()
