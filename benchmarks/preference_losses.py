"""DPO, IPO and SimPO on the same pairs from the same SFT run.

  python -m benchmarks.preference_losses --sft=RUN --pairs=PAIRS.jsonl --rm=RM_RUN --out=DIR \
      [--steps=250] [--set=dpo.eval_prompts=100 ...]

Trains lm.align.dpo.train_dpo three times, with configs/dpo.py's defaults, train.steps=--steps
and dpo.loss = dpo, ipo and simpo (each loss's own keys at their defaults: beta 0.1 for DPO and
IPO, simpo_beta 2.0 and simpo_gamma 1.0 for SimPO), into DIR/dpo, DIR/ipo and DIR/simpo; the
reward-model run (--rm) scores the evaluation samples (eval_proxy). train.warmup_steps is capped
at a tenth of the steps (the default 20 stands from 200 steps on). --set=KEY=VALUE overrides a
key of the config in all three runs (e.g. a smaller evaluation for a smoke run).

Then DIR/table.md and DIR/result.json hold each run's final evaluation (gold reward, KL to the
SFT model and the reward model's score of its samples on held-out prompts) and its wall time.
Resume-safe: a finished run is reused as it is and an interrupted one resumes from its last
checkpoint. The wall time adds up the calls of this script that trained the run (DIR/walls.json;
the time of a call that was killed is lost); the first run's includes the compilations that the
later ones reuse (sampling, evaluation), so compare wall times of long runs only.
"""
import ast
import os
import time

from absl import app
from absl import flags
from absl import logging

FLAGS = flags.FLAGS
flags.DEFINE_string('sft', None, 'The SFT run every loss starts from (its reference).')
flags.DEFINE_string('pairs', None, 'JSONL of {"prompt", "chosen", "rejected"} pairs.')
flags.DEFINE_string('rm', None, 'A reward-model run: its score of the samples is logged.')
flags.DEFINE_string('out', 'runs/preference_losses', 'Output folder.')
flags.DEFINE_integer('steps', 250, 'Training steps of each run.')
flags.DEFINE_multi_string('set', [], 'KEY=VALUE config overrides for all three runs.')

LOSSES = ('dpo', 'ipo', 'simpo')
WALLS = 'walls.json'


def _value(text: str):
  try:
    return ast.literal_eval(text)
  except (ValueError, SyntaxError):
    return text


def run_config(loss: str, sft: str, pairs: str, rm: str, steps: int, overrides: list[str]):
  """configs/dpo.py with the benchmark's settings and the overrides (KEY=VALUE, dotted keys)."""
  from configs import dpo as dpo_cfg
  c = dpo_cfg.get_config()
  c.train.steps = steps
  c.train.warmup_steps = min(c.train.warmup_steps, steps // 10)
  c.dpo.init_from, c.dpo.pairs, c.dpo.reward_from, c.dpo.loss = sft, pairs, rm, loss
  for item in overrides:
    key, sep, text = item.partition('=')
    *path, last = key.split('.')
    section = c
    for p in path:
      section = section[p]
    if not sep or last not in section:
      raise app.UsageError(f'--set={item} names no key of configs/dpo.py; use --set=SECTION.KEY='
                           'VALUE, e.g. --set=dpo.eval_prompts=100.')
    section[last] = _value(text)
  return c


def final_row(loss: str, workdir: str, summary: dict, wall_s: float) -> dict:
  after = summary['dpo'].get('after', {})
  return {'loss': loss, 'workdir': os.path.abspath(workdir), 'steps': summary['steps'],
          'eval_gold': after.get('eval_gold'), 'eval_kl': after.get('eval_kl'),
          'eval_proxy': after.get('eval_proxy'), 'wall_s': wall_s,
          'train_pairs': summary['dpo']['train_pairs']}


def table(rows: list[dict]) -> str:
  fmt = lambda x, spec: '–' if x is None else format(x, spec)
  lines = ['| loss | steps | gold reward | KL to SFT (nats) | proxy (RM) | wall (min) |',
           '|---|---|---|---|---|---|']
  for r in rows:
    lines.append(f"| {r['loss']} | {r['steps']} | {fmt(r['eval_gold'], '.3f')} | "
                 f"{fmt(r['eval_kl'], '.2f')} | {fmt(r['eval_proxy'], '.2f')} | "
                 f"{r['wall_s'] / 60:.1f} |")
  return '\n'.join(lines) + '\n'


def run(sft: str, pairs: str, rm: str, out: str, steps: int, overrides: list[str]) -> dict:
  """Trains (or reuses) the three runs and writes table.md and result.json; returns the result."""
  from lm import metrics as metrics_lib
  from lm.align import dpo
  os.makedirs(out, exist_ok=True)
  walls_path = os.path.join(out, WALLS)
  walls = (metrics_lib.read_json_object(walls_path, 'delete it to count the wall times afresh')
           if os.path.exists(walls_path) else {})
  rows = []
  for loss in LOSSES:
    workdir = os.path.join(out, loss)
    cfg = run_config(loss, sft, pairs, rm, steps, overrides)
    finished = os.path.exists(os.path.join(workdir, 'summary.json'))
    t0 = time.time()
    summary = dpo.train_dpo(cfg, workdir)
    if not finished:
      walls[loss] = walls.get(loss, 0.0) + time.time() - t0
      metrics_lib.write_json_atomic(walls_path, walls)
    rows.append(final_row(loss, workdir, summary, walls.get(loss, 0.0)))
  result = {'sft': os.path.abspath(sft), 'pairs': os.path.abspath(pairs),
            'reward_model': os.path.abspath(rm), 'steps': steps, 'overrides': list(overrides),
            'runs': {r['loss']: r for r in rows}}
  text = table(rows)
  metrics_lib.write_text_atomic(os.path.join(out, 'table.md'), text)
  metrics_lib.write_json_atomic(os.path.join(out, 'result.json'), result)
  print(text, end='')
  return result


def main(argv):
  del argv
  logging.set_verbosity(logging.WARNING)   # orbax's INFO lines would bury the runs' progress
  for name in ('sft', 'pairs', 'rm'):
    if not getattr(FLAGS, name):
      raise app.UsageError(f'--{name} is required.')
  from lm.errors import UserError
  try:
    run(FLAGS.sft, FLAGS.pairs, FLAGS.rm, FLAGS.out, FLAGS.steps, FLAGS.set)
  except UserError as e:
    raise SystemExit(f'error: {e}') from None


if __name__ == '__main__':
  app.run(main)
