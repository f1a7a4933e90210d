"""The subcommands behind run.py; each takes the parsed absl FLAGS."""
import os

from lm.errors import UserError


def _need(value, flag: str, example: str):
  if not value:
    raise UserError(f'--{flag} is required, e.g. {example}.')
  return value


def train(FLAGS):
  from lm import train as train_lib
  cfg = _need(FLAGS.config, 'config', '--config=configs/tiny.py')
  workdir = _need(FLAGS.workdir, 'workdir', '--workdir=runs/tiny')
  summary = train_lib.train(cfg, workdir)
  if summary.get('finished'):
    ev = summary.get('eval_loss')
    print(f"done: {summary['steps']} steps, train loss {summary['final_loss']:.4f}"
          + (f', eval loss {ev:.4f}' if ev is not None else '') + f'; outputs in {workdir}')


def sample(FLAGS):
  from lm import sample as sample_lib
  sample_lib.sample_cli(_need(FLAGS.workdir, 'workdir', '--workdir=runs/tiny'), FLAGS.prompt,
                        FLAGS.max_new_tokens, FLAGS.temperature, FLAGS.top_k, FLAGS.top_p,
                        FLAGS.seed, FLAGS.num_samples)
