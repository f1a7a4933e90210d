"""RLHF, DPO and best-of-n against a gold reward: what preference learning buys, and what it costs.

  python -m experiments.rlhf [--runs=runs/rlhf] [--base=PRETRAINED_RUN] [--kl_coefs=0.2,0.05,0.01]

The task (lm/data/code_task.py): given a Python function header from the standard library, write
its first statement. A program judges every answer (parses, does something, reads an argument:
gold reward 0 to 1), so every number below is checked rather than guessed. The stages, each an
ordinary workdir under --runs (a rerun skips what is finished and resumes what was interrupted):

  1. the base: a 4-layer byte model pretrained on the standard library (configs/pretrain_small.py);
  2. SFT on (header, first statement) pairs (configs/sft_code.py);
  3. preference pairs sampled from the SFT model, labelled by the gold program with 10% of the
     labels flipped (raters disagree), and a reward model trained on them (configs/reward.py);
  4. DPO on the same pairs (configs/dpo.py), then a second round on pairs sampled from the first
     round's policy and labelled the same way, with the chosen responses' NLL added to the loss
     (iterative RPO; configs/dpo.py:round2; --dpo_rounds);
  5. PPO against the reward model at a few KL coefficients, a weak one included (configs/ppo.py);
  6. best-of-n sampling from the SFT model with the reward model, n = 1 .. 16.

Every policy is then sampled on the same held-out headers: its mean gold reward, the reward
model's (proxy) score, and its KL to the SFT model. The picture to look at is proxy and gold
against KL along the PPO runs: where the proxy keeps rising and gold does not, the policy is
exploiting the reward model's mistakes rather than getting better (reward hacking; Gao et al.
2023 measure the same shape at scale).
"""
import json
import os
import time

from absl import app
from absl import flags

from experiments import common

NAME = 'rlhf'
_KL = flags.DEFINE_string('kl_coefs', '0.2,0.05,0.01', 'PPO KL coefficients, comma-separated.')
_EVAL_PROMPTS = flags.DEFINE_integer('eval_prompts', 0, 'Held-out headers every policy is '
                                     'sampled on (0: all 590).')
_EVAL_SAMPLES = flags.DEFINE_integer('eval_samples', 4, 'Samples per held-out header.')
_DPO_ROUNDS = flags.DEFINE_integer('dpo_rounds', 2, 'DPO rounds: the first on the reward '
                                   "model's pairs, each later one on its starting policy's own "
                                   'samples (iterative DPO).')
BEST_OF = (1, 2, 4, 8, 16)


def _set(cfg, dotted: str, value):
  *path, key = dotted.split('.')
  for p in path:
    cfg = cfg[p]
  cfg[key] = value


def _configure(cfg, overrides):
  for k, v in (overrides or {}).items():
    _set(cfg, k, v)
  return cfg


def run(runs_dir=None, base_dir=None, kl_coefs=None, overrides=None, eval_prompts=None,
        best_of=BEST_OF, eval_samples=None, dpo_rounds=None):
  """Runs (or reuses) every stage, then evaluates every policy on the same held-out prompts.

  overrides: {stage: {dotted config key: value}} for the stages 'pretrain', 'sft', 'reward',
  'dpo' (also the later rounds, unless 'dpo_round2' is given) and 'ppo'.
  """
  from configs import dpo as dpo_cfg, ppo as ppo_cfg, pretrain_small, reward as reward_cfg
  from configs import sft_code
  from lm.stages import finetune as ft
  from lm.stages import pretrain as train_lib
  from lm.align import dpo, ppo, reward
  parsed = flags.FLAGS.is_parsed()
  runs_dir = common.runs_dir(NAME, runs_dir)
  kl_coefs = kl_coefs or tuple(float(x) for x in _KL.value.split(','))
  eval_prompts = eval_prompts or (_EVAL_PROMPTS.value if parsed else 0)
  eval_samples = eval_samples or (_EVAL_SAMPLES.value if parsed else 4)
  dpo_rounds = dpo_rounds or (_DPO_ROUNDS.value if parsed else 2)
  base_dir = common.base_run(base_dir)
  overrides = overrides or {}
  wall = {}

  def stage(name, fn, *args):
    print(f'{name} ...', flush=True)
    t0 = time.time()
    summary = fn(*args)
    if not summary.get('finished'):
      raise SystemExit(f'{name} was stopped; rerun to resume.')
    wall[name] = time.time() - t0
    return summary

  if not base_dir:
    base_dir = os.path.join(runs_dir, 'base')
    stage('pretraining the base', train_lib.train,
          _configure(pretrain_small.get_config(), overrides.get('pretrain')), base_dir)
  sft_dir, rm_dir = os.path.join(runs_dir, 'sft'), os.path.join(runs_dir, 'rm')
  cfg = _configure(sft_code.get_config(), overrides.get('sft'))
  cfg.finetune.init_from = base_dir
  stage('sft', ft.finetune, cfg, sft_dir)
  cfg = _configure(reward_cfg.get_config(), overrides.get('reward'))
  cfg.reward.init_from = sft_dir
  stage('reward', reward.train_reward, cfg, rm_dir)
  dpo_dirs = {}
  for rnd in range(1, dpo_rounds + 1):
    # Round 1 learns from the reward model's pairs (the SFT model's samples); every later round
    # from its starting policy's own samples, gold-labelled with the same noise (iterative DPO).
    cfg = _configure(dpo_cfg.get_config('' if rnd == 1 else 'round2'),
                     overrides.get('dpo' if rnd == 1 else 'dpo_round2', overrides.get('dpo')))
    cfg.dpo.reward_from = rm_dir
    cfg.dpo.eval_pairs = os.path.join(rm_dir, reward.EVAL_PAIRS)
    if rnd == 1:
      cfg.dpo.init_from, cfg.dpo.pairs = sft_dir, os.path.join(rm_dir, reward.PAIRS)
    else:
      cfg.dpo.init_from, cfg.dpo.pairs = dpo_dirs[rnd - 1], ''
    dpo_dirs[rnd] = os.path.join(runs_dir, 'dpo' if rnd == 1 else f'dpo_round{rnd}')
    stage('dpo' if rnd == 1 else f'dpo round {rnd}', dpo.train_dpo, cfg, dpo_dirs[rnd])
  ppo_dirs = {}
  for beta in kl_coefs:
    cfg = _configure(ppo_cfg.get_config(), overrides.get('ppo'))
    cfg.ppo.init_from, cfg.ppo.reward_from, cfg.ppo.kl_coef = sft_dir, rm_dir, beta
    ppo_dirs[beta] = os.path.join(runs_dir, f'ppo_kl{beta:g}')
    stage(f'ppo kl_coef={beta:g}', ppo.train_ppo, cfg, ppo_dirs[beta])

  pcfg = _configure(ppo_cfg.get_config(), overrides.get('ppo'))
  named = {('dpo' if r == 1 else f'dpo round {r}'): d for r, d in dpo_dirs.items()}
  named.update({f'ppo kl={beta:g}': d for beta, d in ppo_dirs.items()})
  result = evaluate_policies(sft_dir, rm_dir, named, eval_prompts, eval_samples, best_of,
                             pcfg.train.seq_len, pcfg.ppo.max_new_tokens, pcfg.ppo.temperature,
                             pcfg.ppo.sample_batch)
  result['wall_s'] = wall
  return result


def evaluate_policies(sft_dir, rm_dir, policies: dict, eval_prompts: int, eval_samples: int,
                      best_of=BEST_OF, seq_len: int = 128, max_new_tokens: int = 48,
                      temperature: float = 1.0, batch: int = 128) -> dict:
  """Every policy (name -> finished DPO or PPO run) and best-of-n from the SFT model, sampled on
  the same held-out headers with the same settings: gold and proxy reward and KL to the SFT model;
  the PPO runs' evaluation rows give the proxy and gold against KL curves."""
  from lm.align import common as al, reward
  sft = al.load_policy(sft_dir)
  rm = reward.load(rm_dir)
  headers = al.task_prompts('eval', eval_prompts)
  ev = al.Evaluator(headers, sft, rm, seq_len, max_new_tokens, temperature, batch,
                    samples=eval_samples, seed=999)
  print(f'evaluating every policy on the same {len(headers)} held-out prompts x {eval_samples} '
        'samples ...', flush=True)
  rows = {'sft': ev.evaluate(sft.params, prefix='')}
  for name, d in policies.items():
    rows[name] = ev.evaluate(al.load_policy(d).params, prefix='')
  bon = al.best_of_n(sft, rm, headers, best_of, seq_len, max_new_tokens, temperature, batch)
  for n, r in bon.items():
    rows[f'best-of-{n}'] = r
  curves = {}
  for name, d in policies.items():
    if not name.startswith('ppo kl='):
      continue
    evals = [r for r in _read_jsonl(os.path.join(d, 'metrics.jsonl')) if 'eval_gold' in r]
    curves[name[len('ppo kl='):]] = [{'step': 0, 'kl': 0.0, 'gold': rows['sft']['gold'],
                                      'proxy': rows['sft']['proxy']}] + [
        {'step': r['step'], 'kl': r['eval_kl'], 'gold': r['eval_gold'],
         'proxy': r['eval_proxy']} for r in evals]
  rm_summary = al.read_json(os.path.join(rm_dir, 'summary.json'))
  return {'rows': rows, 'curves': curves, 'wall_s': {}, 'reward_model': rm_summary['reward'],
          'eval_prompts': len(headers), 'eval_samples': eval_samples, 'best_of': list(best_of),
          'runs': {'sft': os.path.abspath(sft_dir), 'reward_model': os.path.abspath(rm_dir),
                   **{k: os.path.abspath(v) for k, v in policies.items()}}}


def _read_jsonl(path):
  with open(path) as f:
    return [json.loads(line) for line in f if line.strip()]


def gap_closed(gold: float, sft_gold: float, best: float = 1.0) -> float:
  """The share of the gap between the SFT model's gold reward and the best possible closed."""
  return (gold - sft_gold) / (best - sft_gold) if best > sft_gold else float('nan')


def report(result):
  rows = result['rows']
  sft_gold = rows['sft']['gold']
  rm = result['reward_model']
  print(f"\nreward model: held-out pair accuracy {rm['eval_accuracy']:.1%} against gold labels "
        f"({rm['eval_pairs']} pairs; {rm['train_pairs']} training pairs, "
        f"{rm['train_flipped']} labels flipped)")
  print(f"\n{result['eval_prompts']} held-out prompts x {result['eval_samples']} samples "
        '(best-of-n: one pick per prompt)')
  print(f"{'policy':14s}{'gold':>8s}{'proxy':>8s}{'KL (nats)':>11s}{'gap closed':>12s}")
  for name, r in rows.items():
    print(f"{name:14s}{r['gold']:8.3f}{r['proxy']:8.2f}{r['kl']:11.2f}"
          f"{gap_closed(r['gold'], sft_gold):12.0%}")
  print('\nwall time per stage (s): ' + ', '.join(f'{k} {v:.0f}'
                                                  for k, v in result['wall_s'].items()))


def plot(result, folder):
  import matplotlib.pyplot as plt
  fig, axes = plt.subplots(1, 2, figsize=(12, 4.5), sharex=True)
  colors = plt.rcParams['axes.prop_cycle'].by_key()['color']
  rows = result['rows']
  for i, (beta, pts) in enumerate(result['curves'].items()):
    kl = [p['kl'] for p in pts]
    c = colors[i % len(colors)]
    axes[0].plot(kl, [p['proxy'] for p in pts], 'o-', color=c, label=f'PPO kl_coef={beta}')
    axes[1].plot(kl, [p['gold'] for p in pts], 'o-', color=c, label=f'PPO kl_coef={beta}')
  bon = [rows[f'best-of-{n}'] for n in result['best_of']]
  for ax, key in ((axes[0], 'proxy'), (axes[1], 'gold')):
    ax.plot([r['kl'] for r in bon], [r[key] for r in bon], 's--', color='gray',
            label='best-of-n (n = ' + ', '.join(map(str, result['best_of'])) + ')')
    for j, name in enumerate(n for n in rows if n.startswith('dpo')):
      ax.plot([rows[name]['kl']], [rows[name][key]], '*P'[j % 2], ms=14 - 3 * (j % 2),
              color='black' if j == 0 else 'dimgray', label=name.replace('dpo', 'DPO'))
    ax.set_xlabel('KL to the SFT model (nats)')
  axes[0].set(ylabel='reward model score (normalised)', title='proxy reward')
  axes[1].set(ylabel='gold reward (0 to 1)', title='gold reward (the program)')
  axes[1].axhline(1.0, color='gray', lw=0.5)
  axes[0].legend(fontsize=8)
  paths = [common.save(fig, folder, 'reward_vs_kl.png')]
  with open(os.path.join(folder, 'result.json'), 'w') as f:
    json.dump(result, f, indent=1)
  return paths


def main(argv):
  del argv
  common.main(NAME, run, report, plot)


if __name__ == '__main__':
  app.run(main)
