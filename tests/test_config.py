"""Config sections: one parser for all of them, and a key a stage would ignore refused by name."""
import os
import subprocess
import sys

import ml_collections
import pytest

from configs import base, dpo, ppo, reward, sft, sweep_smoke
from configs import eval as eval_cfg
from configs import pipeline as pipeline_cfg
from lm.align.dpo import DpoConfig
from lm.align.ppo import PpoConfig
from lm.align.reward import RewardConfig
from lm.config import ModelConfig
from lm.data.tokens import DataConfig
from lm.eval.evaluate import EvalConfig
from lm.errors import UserError
from lm.model.sharding import MeshConfig
from lm.pipeline import PipelineConfig
from lm.scaling import plan as plan_lib
from lm.stages.finetune import FinetuneConfig
from lm.training.optim import UNUSED_KEYS, TrainConfig

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
STAGE_CONFIGS = {'pretrain': base, 'finetune': sft, 'reward': reward, 'dpo': dpo, 'ppo': ppo}
# A value other than the default for every key some stage ignores.
OTHER = {'eval_tasks': 'arith', 'eval_tasks_every': 5, 'eval_task_examples': 7, 'eval_shots': 1,
         'eval_batches': 3, 'grad_accum': 2, 'micro_batch_tokens': 256, 'z_loss': 1e-4}


@pytest.mark.parametrize('stage', sorted(STAGE_CONFIGS))
def test_each_stage_refuses_the_train_keys_it_ignores(stage):
  section = dict(STAGE_CONFIGS[stage].get_config().train)
  TrainConfig.from_config(section, stage)   # the stage's own config reads cleanly
  for key in OTHER:
    changed = dict(section, **{key: OTHER[key]})
    if key in UNUSED_KEYS[stage]:
      with pytest.raises(UserError, match=rf'train\.{key}=.* has no effect in a {stage} run'):
        TrainConfig.from_config(changed, stage)
    else:   # honoured: read as given
      assert getattr(TrainConfig.from_config(changed, stage), key) == OTHER[key]


def test_what_each_stage_ignores():
  assert UNUSED_KEYS['pretrain'] == {}
  assert set(UNUSED_KEYS['finetune']) == {'eval_tasks', 'eval_tasks_every', 'eval_task_examples',
                                          'eval_shots', 'eval_harness', 'eval_harness_limit',
                                          'eval_harness_include', 'z_loss'}
  assert set(UNUSED_KEYS['dpo']) == set(UNUSED_KEYS['reward']) == (
      set(UNUSED_KEYS['finetune']) | {'eval_batches'})
  assert set(UNUSED_KEYS['ppo']) == set(UNUSED_KEYS['dpo']) | {'grad_accum', 'micro_batch_tokens'}


def _sections():
  c = {name: mod.get_config() for name, mod in STAGE_CONFIGS.items()}
  return [
      ('train', lambda s: TrainConfig.from_config(s), c['pretrain'].train),
      ('mesh', MeshConfig.from_config, c['pretrain'].mesh),
      ('data', DataConfig.from_config, c['pretrain'].data),
      ('model', lambda s: ModelConfig.from_config(s, 259), c['pretrain'].model),
      ('reward', RewardConfig.from_config, dict(c['reward'].reward, init_from='runs/x')),
      ('dpo', DpoConfig.from_config, dict(c['dpo'].dpo, init_from='runs/x')),
      ('ppo', lambda s: PpoConfig.from_config(s, 64),
       dict(c['ppo'].ppo, init_from='runs/x', reward_from='runs/rm')),
      ('eval', EvalConfig.from_config, eval_cfg.get_config().eval),
      ('pipeline', PipelineConfig.from_config, pipeline_cfg.get_config().pipeline),
      ('sweep', lambda s: plan_lib.validate(ml_collections.ConfigDict(s)),
       sweep_smoke.get_config().sweep),
  ]


@pytest.mark.parametrize('name,parse,section', _sections(), ids=lambda x: x if isinstance(x, str)
                         else '')
def test_every_section_refuses_an_unknown_key_and_a_wrong_type(name, parse, section):
  section = dict(section)
  parse(section)
  with pytest.raises(UserError, match=rf'{name}\.nope is not a {name} option'):
    parse(dict(section, nope=1))
  key = next(k for k, v in section.items() if isinstance(v, int) and not isinstance(v, bool))
  with pytest.raises(UserError, match=rf'{name}\.{key}=.* must be a'):
    parse(dict(section, **{key: 'three'}))


def test_finetune_and_lora_sections_are_read_apart():
  c = sft.get_config()
  c.finetune.init_from = 'runs/x'
  fc = FinetuneConfig.from_config(c)
  assert fc.lora_rank == c.lora.rank and fc.families == tuple(c.finetune.families.split(','))
  with c.unlocked():
    c.lora.nope = 1
  with pytest.raises(UserError, match=r'lora\.nope is not a lora option'):
    FinetuneConfig.from_config(c)


def test_the_command_refuses_an_ignored_key_before_writing(tmp_path):
  """Through run.py: one sentence, a non-zero exit, no run folder made."""
  out = tmp_path / 'ppo'
  p = subprocess.run([sys.executable, 'run.py', 'ppo', '--config=configs/ppo.py',
                      '--config.ppo.init_from=runs/none', '--config.ppo.reward_from=runs/none',
                      '--config.train.grad_accum=2', f'--workdir={out}'],
                     cwd=ROOT, capture_output=True, text=True, timeout=300)
  assert p.returncode == 2, p.stderr[-2000:]   # run.py: exit 2 for a refused input
  assert 'train.grad_accum=2 has no effect in a ppo run' in p.stderr
  assert 'Traceback' not in p.stderr and not out.exists()


def test_a_damaged_config_json_is_refused_in_one_sentence(tmp_path):
  """The run-folder reader and the loop's resume check read config.json the same way."""
  from lm import runs
  from lm.training import loop
  (tmp_path / 'config.json').write_text('{"model": ')
  with pytest.raises(UserError, match=r'config.json cannot be read \(JSONDecodeError\); the run '
                     'folder is damaged'):
    runs.read_config(str(tmp_path))
  with pytest.raises(UserError, match='use a new --workdir'):
    loop.check_config(str(tmp_path), {'train': {}})
  (tmp_path / 'config.json').write_text('[1, 2]')
  with pytest.raises(UserError, match='does not hold a JSON object'):
    runs.read_config(str(tmp_path))
  assert (tmp_path / 'config.json').read_text() == '[1, 2]'   # nothing rewritten


def test_each_part_of_the_train_section_is_all_its_reader_reads():
  """make_optimizer and the schedule read the optimizer part, micro_batches the batch part; the
  pretraining part is read by pretraining alone (the other stages refuse it, above)."""
  import ast
  import dataclasses
  import inspect
  from lm.training import optim
  for fn, part in ((optim.make_optimizer, optim.OptimizerConfig),
                   (optim.learning_rate_schedule, optim.OptimizerConfig),
                   (optim.micro_batches, optim.BatchConfig)):
    tree = ast.parse(inspect.getsource(fn))
    read = {a.attr for a in ast.walk(tree) if isinstance(a, ast.Attribute)
            and isinstance(a.value, ast.Name) and a.value.id == 'tc'}
    fields = {f.name for f in dataclasses.fields(part)}
    assert read and read <= fields, (fn.__name__, read - fields)
  parts = [{f.name for f in dataclasses.fields(p)} for p in (
      optim.OptimizerConfig, optim.BatchConfig, optim.LoopConfig, optim.PretrainConfig)]
  assert sum(map(len, parts)) == len(set().union(*parts))   # each key in one part
  assert set().union(*parts) == {f.name for f in dataclasses.fields(TrainConfig)}
