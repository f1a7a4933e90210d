"""The instruction-tuning lesson at toy size: every stage runs and the report and plot are made.

Slow (about 20 s of training): the stages themselves are tested in test_finetune.py."""
import pytest

pytestmark = pytest.mark.slow

from experiments import instruction_tuning


@pytest.fixture(scope='module')
def result(tmp_path_factory):
  cache = str(tmp_path_factory.mktemp('cache'))
  pre = {'model.n_layers': 1, 'model.d_model': 32, 'model.max_len': 96, 'data.max_bytes': 200_000,
         'data.cache_dir': cache, 'train.steps': 20, 'train.eval_every': 20,
         'train.checkpoint_every': 20, 'train.batch_size': 8, 'train.seq_len': 64,
         'train.warmup_steps': 2, 'train.eval_batches': 1, 'train.progress': 'none'}
  ft = {'finetune.families': 'upper,module', 'finetune.train_per_family': 40,
        'finetune.eval_per_family': 4, 'finetune.max_new_tokens': 8,
        'finetune.eval_batch_size': 8, 'train.steps': 6, 'train.eval_every': 6,
        'train.checkpoint_every': 6, 'train.batch_size': 8, 'train.seq_len': 96,
        'train.warmup_steps': 1, 'train.eval_batches': 1, 'train.progress': 'none'}
  return instruction_tuning.run(str(tmp_path_factory.mktemp('runs')), ranks=(2,),
                                pretrain_overrides=pre, sft_overrides=ft,
                                prompts=('Name the module: import os',))


def test_every_variant_is_trained_and_compared(result, capsys):
  assert set(result['variants']) == {'full', 'lora2'}
  full, lora = result['variants']['full']['summary'], result['variants']['lora2']['summary']
  assert full['trainable_fraction'] == 1.0 and 0 < lora['trainable_fraction'] < 0.2
  assert lora['optimizer_state_bytes'] < full['optimizer_state_bytes'] / 5
  assert lora['checkpoint_bytes'] < full['checkpoint_bytes']
  t = instruction_tuning.table(result)
  assert t['families'] == ['module', 'upper']
  assert set(t['rows']) == {'base', 'full', 'lora2'}
  instruction_tuning.report(result)
  out = capsys.readouterr().out
  assert 'exact match (%) on held-out instances' in out and "'Name the module: import os'" in out


def test_plot(result, tmp_path):
  for path in instruction_tuning.plot(result, str(tmp_path)):
    with open(path, 'rb') as f:
      assert f.read(8) == b'\x89PNG\r\n\x1a\n'
