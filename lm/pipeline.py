"""`python run.py pipeline --config=configs/pipeline.py --workdir=DIR`: the whole story in one
command, pretraining to alignment, into a report card.

Stages, each in its own folder under DIR and run by the library call behind its subcommand (the
same code path as running them by hand):

  tokenizer  (only for data.tokenizer=sentencepiece) trains the tokenizer and tokenizes the corpus
  pretrain   run.py train     on the default corpus                      -> DIR/pretrain
  sft        run.py finetune  on the instruction set and the code task   -> DIR/sft
  reward     run.py reward    preference pairs sampled from the SFT model -> DIR/reward
  ppo        run.py ppo       against the reward model                  -> DIR/ppo
  grpo       run.py grpo      against the code task's gold program       -> DIR/grpo
  dpo        run.py dpo       on the reward model's pairs               -> DIR/dpo

then every model is evaluated: `run.py eval` (validation loss and bits per byte, instruction-task
exact match in the chat template) into its folder's eval.json, and the SFT, PPO, GRPO and DPO
policies on the same held-out code headers (gold reward by the task's program, proxy reward by the
reward model, KL to the SFT model). DIR/report.md is the report card, with its plots beside it;
its "val loss kept" column is the pretrained model's validation loss over each model's (100%: the
stage forgot nothing of the pretraining corpus).

Every stage's settings are read before the first stage starts (validate_stages: the sections
each stage's command reads, with the folders it starts from filled in), so a misspelt key or a
bad value in the last stage is refused in the first second, before any folder is touched. The
pipeline holds DIR's lock while it runs (lm/lock.py) and each stage its own folder's.

Reruns. DIR/pipeline.json records each stage's settings, its key (a hash of its settings and of
the keys of the stages it starts from; an option newer than the project's first runs counts only
when set away from its default), its state and wall time. A stage whose key is unchanged
is skipped when finished and resumed when interrupted (the training loop resumes from its
checkpoint). A stage whose settings changed, or that starts from a stage that changed, is run
again: its old folder is moved to DIR/stale/ (never deleted), the changed keys are named, and the
stages after it follow, so no result is silently reused.
"""
from __future__ import annotations

import copy
import dataclasses
import hashlib
import json
import os
import time

from lm.training import loop
from lm import lock as lock_lib
from lm.config import ModelConfig, read_section
from lm.errors import UserError
from lm.metrics import read_json_object, read_jsonl, write_json_atomic, write_text_atomic
from lm.align import common as al
from lm.align import dpo
from lm.align import grpo
from lm.align import ppo
from lm.align import reward
from lm.data import tokens as data_lib
from lm.eval import evaluate as evaluate_lib
from lm.eval import tasks as tasks_lib
from lm.model import sharding as shard_lib
from lm.stages import finetune as ft
from lm.stages import pretrain as train_lib
from lm.training.optim import TrainConfig

STAGES = ('tokenizer', 'pretrain', 'sft', 'reward', 'ppo', 'grpo', 'dpo')
UPSTREAM = {'tokenizer': (), 'pretrain': ('tokenizer',), 'sft': ('pretrain',),
            'reward': ('sft',), 'ppo': ('sft', 'reward'), 'grpo': ('sft',),
            'dpo': ('sft', 'reward')}
STATE = 'pipeline.json'
POLICIES = ('sft', 'ppo', 'grpo', 'dpo')


@dataclasses.dataclass(frozen=True)
class PipelineConfig:
  """The `pipeline` section (keys and meanings: configs/pipeline.py)."""
  stages: tuple
  policy_eval_prompts: int
  policy_eval_samples: int

  @classmethod
  def from_config(cls, section) -> 'PipelineConfig':
    pc = cls(**read_section(cls, section, 'pipeline'))
    for s in pc.stages:
      if s not in STAGES:
        raise UserError(f'pipeline.stages names {s!r}, which is not a stage; use some of '
                        f'{", ".join(STAGES)}.')
    if pc.policy_eval_prompts < 1 or pc.policy_eval_samples < 1:
      raise UserError('pipeline.policy_eval_prompts and pipeline.policy_eval_samples must be '
                      'positive.')
    return pc


def _digest(obj) -> str:
  return hashlib.sha256(json.dumps(obj, sort_keys=True).encode()).hexdigest()[:16]


def stage_configs(cfg, workdir: str) -> dict:
  """Each stage's full config with the folders it starts from filled in (ml-collections)."""
  d = lambda s: os.path.abspath(os.path.join(workdir, s))
  out = {}
  if cfg.pretrain.data.tokenizer == 'sentencepiece':
    out['tokenizer'] = copy.deepcopy(cfg.pretrain.data)
  out['pretrain'] = copy.deepcopy(cfg.pretrain)
  out['sft'] = copy.deepcopy(cfg.sft)
  out['sft'].finetune.init_from = d('pretrain')
  out['reward'] = copy.deepcopy(cfg.reward)
  out['reward'].reward.init_from = d('sft')
  out['ppo'] = copy.deepcopy(cfg.ppo)
  out['ppo'].ppo.init_from, out['ppo'].ppo.reward_from = d('sft'), d('reward')
  if 'grpo' in cfg:
    out['grpo'] = copy.deepcopy(cfg.grpo)
    out['grpo'].grpo.init_from = d('sft')
  out['dpo'] = copy.deepcopy(cfg.dpo)
  out['dpo'].dpo.init_from, out['dpo'].dpo.reward_from = d('sft'), d('reward')
  out['dpo'].dpo.pairs = os.path.join(d('reward'), reward.PAIRS)
  out['dpo'].dpo.eval_pairs = os.path.join(d('reward'), reward.EVAL_PAIRS)
  wanted = PipelineConfig.from_config(cfg.pipeline).stages
  for s in wanted:
    for up in UPSTREAM[s]:
      if up in out and up not in wanted and up != 'tokenizer':
        raise UserError(f'pipeline.stages runs {s} without {up}, which it starts from; add {up}.')
  # The tokenizer stage comes with pretraining (when the corpus is to be SentencePiece-tokenized).
  keep = set(wanted) | ({'tokenizer'} if 'pretrain' in wanted else set())
  return {s: c for s, c in out.items() if s in keep}


def validate_stages(cfg, configs: dict) -> None:
  """Reads every section each stage's command will read (stage_configs: the folders it starts
  from filled in), so that a bad key or value in any stage is refused before the first one
  starts. What needs a trained upstream model (the model's max_len, its tokenizer) is checked
  when the stage starts, as when it runs alone. A refusal names the stage."""
  for name, c in configs.items():
    try:
      _validate_stage(name, c)
    except UserError as e:
      section = 'pretrain.data' if name == 'tokenizer' else name
      raise UserError(f'in the {name} stage (--config.{section}.*): {e}') from None
  try:
    ec = evaluate_lib.EvalConfig.from_config(cfg.eval)
    if ec.tasks != 'auto':
      tasks_lib.resolve(ec.tasks)
  except UserError as e:
    raise UserError(f'in the evaluations (--config.eval.*): {e}') from None


def _validate_stage(name: str, c) -> None:
  if name == 'tokenizer':
    data_lib.DataConfig.from_config(c)
    return
  if name == 'pretrain':
    tc = TrainConfig.from_config(c.train)
    tasks_lib.resolve(tc.eval_tasks)
    shard_lib.MeshConfig.from_config(c.mesh)
    data_lib.DataConfig.from_config(c.data)
    vocab = int(c.model.get('vocab_size') or 0) or 256   # the tokenizer's count is not known yet
    tc.check_fits(ModelConfig.from_config(c.model, vocab).max_len)
    return
  loop.check_stage_start(c.to_dict())
  section = {'sft': 'finetune'}.get(name, name)
  tc = TrainConfig.from_config(c.train, section)
  if name == 'sft':
    ft.FinetuneConfig.from_config(c)
    shard_lib.MeshConfig.from_config(c.mesh)
  elif name == 'reward':
    reward.RewardConfig.from_config(c.reward)
  elif name == 'ppo':
    ppo.PpoConfig.from_config(c.ppo, tc.batch_size)
  elif name == 'grpo':
    grpo.GrpoConfig.from_config(c.grpo, tc.batch_size)
    al.PolicyLora.from_config(c)
  elif name == 'dpo':
    dpo.DpoConfig.from_config(c.dpo)


def stage_keys(configs: dict) -> dict:
  """Stage -> key: its settings and its upstream stages' keys, hashed."""
  keys = {}
  for s in STAGES:
    if s in configs:
      ups = {u: keys[u] for u in UPSTREAM[s] if u in keys}
      keys[s] = _digest({'config': _without_added_defaults(configs[s].to_dict()),
                         'upstream': ups})
  return keys


def _without_added_defaults(cfg: dict) -> dict:
  """The config less the keys added to the project after runs were made (loop.ADDED_KEYS) where
  they hold their defaults, so that a new option leaves existing pipeline folders current."""
  out = {k: dict(v) if isinstance(v, dict) else v for k, v in cfg.items()}
  for dotted, default in loop.ADDED_KEYS.items():
    section, key = dotted.split('.', 1)
    if isinstance(out.get(section), dict) and out[section].get(key, default) == default:
      out[section].pop(key, None)
  return out


def _run_stage(name: str, cfg, folder: str) -> dict:
  """The library call behind the stage's subcommand; returns its summary."""
  if name == 'tokenizer':
    ds = data_lib.prepare(cfg, progress=None)
    return {'finished': True, 'vocab_size': ds.tokenizer.vocab_size,
            'bytes_per_token': ds.bytes_per_token('train')}
  if name == 'pretrain':
    return train_lib.train(cfg, folder)
  if name == 'sft':
    return ft.finetune(cfg, folder)
  if name == 'reward':
    return reward.train_reward(cfg, folder)
  if name == 'ppo':
    return ppo.train_ppo(cfg, folder)
  if name == 'grpo':
    return grpo.train_grpo(cfg, folder)
  return dpo.train_dpo(cfg, folder)


def _move_aside(workdir: str, name: str) -> str | None:
  folder = os.path.join(workdir, name)
  if not os.path.exists(folder):
    return None
  stale = os.path.join(workdir, 'stale')
  os.makedirs(stale, exist_ok=True)
  dest = base = os.path.join(stale, f'{name}-{time.strftime("%Y%m%d-%H%M%S")}')
  n = 1
  while os.path.exists(dest):
    dest, n = f'{base}-{n}', n + 1
  os.rename(folder, dest)
  return dest


def run_pipeline(cfg, workdir: str, log=print) -> dict:
  """Runs (or skips, resumes, reruns) every stage, evaluates, writes the report card."""
  configs = stage_configs(cfg, workdir)     # a bad stage list is refused before anything is written
  validate_stages(cfg, configs)             # and so is a bad setting of any stage
  keys = stage_keys(configs)
  with lock_lib.hold(workdir):
    return _run_pipeline(cfg, workdir, configs, keys, log)


def _read_state(path: str) -> dict:
  if not os.path.exists(path):
    return {'stages': {}}
  fix = ('delete it to run every stage again (their folders move to stale/), or restore it from '
         'a copy')
  state = read_json_object(path, fix)
  if not isinstance(state.get('stages'), dict) or not all(
      isinstance(r, dict) and 'key' in r for r in state['stages'].values()):
    raise UserError(f'{path} is not a pipeline record (its stages are missing or damaged); {fix}.')
  return state


def _run_pipeline(cfg, workdir: str, configs: dict, keys: dict, log) -> dict:
  path = os.path.join(workdir, STATE)
  state = _read_state(path)
  t_all = time.time()
  for name in STAGES:
    if name not in configs:
      continue
    c, key = configs[name], keys[name]
    rec = state['stages'].get(name)
    folder = os.path.join(workdir, name)
    if rec and rec['key'] == key and rec.get('finished'):
      log(f'[{name}] finished earlier ({rec["wall_s"]:.0f} s); skipped')
      continue
    if rec and rec['key'] != key or not rec and os.path.exists(folder):
      why = 'its settings or a stage it starts from changed'
      if rec:
        diff = loop.config_changes(rec['config'], json.loads(json.dumps(c.to_dict())),
                                   allowed=())
        if diff:
          why = 'changed: ' + ', '.join(f'{k} ({a!r} -> {b!r})' for k, a, b in diff[:4])
        else:
          why = 'a stage it starts from ran again'
      moved = _move_aside(workdir, name)
      for later in STAGES[STAGES.index(name) + 1:]:      # evaluations of later stages are stale
        state['stages'].get(later, {}).pop('eval', None)
      if moved:
        log(f'[{name}] runs again ({why}); the old folder is now {moved}')
      rec = None
    rec = rec or {'key': key, 'config': json.loads(json.dumps(c.to_dict())), 'wall_s': 0.0}
    rec['finished'] = False
    rec.pop('eval', None)
    state['stages'][name] = rec
    write_json_atomic(path, state)
    if name == 'tokenizer':
      log('[tokenizer] training the SentencePiece tokenizer and tokenizing the corpus (cached)')
    else:
      log(f'[{name}] {"resuming" if os.path.exists(folder) else "starting"} in {folder}')
    t0 = time.time()
    try:
      summary = _run_stage(name, c, folder)
    finally:
      rec['wall_s'] += time.time() - t0
      write_json_atomic(path, state)
    if not summary.get('finished'):
      log(f'[{name}] stopped; rerun the same command to resume')
      return {'stopped': name, 'state': state}
    rec['finished'] = True
    rec['summary'] = summary
    write_json_atomic(path, state)
    log(f'[{name}] done in {rec["wall_s"]:.0f} s')
  evaluate_stages(cfg, workdir, state, log)
  write_json_atomic(path, state)
  report = write_report(cfg, workdir, state)
  log(f'pipeline: {time.time() - t_all:.0f} s this call; report card {report}')
  return {'state': state, 'report': report}


def evaluate_stages(cfg, workdir: str, state: dict, log=print) -> None:
  """eval.json for every model stage; gold, proxy and KL for the policies (cached by stage key)."""
  stages = state['stages']
  for name in ('pretrain',) + POLICIES:
    rec = stages.get(name)
    if not rec or not rec.get('finished') or 'eval' in rec:
      continue
    t0 = time.time()
    e = copy.deepcopy(cfg.eval)
    res = evaluate_lib.evaluate_run(os.path.join(workdir, name), e)
    rec['eval'] = {'text': {k: {m: v[m] for m in ('loss', 'bpb', 'tokens')}
                            for k, v in res['text'].items()},
                   'tasks': {k: {m: v[m] for m in ('exact', 'partial', 'logprob', 'n')}
                             for k, v in res['tasks'].items()},
                   'wall_s': time.time() - t0}
    log(f'[{name}] evaluated in {time.time() - t0:.0f} s')
  policies = [p for p in POLICIES if stages.get(p, {}).get('finished')]
  if 'reward' in stages and stages['reward'].get('finished') and policies and any(
      'policy' not in stages[p].get('eval', {}) for p in policies):
    t0 = time.time()
    p = PipelineConfig.from_config(cfg.pipeline)
    sft = al.load_policy(os.path.join(workdir, 'sft'))
    rm = reward.load(os.path.join(workdir, 'reward'))
    headers = al.task_prompts('eval', p.policy_eval_prompts)
    ev = al.Evaluator(headers, sft, rm, int(cfg.ppo.train.seq_len), int(cfg.ppo.ppo.max_new_tokens),
                      1.0, int(cfg.ppo.ppo.sample_batch), samples=p.policy_eval_samples,
                      seed=999)
    for name in policies:
      params = sft.params if name == 'sft' else al.load_policy(
          os.path.join(workdir, name)).params
      stages[name].setdefault('eval', {})['policy'] = dict(ev.evaluate(params, prefix=''),
                                                           prompts=len(headers),
                                                           samples=p.policy_eval_samples)
    log(f'[policies] gold and proxy reward, KL: {time.time() - t0:.0f} s')


# ---------------------------------------------------------------------------------------------
# The report card.

def _curve(folder: str, key: str) -> tuple[list, list]:
  rows = [r for r in read_jsonl(os.path.join(folder, 'metrics.jsonl')) if key in r]
  return [r['step'] for r in rows], [r[key] for r in rows]


def _save(fig, path: str) -> str:
  import matplotlib.pyplot as plt
  fig.tight_layout()
  fig.savefig(path, dpi=100)
  plt.close(fig)
  return path


def _plots(workdir: str, state: dict) -> list[str]:
  import matplotlib
  matplotlib.use('Agg')
  import matplotlib.pyplot as plt
  stages = state['stages']
  out = []
  trained = [s for s in STAGES[1:] if stages.get(s, {}).get('finished')]
  if trained:
    fig, axes = plt.subplots(1, len(trained), figsize=(3.6 * len(trained), 3.2), squeeze=False)
    for ax, name in zip(axes[0], trained):
      folder = os.path.join(workdir, name)
      for key, label in (('loss', 'train'), ('eval_loss', 'held-out')):
        x, y = _curve(folder, key)
        if x:
          ax.plot(x, y, '-' if key == 'loss' else 'o-', label=label, ms=3)
      ax.set_title(name)
      ax.set_xlabel('step')
      ax.grid(alpha=0.3)
    axes[0][0].set_ylabel('loss')
    axes[0][0].legend(fontsize=8)
    out.append(_save(fig, os.path.join(workdir, 'loss_curves.png')))
  evald = [s for s in ('pretrain',) + POLICIES if 'tasks' in stages.get(s, {}).get('eval', {})]
  if evald:
    fig, ax = plt.subplots(figsize=(5, 3.2))
    acc = [stages[s]['eval']['tasks'].get('instruct', {}).get('exact', 0.0) for s in evald]
    ax.bar(evald, [100 * a for a in acc], color='C0')
    for i, a in enumerate(acc):
      ax.text(i, 100 * a + 1, f'{a:.0%}', ha='center', fontsize=8)
    ax.set_ylabel('instruction tasks, exact match (%)')
    ax.set_ylim(0, 100)
    ax.set_title('task accuracy by stage (held-out instances)', fontsize=10)
    out.append(_save(fig, os.path.join(workdir, 'accuracy.png')))
  pol = [s for s in POLICIES if 'policy' in stages.get(s, {}).get('eval', {})]
  if pol:
    fig, ax = plt.subplots(figsize=(5.5, 3.6))
    if stages.get('ppo', {}).get('finished'):
      rows = [r for r in read_jsonl(os.path.join(workdir, 'ppo', 'metrics.jsonl'))
              if 'eval_gold' in r]
      if rows:
        ax.plot([r['eval_kl'] for r in rows], [r['eval_gold'] for r in rows], '-', color='C1',
                alpha=0.5, label='PPO during training (gold)')
    for i, s in enumerate(pol):
      r = stages[s]['eval']['policy']
      ax.plot(r['kl'], r['gold'], 'o', color=f'C{i + 2}', ms=7, label=f'{s}: gold')
      ax.plot(r['kl'], r['proxy'], 's', color=f'C{i + 2}', ms=6, mfc='none', label=f'{s}: proxy')
    ax.set_xlabel('KL to the SFT model (nats per response)')
    ax.set_ylabel('reward')
    ax.set_title('reward against KL', fontsize=10)
    ax.legend(fontsize=7)
    ax.grid(alpha=0.3)
    out.append(_save(fig, os.path.join(workdir, 'reward_vs_kl.png')))
  return out


def _config_summary(name: str, c: dict) -> str:
  t = c.get('train', {})
  steps = f"{t.get('steps')} steps, batch {t.get('batch_size')} x {t.get('seq_len')}, lr {t.get('lr')}"
  if name == 'tokenizer':
    return f"sentencepiece {c.get('sp_model_type')}, vocabulary {c.get('vocab_size')}"
  if name == 'pretrain':
    m, d = c['model'], c['data']
    return (f"{m['n_layers']} layers x {m['d_model']}, {m['pos']}, {d['corpus']} "
            f"({d['tokenizer']}); {steps}")
  if name == 'sft':
    f = c['finetune']
    lora = c.get('lora', {}).get('rank', 0)
    return f"data {f['data']}, {'LoRA r=' + str(lora) if lora else 'full'}; {steps}"
  if name == 'reward':
    return f"pairs from the SFT model, label noise {c['reward']['noise']}; {steps}"
  if name == 'ppo':
    return f"kl_coef {c['ppo']['kl_coef']}; {t.get('steps')} iterations of {t.get('batch_size')} rollouts"
  if name == 'grpo':
    g = c['grpo']
    return (f"verifier {g['reward']}, kl_coef {g['kl_coef']}; {t.get('steps')} iterations of "
            f"{t.get('batch_size')} prompts x {g['group_size']} samples")
  return f"beta {c['dpo'].get('beta')}; {steps}"


def write_report(cfg, workdir: str, state: dict) -> str:
  stages = state['stages']
  plots = _plots(workdir, state)
  fmt = lambda v, f='.3f': '–' if v is None else format(v, f)
  lines = ['# Report card', '',
           f'`python run.py pipeline --workdir={workdir}`. Every stage is an ordinary '
           'run folder; `pipeline.json` holds the settings, keys and wall times.', '',
           '| stage | settings | wall time | FLOPs | final train loss | held-out |',
           '|---|---|---|---|---|---|']
  total = 0.0
  for name in STAGES:
    rec = stages.get(name)
    if not rec:
      continue
    total += rec['wall_s']
    s = rec.get('summary', {})
    held = ''
    if name == 'reward' and 'reward' in s:
      held = f"pair accuracy {s['reward']['eval_accuracy']:.1%} (gold labels)"
    elif name in ('ppo', 'grpo', 'dpo') and name in s:
      a = s[name].get('after', {})
      if 'eval_gold' in a:
        held = f"gold {a['eval_gold']:.3f} at KL {a['eval_kl']:.2f}"
    elif s.get('eval_loss') is not None:
      held = f"loss {s['eval_loss']:.3f}"
    state_txt = '' if rec.get('finished') else ' (not finished)'
    lines.append(f"| {name}{state_txt} | {_config_summary(name, rec['config'])} | "
                 f"{rec['wall_s'] / 60:.1f} min | {fmt(s.get('flops'), '.2e')} | "
                 f"{fmt(s.get('final_loss'))} | {held} |")
  lines += ['', f'Training wall time, all stages: {total / 60:.1f} min.', '']
  evald = [s for s in ('pretrain',) + POLICIES if 'eval' in stages.get(s, {})]
  if evald:
    e0 = stages[evald[0]]['eval']
    tasks = list(e0.get('tasks', {}))
    lines += ['## What each stage bought', '',
              '| model | val loss | val bits/byte | val loss kept (base = 100%) | ' + ' | '.join(
                  f'{t} exact match | {t} partial credit' for t in tasks)
              + ' | gold reward | proxy reward | KL to SFT (nats) |',
              '|---' * (4 + 2 * len(tasks) + 3) + '|']
    base_loss = stages.get('pretrain', {}).get('eval', {}).get('text', {}).get('val', {}).get(
        'loss')
    for s in evald:
      e = stages[s]['eval']
      val = e.get('text', {}).get('val', {})
      pol = e.get('policy', {})
      kept = base_loss / val['loss'] if base_loss and val.get('loss') else None
      cells = [fmt(val.get('loss')), fmt(val.get('bpb')), fmt(kept, '.1%')]
      for t in tasks:
        r = e.get('tasks', {}).get(t, {})
        cells += [fmt(r.get('exact'), '.1%'), fmt(r.get('partial'), '.1%')]
      cells += [fmt(pol.get('gold')), fmt(pol.get('proxy')), fmt(pol.get('kl'), '.2f')]
      lines.append(f'| {s} | ' + ' | '.join(cells) + ' |')
    pe = next((stages[s]['eval']['policy'] for s in POLICIES
               if 'policy' in stages.get(s, {}).get('eval', {})), None)
    lines += ['', 'Task accuracy: held-out instances of the built-in instruction set, greedy answers '
              'in the chat template (the pretrained model has never seen the template, so it '
              'scores near zero there by construction). Validation loss: the pretraining corpus '
              '(forgetting shows as a rise); kept: the pretrained model\'s validation loss over '
              'this model\'s (100%: nothing forgotten).']
    if pe:
      lines += ['Rewards: the same '
                f"{pe['prompts']} held-out code headers x {pe['samples']} samples for every policy, "
                'at temperature 1; gold is the task\'s program (0 to 1), proxy the reward model\'s '
                'normalised score, KL the Monte Carlo estimate per response.']
  lines.append('')
  for p in plots:
    lines += [f'![{os.path.basename(p)}]({os.path.basename(p)})', '']
  path = os.path.join(workdir, 'report.md')
  write_text_atomic(path, '\n'.join(lines))
  return path
