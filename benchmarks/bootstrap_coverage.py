"""Do the Approach 3 bootstrap intervals cover the truth 95% of the time?

    python -m benchmarks.bootstrap_coverage [--results=CSV] [--replicates=40] [--out=DIR]

Synthetic sweeps with a known law: the design (sizes, token counts, seed repeats) of a real
results.csv, losses drawn from the law fitted to it, times lognormal noise of two kinds:
  seed:   every run its own draw, std --seed_noise (what two seeds of one point differ by);
  point:  one draw per design point, shared by its seeds, std --point_noise (a point's misfit to
          the law: its shape, its batch), 0 to leave it out.
Each replicate is fitted (lm.scaling.chinchilla.fit_approach3) and bootstrapped four ways: over runs or
over design points (seeds drawn together), each with and without every resampled loss perturbed
again by the seed noise. A method is calibrated when the true a lies inside its 95% interval in
about 95% of the replicates; wider than that, its intervals overstate the uncertainty. Writes
table.md and result.json to --out.
"""
import json
import os
import time

from absl import app
from absl import flags
import numpy as np

FLAGS = flags.FLAGS
flags.DEFINE_string('results', 'docs/results/exponent_wsd/seeds2/results.csv',
                    'A results.csv whose design (params, tokens, seeds) the synthetic sweeps copy.')
flags.DEFINE_integer('replicates', 40, 'Synthetic sweeps per scenario.')
flags.DEFINE_integer('bootstrap', 100, 'Resamples per interval.')
flags.DEFINE_float('seed_noise', -1.0, 'Std of log loss per run; < 0: the one measured in --results.')
flags.DEFINE_float('point_noise', 0.01, 'Std of log loss shared by the seeds of a design point.')
flags.DEFINE_string('out', 'runs/bootstrap_coverage', 'Output folder.')

METHODS = (('runs', False, False), ('runs + seed noise', False, True),
           ('design points', True, False), ('design points + seed noise', True, True))


def main(argv):
  del argv
  from lm.scaling import chinchilla, numerics
  from lm.scaling import fit as fit_lib
  rows = fit_lib.read_results(FLAGS.results, loss_key='loss')
  N, D, L = (np.array([r[k] for r in rows]) for k in ('params', 'tokens', 'loss'))
  truth = chinchilla.fit_approach3(N, D, L)
  noise = numerics.seed_noise(rows)
  sigma = FLAGS.seed_noise if FLAGS.seed_noise >= 0 else (noise['std_log_loss'] if noise else 0.01)
  groups = numerics.design_points(N, D)
  points = sorted(set(groups))
  law = numerics.predict_loss(truth, N, D)
  print(f'design: {len(L)} runs at {len(points)} points; true a = {truth["a"]:.4f}; '
        f'seed noise {sigma:.4f}, point noise {FLAGS.point_noise:.4f}', flush=True)
  scenarios = [('seed noise only', 0.0)] + (
      [('seed and point noise', FLAGS.point_noise)] if FLAGS.point_noise > 0 else [])
  rng = np.random.default_rng(0)
  result = {'results': FLAGS.results, 'true_a': truth['a'], 'seed_noise': sigma,
            'replicates': FLAGS.replicates, 'bootstrap': FLAGS.bootstrap, 'scenarios': {}}
  t0 = time.time()
  for name, point_sd in scenarios:
    stats = {m[0]: {'covered': 0, 'widths': [], 'used': 0} for m in METHODS}
    point_a = []
    for rep in range(FLAGS.replicates):
      shift = dict(zip(points, rng.normal(0.0, point_sd, len(points))))
      y = law * np.exp(rng.normal(0.0, sigma, len(L)) + np.array([shift[g] for g in groups]))
      fit = chinchilla.fit_approach3(N, D, y)
      if fit['a'] is None:
        continue
      point_a.append(fit['a'])
      for label, by_point, add_noise in METHODS:
        ci = chinchilla.bootstrap_approach3(N, D, y, fit['theta'], n_boot=FLAGS.bootstrap, seed=rep,
                                            noise_std=sigma if add_noise else 0.0,
                                            groups=groups if by_point else None)
        if ci['a'] is None:
          continue
        lo, hi = ci['a']
        s = stats[label]
        s['used'] += 1
        s['covered'] += int(lo <= truth['a'] <= hi)
        s['widths'].append(hi - lo)
      print(f'{name}: replicate {rep + 1}/{FLAGS.replicates}, {time.time() - t0:.0f} s', flush=True)
    result['scenarios'][name] = {
        'point_noise': point_sd,
        'std_of_a_across_replicates': float(np.std(point_a)),
        'methods': {k: {'coverage': v['covered'] / max(v['used'], 1), 'replicates': v['used'],
                        'median_width': float(np.median(v['widths'])) if v['widths'] else None}
                    for k, v in stats.items()}}
  result['seconds'] = time.time() - t0
  os.makedirs(FLAGS.out, exist_ok=True)
  with open(os.path.join(FLAGS.out, 'result.json'), 'w') as f:
    json.dump(result, f, indent=1)
  lines = [f'True a = {truth["a"]:.4f}; seed noise (std of log loss) {sigma:.4f}; '
           f'{FLAGS.replicates} replicates, {FLAGS.bootstrap} resamples each; design of '
           f'{FLAGS.results} ({len(L)} runs, {len(points)} points).', '',
           '| scenario | std of fitted a across replicates | method | coverage of the 95% interval '
           '| median width |', '|---|---|---|---|---|']
  for name, sc in result['scenarios'].items():
    for k, m in sc['methods'].items():
      w = m['median_width']
      lines.append(f"| {name} | {sc['std_of_a_across_replicates']:.4f} | {k} | "
                   f"{m['coverage']:.0%} ({m['replicates']}) | {w:.3f} |" if w is not None else
                   f"| {name} | | {k} | no interval | |")
  table = '\n'.join(lines) + '\n'
  with open(os.path.join(FLAGS.out, 'table.md'), 'w') as f:
    f.write(table)
  print(table)


if __name__ == '__main__':
  app.run(main)
