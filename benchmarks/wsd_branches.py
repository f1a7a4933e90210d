"""Do WSD branches give the losses of full runs? python -m benchmarks.wsd_branches [--out=DIR]

Approach 1 wants, per model size, the loss a run of each length reaches. sweep.mode=wsd gets them
as cooldown branches of one constant-learning-rate trunk per size (Hägele et al. 2024); this
script checks that claim on this codebase: the same sizes and token counts are trained twice,
as a WSD sweep (branches) and as a grid sweep of independent cosine runs, and the final
evaluation losses are compared run by run, with the compute each sweep spent. Results go to
--out (default runs/wsd_branches): table.md, result.json, and both sweep folders.
"""
import json
import os
import time

from absl import app
from absl import flags
from absl import logging

FLAGS = flags.FLAGS
flags.DEFINE_string('out', 'runs/wsd_branches', 'Output folder.')
flags.DEFINE_string('params', '3e4,1.5e5', 'Target model sizes N, comma-separated.')
flags.DEFINE_string('tokens', '5e5,1e6,2e6', 'Token counts D, comma-separated.')
flags.DEFINE_float('cooldown', 0.2, 'WSD cooldown share.')


def _sweep_config(mode: str, params, tokens, cooldown):
  from configs import sweep_smoke
  c = sweep_smoke.get_config()
  s = c.sweep
  s.mode, s.grid_params, s.grid_tokens, s.cooldown = mode, tuple(params), tuple(tokens), cooldown
  s.evals_per_run = 1
  c.base.train.progress = 'none'
  return c


def main(argv):
  del argv
  logging.set_verbosity(logging.WARNING)   # orbax's INFO lines would bury the sweeps' progress
  from lm.scaling import plan as plan_lib
  from lm.scaling import sweep as sweep_lib
  params = [float(x) for x in FLAGS.params.split(',')]
  tokens = [float(x) for x in FLAGS.tokens.split(',')]
  results = {}
  for mode in ('wsd', 'grid'):
    cfg = _sweep_config(mode, params, tokens, FLAGS.cooldown)
    t0 = time.time()
    sweep_lib.run_sweep(cfg, os.path.join(FLAGS.out, mode), fit=False)
    results[mode] = {'wall_s': time.time() - t0, 'runs': {}}
    plan = plan_lib.plan(cfg.sweep, cfg.base, _vocab(cfg))
    spent = 0.0
    for sp in plan:
      with open(os.path.join(FLAGS.out, mode, 'runs', sp.name, 'summary.json')) as f:
        summary = json.load(f)
      results[mode]['runs'][sp.name] = {'params': summary['params'], 'tokens': summary['tokens'],
                                        'eval_loss': summary['eval_loss']}
      spent += (plan_lib.trained_steps(sp) / sp.steps) * summary['flops']
    results[mode]['flops_spent'] = spent
  lines = ['| run | N | D | WSD branch loss | cosine run loss | difference |', '|---|---|---|---|---|---|']
  diffs = []
  for name, w in results['wsd']['runs'].items():
    c = results['grid']['runs'][name]
    d = w['eval_loss'] / c['eval_loss'] - 1
    diffs.append(d)
    lines.append(f"| {name} | {w['params']:,} | {w['tokens']:,} | {w['eval_loss']:.4f} | "
                 f"{c['eval_loss']:.4f} | {d:+.2%} |")
  ws, gs = results['wsd'], results['grid']
  lines += ['', f'Mean difference {sum(diffs) / len(diffs):+.2%}, largest '
            f'{max(diffs, key=abs):+.2%}. Compute spent: WSD {ws["flops_spent"]:.3g} FLOPs in '
            f'{ws["wall_s"]:.0f} s, cosine grid {gs["flops_spent"]:.3g} FLOPs in {gs["wall_s"]:.0f} s '
            f'({ws["flops_spent"] / gs["flops_spent"]:.0%} of the compute).']
  os.makedirs(FLAGS.out, exist_ok=True)
  with open(os.path.join(FLAGS.out, 'table.md'), 'w') as f:
    f.write('\n'.join(lines) + '\n')
  with open(os.path.join(FLAGS.out, 'result.json'), 'w') as f:
    json.dump(results, f, indent=1)
  print('\n'.join(lines))


def _vocab(cfg):
  from lm.data import tokens as data_lib
  return data_lib.prepare(data_lib.DataConfig.from_config(cfg.base.data)).tokenizer.vocab_size


if __name__ == '__main__':
  app.run(main)
