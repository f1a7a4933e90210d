"""Instruction tuning: one pretrained model, answered before and after full fine-tuning and LoRA.

  python -m experiments.instruction_tuning [--runs=runs/instruction_tuning] [--ranks=4,8]

A 4-layer byte model is pretrained on the Python standard library (configs/pretrain_small.py),
then taught the built-in instruction set (lm/data/instruct.py: addition, subtraction, reversing and
upper-casing a word, counting a letter, sorting numbers, naming a function from its `def` line
and a module from its import) three ways from the same weights: every parameter trained, and
LoRA adapters at two ranks with the base frozen (configs/sft.py). The LoRA recipe: adapters on
the attention projections q, k, v, o (per trainable number they buy more here than adapters on
the MLP), the embedding rows of the four chat tokens trained beside them (the base never saw
those tokens), a peak learning rate of 7e-3 against 3e-3 for full fine-tuning with a 100-step
warmup, and 4000 steps against 1500 (the adapters learn the new skills more slowly; at 1e-2 the
adapters' loss spikes and a longer run ends worse). Each run is an ordinary workdir
(rerunning skips what is finished and resumes what was interrupted). The lesson then prints:

  * exact-match accuracy per task family on held-out instances, for the base model and each
    fine-tuned one, and on held-out *phrasings* of the instructions: a model that learned the
    task answers both; one that memorised its templates fails the second;
  * the trainable fraction, optimizer-state bytes, checkpoint size and step time of each;
  * forgetting: the validation loss on the pretraining corpus before and after;
  * the same prompts answered by each model.

On 2 CPU cores the whole lesson takes about 40 minutes; the numbers are in docs/finetuning.md.
"""
import json
import os

from absl import app
from absl import flags
import numpy as np

from experiments import common

NAME = 'instruction_tuning'
_RANKS = flags.DEFINE_string('ranks', '4,8', 'LoRA ranks, comma-separated.')
_LORA_LR = flags.DEFINE_float('lora_lr', 7e-3, 'Peak learning rate of the LoRA runs (full '
                               'fine-tuning uses configs/sft.py\'s train.lr).')
_LORA_WARMUP = flags.DEFINE_integer('lora_warmup', 100, 'Warmup steps of the LoRA runs.')
_LORA_STEPS = flags.DEFINE_integer('lora_steps', 4000, 'Steps of the LoRA runs (full fine-tuning '
                                   'uses configs/sft.py\'s train.steps).')
_LORA_TARGETS = flags.DEFINE_string('lora_targets', 'q,k,v,o', 'Matrices the LoRA runs adapt.')
PROMPTS = ('Name the module: import os.path', 'def splitext(p): What is it called?',
           "Convert 'select' to upper case.", 'Write number backwards.', 'What is 12 plus 30?',
           'Sort these numbers from smallest to largest: 32 5 17')


def run(runs_dir=None, ranks=None, pretrain_overrides=None, sft_overrides=None,
        prompts=PROMPTS, base_dir=None, lora_lr=None):
  """Pretrains (or reuses) the base, fine-tunes it fully and with LoRA; returns the numbers."""
  from configs import pretrain_small, sft as sft_config
  from lm.stages import finetune as ft
  from lm import runs
  from lm.eval import sample as sample_lib
  from lm.stages import pretrain as train_lib
  runs_dir = common.runs_dir(NAME, runs_dir)
  ranks = ranks or tuple(int(r) for r in _RANKS.value.split(','))
  base_dir = common.base_run(base_dir)
  if not base_dir:
    base_dir = os.path.join(runs_dir, 'base')
    pcfg = pretrain_small.get_config()
    for k, v in (pretrain_overrides or {}).items():
      _set(pcfg, k, v)
    print(f'pretraining the base model into {base_dir} ...', flush=True)
    train_lib.train(pcfg, base_dir)

  variants = [('full', 0)] + [(f'lora{r}', r) for r in ranks]
  out = {'variants': {}, 'prompts': list(prompts)}
  for name, rank in variants:
    cfg = sft_config.get_config()
    cfg.finetune.init_from = base_dir
    cfg.finetune.replay_fraction = 0.0   # chat examples alone: the forgetting is part of the lesson
    cfg.lora.rank = rank
    if rank:   # adapters start at zero and carry few numbers: they want a larger step
      parsed = flags.FLAGS.is_parsed()
      cfg.train.lr = lora_lr or (_LORA_LR.value if parsed else 7e-3)
      cfg.train.steps = _LORA_STEPS.value if parsed else 4000
      cfg.train.warmup_steps = min(_LORA_WARMUP.value if parsed else 100, cfg.train.steps - 1)
      cfg.train.eval_every = cfg.train.checkpoint_every = max(1, cfg.train.steps // 4)
      cfg.lora.targets = _LORA_TARGETS.value if parsed else 'q,k,v,o'

    for k, v in (sft_overrides or {}).items():
      _set(cfg, k, v)
    workdir = os.path.join(runs_dir, name)
    print(f'fine-tuning: {name} into {workdir} ...', flush=True)
    summary = ft.finetune(cfg, workdir)
    if not summary.get('finished'):
      raise SystemExit(f'{name} was stopped; rerun to resume.')
    mc, params, tok, _ = runs.load_model(workdir)
    answers = [sample_lib.chat(mc, params, tok, [{'role': 'user', 'content': p}],
                               max_new_tokens=24, temperature=0.0)[0] for p in prompts]
    out['variants'][name] = {'summary': summary['finetune'], 'answers': answers,
                             'steps': summary['steps']}
  # The base model's answers, through the same template (it has never seen one).
  mc, params, tok, _ = runs.load_model(base_dir)
  out['base_answers'] = [sample_lib.chat(mc, params, tok, [{'role': 'user', 'content': p}],
                                         max_new_tokens=24, temperature=0.0)[0] for p in prompts]
  return out


def _set(cfg, dotted: str, value):
  *path, key = dotted.split('.')
  for p in path:
    cfg = cfg[p]
  cfg[key] = value


def table(result) -> dict:
  """{'families': [...], 'rows': {model: {'acc': {fam: %}, 'phrasing': {...}}}} in percent."""
  variants = result['variants']
  first = next(iter(variants.values()))['summary']
  fams = sorted(k[4:] for k in first['after'] if k.startswith('acc/') and k != 'acc/all')
  rows = {'base': first['before']}
  rows.update({name: v['summary']['after'] for name, v in variants.items()})
  out = {}
  for name, ev in rows.items():
    out[name] = {'acc': {f: 100 * ev[f'acc/{f}'] for f in fams + ['all']},
                 'phrasing': {f: 100 * ev[f'acc_phrasing/{f}'] for f in fams + ['all']},
                 'pretrain_eval_loss': ev['pretrain_eval_loss'], 'eval_loss': ev['eval_loss']}
  return {'families': fams, 'rows': out}


def report(result):
  t = table(result)
  fams, rows = t['families'], t['rows']
  names = list(rows)
  print('\nexact match (%) on held-out instances [held-out phrasings in brackets]')
  print(f"{'family':10s}" + ''.join(f'{n:>16s}' for n in names))
  for f in fams + ['all']:
    print(f'{f:10s}' + ''.join(f"{rows[n]['acc'][f]:9.0f} [{rows[n]['phrasing'][f]:3.0f}]"
                               for n in names))
  full_gain = rows['full']['acc']['all'] - rows['base']['acc']['all']
  print('\nmodel      trainable        share  optimizer state  checkpoint  step time  '
        'stdlib val loss  gain vs full')
  print(f"{'base':10s}{'':>10s}{'':>13s}{'':>17s}{'':>12s}{'':>11s}"
        f"{rows['base']['pretrain_eval_loss']:>17.3f}")
  for name, v in result['variants'].items():
    s = v['summary']
    gain = rows[name]['acc']['all'] - rows['base']['acc']['all']
    print(f"{name:10s}{s['trainable_params']:>10,d}{s['trainable_fraction']:>12.2%} "
          f"{s['optimizer_state_bytes'] / 1e6:>13.2f} MB {s['checkpoint_bytes'] / 1e6:>8.2f} MB"
          f"{1e3 * (s['step_time_s'] or 0):>8.0f} ms{rows[name]['pretrain_eval_loss']:>17.3f}"
          f"{gain / full_gain if full_gain else float('nan'):>13.0%}")
  gains = {f: rows['full']['acc'][f] - rows['base']['acc'][f] for f in fams}
  big = [f for f, g in gains.items() if g >= 70]
  print(f'\nfamilies where full fine-tuning gains 70 points or more: {", ".join(big) or "none"}')
  print('\nthe same prompts, answered greedily:')
  for i, p in enumerate(result['prompts']):
    print(f'  {p!r}')
    print(f"    {'base':8s} {result['base_answers'][i]!r}")
    for name, v in result['variants'].items():
      print(f"    {name:8s} {v['answers'][i]!r}")


def plot(result, folder):
  import matplotlib.pyplot as plt
  t = table(result)
  fams, rows = t['families'] + ['all'], t['rows']
  names = list(rows)
  fig, axes = plt.subplots(2, 1, figsize=(11, 7), sharex=True)
  x = np.arange(len(fams))
  w = 0.8 / len(names)
  for ax, key, title in ((axes[0], 'acc', 'held-out instances, training phrasings'),
                         (axes[1], 'phrasing', 'held-out instances, held-out phrasings')):
    for i, n in enumerate(names):
      ax.bar(x + (i - (len(names) - 1) / 2) * w, [rows[n][key][f] for f in fams], w, label=n)
    ax.set(ylabel='exact match (%)', ylim=(0, 105), title=title)
  axes[0].legend(ncol=len(names), loc='upper left')
  axes[1].set_xticks(x, fams)
  paths = [common.save(fig, folder, 'accuracy.png')]
  with open(os.path.join(folder, 'result.json'), 'w') as f:
    json.dump({'table': t, 'answers': {n: v['answers'] for n, v in result['variants'].items()},
               'base_answers': result['base_answers'], 'prompts': result['prompts']}, f,
              indent=1)
  return paths


def main(argv):
  del argv
  common.main(NAME, run, report, plot)


if __name__ == '__main__':
  app.run(main)
