"""run.py pipeline: every stage on a tiny model, the report card, skipping, resuming, rerun-on-change."""
import json
import os

import pytest

from configs import pipeline as pipeline_cfg
from lm.stages import finetune as ft
from lm import pipeline
from lm.errors import UserError


def tiny_config(cache_dir):
  c = pipeline_cfg.get_config()
  c.pipeline.policy_eval_prompts, c.pipeline.policy_eval_samples = 6, 1
  m, d, t = c.pretrain.model, c.pretrain.data, c.pretrain.train
  m.n_layers, m.d_model, m.n_heads, m.max_len = 1, 32, 2, 128
  d.max_bytes, d.cache_dir = 200_000, cache_dir
  for k, v in dict(steps=30, batch_size=8, seq_len=64, warmup_steps=2, eval_every=30,
                   eval_batches=1, checkpoint_every=30, progress='none').items():
    t[k] = v
  short = dict(warmup_steps=1, progress='none', log_every=1)   # eval_batches: SFT reads it
  for k, v in dict(short, steps=10, batch_size=8, seq_len=128, eval_every=10, eval_batches=1,
                   checkpoint_every=5).items():
    c.sft.train[k] = v
  f = c.sft.finetune
  f.train_per_family, f.eval_per_family, f.max_new_tokens, f.eval_batch_size = 8, 2, 16, 32
  r = c.reward.reward
  r.prompts, r.eval_prompts, r.samples_per_prompt, r.max_new_tokens = 12, 6, 4, 12
  r.sample_batch = 32
  for k, v in dict(short, steps=4, batch_size=4, eval_every=4, checkpoint_every=4).items():
    c.reward.train[k] = v
  p = c.ppo.ppo
  p.eval_prompts, p.eval_samples, p.max_new_tokens, p.minibatch, p.epochs = 4, 1, 12, 4, 1
  p.sample_batch = 32
  for k, v in dict(short, steps=2, batch_size=8, eval_every=2, checkpoint_every=2,
                   warmup_steps=0).items():
    c.ppo.train[k] = v
  g = c.grpo.grpo
  g.eval_prompts, g.eval_samples, g.max_new_tokens, g.group_size, g.minibatch = 4, 1, 12, 2, 4
  g.epochs, g.sample_batch = 1, 32
  for k, v in dict(short, steps=2, batch_size=4, eval_every=2, checkpoint_every=2,
                   warmup_steps=0).items():
    c.grpo.train[k] = v
  dd = c.dpo.dpo
  dd.eval_prompts, dd.eval_samples, dd.max_new_tokens, dd.sample_batch = 4, 1, 12, 32
  for k, v in dict(short, steps=3, batch_size=4, eval_every=3, checkpoint_every=3).items():
    c.dpo.train[k] = v
  e = c.eval
  e.max_tokens, e.examples, e.batch_size = 500, 8, 8
  return c


@pytest.fixture(scope='module')
def done(cache_dir, tmp_path_factory):
  """A tiny pipeline whose SFT stage is interrupted once, then resumed by a rerun."""
  workdir = str(tmp_path_factory.mktemp('pipe'))
  cfg = tiny_config(cache_dir)
  real = pipeline._run_stage
  calls = []

  def interrupted(name, c, folder):
    calls.append(name)
    if name == 'sft' and calls.count('sft') == 1:
      return ft.finetune(c, folder, stop_at=5)
    return real(name, c, folder)
  pipeline._run_stage = interrupted
  try:
    logs = []
    first = pipeline.run_pipeline(cfg, workdir, log=logs.append)
    second = pipeline.run_pipeline(cfg, workdir, log=logs.append)
  finally:
    pipeline._run_stage = real
  return workdir, cfg, first, second, logs, calls


def test_an_interrupted_stage_is_resumed_by_a_rerun(done):
  workdir, _, first, second, logs, calls = done
  assert first['stopped'] == 'sft' and calls == ['pretrain', 'sft', 'sft', 'reward', 'ppo', 'grpo',
                                          'dpo']
  assert '[pretrain] finished earlier' in ' '.join(logs)
  assert any(l.startswith('[sft] resuming') for l in logs)
  summary = json.load(open(os.path.join(workdir, 'sft', 'summary.json')))
  assert summary['steps'] == 10 and summary['finished']
  rows = [json.loads(l) for l in open(os.path.join(workdir, 'sft', 'metrics.jsonl'))]
  assert [r['step'] for r in rows if 'loss' in r] == list(range(1, 11))   # no step twice


def test_the_report_card_shows_every_stage(done):
  workdir, _, _, second, _, _ = done
  state = second['state']['stages']
  assert all(state[s]['finished'] for s in ('pretrain', 'sft', 'reward', 'ppo', 'grpo', 'dpo'))
  for s in ('pretrain', 'sft', 'ppo', 'grpo', 'dpo'):
    e = state[s]['eval']
    assert 0 <= e['tasks']['instruct']['exact'] <= 1 and e['text']['val']['bpb'] > 0
  for s in ('sft', 'ppo', 'grpo', 'dpo'):
    pol = state[s]['eval']['policy']
    assert 0 <= pol['gold'] <= 1 and pol['prompts'] == 6
  assert state['sft']['eval']['policy']['kl'] == pytest.approx(0.0, abs=1e-6)
  report = open(os.path.join(workdir, 'report.md')).read()
  for s in ('pretrain', 'sft', 'reward', 'ppo', 'grpo', 'dpo'):
    assert f'| {s} |' in report
  assert 'pair accuracy' in report and 'What each stage bought' in report
  # The kept column: the pretrained model's validation loss over each model's.
  assert 'val loss kept (base = 100%)' in report
  base = state['pretrain']['eval']['text']['val']['loss']
  assert '| pretrain | ' in report and f"| {base:.3f} |" in report
  row = next(l for l in report.splitlines() if l.startswith('| sft |') and '%' in l)
  sft_loss = state['sft']['eval']['text']['val']['loss']
  assert f'{base / sft_loss:.1%}' in row
  assert next(l for l in report.splitlines() if l.startswith('| pretrain |') and '%' in l
              ).split(' | ')[3] == '100.0%'
  for png in ('loss_curves.png', 'accuracy.png', 'reward_vs_kl.png'):
    assert f'![{png}]({png})' in report and os.path.getsize(os.path.join(workdir, png)) > 0


def test_a_rerun_skips_finished_stages(done, tmp_path):
  workdir, cfg, _, _, _, _ = done
  before = {s: os.path.getmtime(os.path.join(workdir, s, 'summary.json'))
            for s in ('pretrain', 'sft', 'reward', 'ppo', 'grpo', 'dpo')}
  logs = []
  pipeline.run_pipeline(cfg, workdir, log=logs.append)
  assert sum('skipped' in l for l in logs) == 6
  for s, t in before.items():
    assert os.path.getmtime(os.path.join(workdir, s, 'summary.json')) == t


def test_a_changed_stage_reruns_with_its_successors_only(done):
  workdir, cfg, _, _, _, _ = done
  state0 = json.load(open(os.path.join(workdir, pipeline.STATE)))['stages']
  cfg = tiny_config(cfg.pretrain.data.cache_dir)
  cfg.reward.train.lr = 2e-4
  logs = []
  out = pipeline.run_pipeline(cfg, workdir, log=logs.append)
  text = '\n'.join(logs)
  assert '[pretrain] finished earlier' in text and '[sft] finished earlier' in text
  assert '[reward] runs again (changed: train.lr (0.0001 -> 0.0002))' in text
  for s in ('ppo', 'dpo'):
    assert f'[{s}] runs again (a stage it starts from ran again)' in text
  assert '[grpo] finished earlier' in text      # GRPO starts from the SFT run alone
  stale = sorted(os.listdir(os.path.join(workdir, 'stale')))
  assert [n.split('-')[0] for n in stale] == ['dpo', 'ppo', 'reward']
  st = out['state']['stages']
  assert st['sft']['key'] == state0['sft']['key'] and st['reward']['key'] != state0['reward']['key']
  assert all(st[s]['finished'] and 'policy' in st[s]['eval'] for s in ('sft', 'ppo', 'dpo'))


def test_pipeline_refuses_unknown_or_orphaned_stages(cache_dir, tmp_path):
  cfg = tiny_config(cache_dir)
  cfg.pipeline.stages = 'pretrain,sft,rlhf'
  with pytest.raises(UserError, match="'rlhf', which is not a stage"):
    pipeline.run_pipeline(cfg, str(tmp_path))
  cfg.pipeline.stages = 'ppo'
  with pytest.raises(UserError, match='runs ppo without sft'):
    pipeline.run_pipeline(cfg, str(tmp_path / 'new'))
  assert not os.path.exists(tmp_path / 'new')


def test_a_sentencepiece_pipeline_starts_with_its_tokenizer_stage(cache_dir):
  cfg = tiny_config(cache_dir)
  assert 'tokenizer' not in pipeline.stage_configs(cfg, '/tmp/p')
  cfg.pretrain.data.tokenizer = 'sentencepiece'
  configs = pipeline.stage_configs(cfg, '/tmp/p')
  assert list(configs)[:2] == ['tokenizer', 'pretrain']
  keys = pipeline.stage_keys(configs)
  cfg.pretrain.data.vocab_size = 512          # a new tokenizer: every stage's key changes
  keys2 = pipeline.stage_keys(pipeline.stage_configs(cfg, '/tmp/p'))
  assert all(keys[s] != keys2[s] for s in keys)
