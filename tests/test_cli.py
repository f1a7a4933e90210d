"""run.py: bad input gets one sentence and a non-zero exit, before anything is written."""
import os
import subprocess
import sys

import pytest

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def run(*args):
  out = subprocess.run([sys.executable, 'run.py', *args], cwd=REPO, capture_output=True,
                       text=True, timeout=120)
  return out.returncode, out.stderr.strip().splitlines()


@pytest.mark.parametrize('args,needle', [
    (['--config.train.nope=1'], '--config.train.nope is not a config key'),
    (['--config.model.n_layer=3'], "did you mean 'n_layers'"),
    (['--config.train.steps=abc'], "invalid literal for int() with base 10: 'abc'"),
    (['--config.train.steps=0'], 'train.steps=0 must be a positive integer.'),
    (['--config.model.pos=xpos'], "model.pos='xpos' is not known"),
])
def test_bad_train_flags(tmp_path, args, needle):
  workdir = tmp_path / 'run'
  code, err = run('train', '--config=configs/tiny.py', f'--workdir={workdir}', *args)
  assert code == 2
  assert needle in err[-1] and len(err[-1].split('. ')) <= 3
  assert not workdir.exists() or not any(workdir.iterdir())


def test_other_bad_commands(tmp_path):
  code, err = run('bogus')
  assert code != 0 and 'unknown subcommand' in '\n'.join(err)
  code, err = run('sample', f'--workdir={tmp_path}', '--prompt=hi')
  assert code == 2 and 'train first' in err[-1]
  code, err = run('fit', f'--results={tmp_path}/none.csv', f'--workdir={tmp_path}/fit')
  assert code == 2 and 'does not exist' in err[-1]
  code, err = run('sweep', '--config=configs/tiny.py', f'--workdir={tmp_path}/sw')
  assert code == 2 and 'not a sweep config' in err[-1]
  # Budgets are a tuple, so they can be overridden on the command line; parallel is checked first.
  code, err = run('sweep', '--config=configs/sweep_smoke.py', '--config.sweep.budgets=(1e9, 2e9)',
                  '--config.sweep.parallel=-1', f'--workdir={tmp_path}/sw2')
  assert code == 2 and 'sweep.parallel=-1 must be 0 (as many runs at once' in err[-1]
  assert not os.path.exists(f'{tmp_path}/sw2')
  code, err = run('sweep', '--config=configs/sweep_smoke.py', '--config.sweep.budgets=(-1.0,)',
                  f'--workdir={tmp_path}/sw3')
  assert code == 2 and 'sweep.budgets=(-1.0,) must be a non-empty tuple of positive' in err[-1]
  assert not os.path.exists(f'{tmp_path}/sw3')
  # A missing or broken config file: one sentence naming it, for any subcommand.
  code, err = run('train', '--config=configs/no_such_file.py', f'--workdir={tmp_path}/t')
  assert code == 2 and err == ['error: the config file configs/no_such_file.py does not exist; '
                               'name one of configs/*.py, e.g. --config=configs/tiny.py.']
  broken = tmp_path / 'broken.py'
  broken.write_text('import no_such_module\n')
  code, err = run('sweep', f'--config={broken}', f'--workdir={tmp_path}/sw4')
  assert code == 2 and len(err) == 1 and "No module named 'no_such_module'" in err[0]
  assert not os.path.exists(f'{tmp_path}/t') and not os.path.exists(f'{tmp_path}/sw4')


def test_bad_preference_stage_commands(tmp_path):
  code, err = run('ppo', '--config=configs/ppo.py', f'--workdir={tmp_path}/ppo',
                  '--config.ppo.init_from=x', '--config.ppo.reward_from=y',
                  '--config.ppo.kl_coef=-0.5')
  assert code == 2 and 'ppo.kl_coef=-0.5 must be >= 0' in err[-1]
  code, err = run('ppo', '--config=configs/ppo.py', f'--workdir={tmp_path}/ppo',
                  '--config.ppo.init_from=x', '--config.ppo.reward_from=y',
                  '--config.train.batch_size=30')
  assert code == 2 and 'not divisible by ppo.minibatch=16' in err[-1]
  code, err = run('dpo', '--config=configs/dpo.py', f'--workdir={tmp_path}/dpo',
                  f'--config.dpo.init_from={tmp_path}/nothing', '--config.dpo.pairs=p.jsonl')
  assert code == 2 and 'has no config.json' in err[-1]
  code, err = run('reward', '--config=configs/ppo.py', f'--workdir={tmp_path}/rm')
  assert code == 2 and 'no `reward` section' in err[-1]
  assert not any(os.path.exists(f'{tmp_path}/{d}') for d in ('ppo', 'dpo', 'rm'))
