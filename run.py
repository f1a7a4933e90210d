"""lm: one program, several subcommands.

  python run.py [--minutes=10]       the default scaling sweep (configs/sweep_smoke.py), sized
                                     to take about that many minutes on this machine
  python run.py train  --config=configs/tiny.py --workdir=DIR [--config.KEY=VALUE ...]
  python run.py sweep  --config=configs/sweep_smoke.py --workdir=DIR [--minutes=M]
  python run.py fit    --results=FILE.csv --workdir=OUT
  python run.py plot   --workdir=SWEEP_OR_FIT_DIR
  python run.py sample --workdir=DIR --prompt="..." [--max_new_tokens=N --temperature=T ...]
  python run.py pipeline --config=configs/pipeline.py --workdir=DIR     (pretrain to DPO, report card)
  python run.py chat   --workdir=RUN [--prompt="..." --temperature=T ...]   (a fine-tuned run)
  python run.py serve  --workdir=RUN [--port=8000 --host=127.0.0.1 --api_key=KEY]  (OpenAI API,
                                     chat page at /; needs requirements-serve.txt)
  python run.py finetune --config=configs/sft.py --workdir=DIR --config.finetune.init_from=RUN
  python run.py merge  --workdir=LORA_RUN --out=DIR
  python run.py reward --config=configs/reward.py --workdir=DIR --config.reward.init_from=SFT_RUN
  python run.py dpo    --config=configs/dpo.py --workdir=DIR --config.dpo.init_from=SFT_RUN
  python run.py ppo    --config=configs/ppo.py --workdir=DIR --config.ppo.init_from=SFT_RUN
  python run.py grpo   --config=configs/grpo.py --workdir=DIR --config.grpo.init_from=SFT_RUN
  python run.py eval   --workdir=RUN [--config=configs/eval.py --config.eval.KEY=VALUE ...]
  python run.py export --workdir=RUN --out=HF_DIR [--overwrite]        (GPT-2 or Llama folder)
  python run.py import --hf=HF_DIR --workdir=DIR [--overwrite --add_chat_tokens]

Exit status: 0 done; 2 refused (one sentence on stderr: bad input, a damaged file, a folder in use
by another process, a failed checkpoint save, a diverged run); 3 stopped by SIGTERM before the
work finished (checkpoints saved: rerunning the same command resumes); 130 interrupted by Ctrl-C
(the checkpoints saved so far are kept); 1 anything else (a traceback). So
`run.py train ... && run.py finetune ...` goes on only from a finished run.
"""
import os
import re
import sys

from absl import app, flags, logging
from ml_collections import config_flags

from lm import cli
from lm.errors import STOPPED_EXIT, UserError, signal_stops
from lm.training.checkpoint import quiet_failed_save_tracebacks

SUBCOMMANDS = ('train', 'sweep', 'fit', 'plot', 'sample', 'finetune', 'merge', 'reward', 'dpo',
               'ppo', 'grpo', 'export', 'import', 'eval', 'chat', 'pipeline', 'serve')

config_flags.DEFINE_config_file('config', None, 'An ml-collections config file (configs/*.py).',
                                lock_config=True)
flags.DEFINE_string('workdir', None, 'Run folder: config, manifest, metrics, checkpoints, plots.')
flags.DEFINE_string('results', None, 'fit: a CSV with columns params, tokens, loss [, flops].')
flags.DEFINE_string('loss_key', None, 'fit: the loss column (default: loss, else eval_loss).')
flags.DEFINE_enum('params_key', 'params', ['params', 'params_nonembed'],
                  'fit: the parameter count convention (all parameters or non-embedding).')
flags.DEFINE_string('flops_key', None, 'fit: the FLOP column (default: flops, else 6*N*D).')
flags.DEFINE_float('minutes', None, 'sweep (and the default job, where it is 10): choose the '
                  'FLOP budgets so that the sweep takes about this many minutes on this machine, '
                  'from a few seconds of measured training throughput (IsoFLOP modes only); '
                  'without it a sweep trains its config\'s budgets.')
flags.DEFINE_integer('bootstrap', 100, 'fit: bootstrap resamples for confidence intervals.')
flags.DEFINE_string('prompt', '', 'sample: the text to continue; chat: one message to answer '
                    '(without it, chat is interactive).')
flags.DEFINE_integer('max_new_tokens', 200, 'sample: tokens to generate.')
flags.DEFINE_float('temperature', 0.8, 'sample: softmax temperature; 0 is greedy.')
flags.DEFINE_integer('top_k', 0, 'sample: keep the k most likely tokens (0 keeps all).')
flags.DEFINE_float('top_p', 1.0, 'sample: nucleus mass in (0, 1] (1 keeps all).')
flags.DEFINE_integer('seed', 0, 'sample: random seed.')
flags.DEFINE_integer('num_samples', 1, 'sample: continuations per prompt.')
flags.DEFINE_bool('raw', False, 'sample: continue the prompt as raw text, even from a fine-tuned '
                  'run (which otherwise gets the chat template).')
flags.DEFINE_string('system', '', 'sample: a system message for the chat template.')
flags.DEFINE_string('out', None, 'merge, export: the folder to write the model into.')
flags.DEFINE_string('hf', None, 'import: a Hugging Face model folder (config.json, safetensors, '
                    'tokenizer.json).')
flags.DEFINE_bool('overwrite', False, 'export, import: replace a non-empty output folder.')
flags.DEFINE_bool('add_chat_tokens', False, 'import: add the chat tokens to a tokenizer that '
                  'lacks them (the embedding grows by their rows), for fine-tuning with the chat '
                  'template.')
flags.DEFINE_string('host', '127.0.0.1', 'serve: the address to listen on (0.0.0.0 exposes the '
                    'server to other machines).')
flags.DEFINE_integer('port', 8000, 'serve: the port to listen on.')
flags.DEFINE_string('api_key', '', 'serve: a key every /v1 request must send as "Authorization: '
                    'Bearer KEY" (or set LM_API_KEY); empty: none.')
flags.DEFINE_integer('slots', 32, 'serve: sequences decoded together (rows of the KV cache).')
flags.DEFINE_string('model_name', '', "serve: the model's name in the API (default: the run "
                    "folder's name).")
flags.DEFINE_integer('max_shard_mb', 2048, 'export: safetensors files above this size are '
                     'split into shards with an index.')


def main(argv):
  logging.set_verbosity(logging.WARNING)  # library INFO chatter (orbax) hides the progress lines
  quiet_failed_save_tracebacks()   # a failed save is one sentence, not a traceback per write
  command = argv[1] if len(argv) > 1 else 'default'
  if command not in SUBCOMMANDS + ('default',) or len(argv) > 2:
    raise app.UsageError(f'unknown subcommand {" ".join(argv[1:])!r}; '
                         f'use one of: {", ".join(SUBCOMMANDS)}')
  try:
    getattr(cli, 'import_' if command == 'import' else command)(flags.FLAGS)
  except UserError as e:
    print(f'error: {e}', file=sys.stderr)
    sys.exit(2)
  except KeyboardInterrupt:   # Ctrl-C: what is on disk stays (checkpoints are atomic)
    print('interrupted (Ctrl-C); the checkpoints saved so far are kept and rerunning the same '
          'command resumes from the newest (SIGTERM instead saves one first).', file=sys.stderr)
    sys.exit(130)
  stopped = signal_stops()
  if stopped:   # the command returned its partial work: it did not finish
    print(f'stopped by SIGTERM before finishing ({stopped[-1]}); the checkpoints are saved and '
          f'rerunning the same command resumes (exit status {STOPPED_EXIT}).', file=sys.stderr)
    sys.exit(STOPPED_EXIT)


def _config_path(argv):
  """The file named by --config=FILE (or --config FILE), without config_flags' ':args' suffix."""
  for i, a in enumerate(argv[1:], 1):
    if a.startswith('--config='):
      return a.split('=', 1)[1].split(':')[0]
    if a == '--config' and i + 1 < len(argv):
      return argv[i + 1].split(':')[0]
  return None


def parse_flags(argv):
  """absl parsing, with a missing or broken config file and an unknown --config.KEY each named in
  one sentence instead of a traceback."""
  path = _config_path(argv)
  if path is not None and not os.path.isfile(path):
    print(f'error: the config file {path} does not exist; name one of configs/*.py, e.g. '
          '--config=configs/tiny.py.', file=sys.stderr)
    sys.exit(2)
  try:
    return flags.FLAGS(argv)
  except (AttributeError, KeyError) as e:
    text = str(e).replace('\\n', ' ').replace('\\', '')
    name = re.search(r"'([^']+)'", text)
    name = name.group(1) if name else text
    bad = [a.split('=')[0] for a in argv[1:] if a.startswith('--config.')]
    flag = next((b for b in bad if b.split('.')[-1] == name), '--config.' + name)
    hint = re.search(r'Did you mean "([^"]+)"', text)
    print(f'error: {flag} is not a config key; '
          + (f'did you mean {hint.group(1)!r}? ' if hint else '')
          + 'configs/base.py lists the keys.', file=sys.stderr)
    sys.exit(2)
  except flags.Error as e:
    print(f'error: {e}', file=sys.stderr)
    sys.exit(2)
  except Exception as e:   # the config file itself failed to load (a syntax or import error ...)
    if path is None:
      raise
    cause = e.__cause__ or e
    detail = str(cause).strip().splitlines()[-1] if str(cause).strip() else ''
    print(f'error: the config file {path} could not be loaded ({type(cause).__name__}'
          + (f': {detail}' if detail else '') + '); fix it or name another config file.',
          file=sys.stderr)
    sys.exit(2)


if __name__ == '__main__':
  app.run(main, flags_parser=parse_flags)
