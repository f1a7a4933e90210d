"""How much does an Approach 3 interval's width move with the bootstrap's own draws?

    python -m benchmarks.interval_noise --out=DIR LABEL=results.csv [LABEL=results.csv ...]

A sweep reports the 95% interval of a from `sweep.bootstrap` resamples (200 in the exponent
sweeps) drawn with seed 0. Its 2.5 and 97.5 percentiles rest on the five most extreme resamples
on each side, so another seed gives another width. For each results table this refits Approach 3
once, then draws the interval --repeats times with seeds 0, 1, ... at --bootstrap resamples each
(the spread of widths a sweep could have reported), and once more from --large resamples (the
width the sweep's resampling scheme converges to). Same fit, same seed-noise perturbation and same
loss column as the sweep's own fit. Writes table.md and result.json to --out.
"""
import json
import os
import time

from absl import app
from absl import flags
import numpy as np
from threadpoolctl import threadpool_limits

from lm.scaling import chinchilla
from lm.scaling import fit as fit_lib
from lm.scaling import numerics

FLAGS = flags.FLAGS
flags.DEFINE_integer('bootstrap', 200, 'Resamples per interval (the sweeps use sweep.bootstrap = 200).')
flags.DEFINE_integer('repeats', 10, 'Intervals per table, with bootstrap seeds 0, 1, ...')
flags.DEFINE_integer('large', 2000, 'Resamples of one more interval per table (0: none).')
flags.DEFINE_string('loss_key', 'eval_loss', 'The loss column the sweeps fit.')
flags.DEFINE_string('out', 'runs/interval_noise', 'Output folder.')


def _width(ci):
  lo, hi = ci['a']
  return hi - lo


def measure(path: str, repeats: int, n_boot: int, large: int) -> dict:
  rows = fit_lib.read_results(path, loss_key=FLAGS.loss_key)
  N, D, L, _, _, _ = fit_lib.columns_of(rows, FLAGS.loss_key, 'params', 'flops', 'tokens')
  law = chinchilla.fit_approach3(N, D, L)
  if law['a'] is None:
    raise SystemExit(f'{path}: Approach 3 gives no exponent (a fitted alpha or beta is not '
                     'positive), so there is no interval to measure; pass a sweep whose fit has one.')
  noise = numerics.seed_noise(rows, FLAGS.loss_key, 'params', 'tokens')
  sigma = noise['std_log_loss'] if noise else 0.0
  out = {'results': path, 'runs': len(rows), 'a': law['a'], 'noise_std': sigma, 'intervals': []}
  t0 = time.perf_counter()
  for seed in range(repeats):
    ci = chinchilla.bootstrap_approach3(N, D, L, law['theta'], n_boot=n_boot, seed=seed,
                                        noise_std=sigma)
    out['intervals'].append({'seed': seed, 'a': ci['a'], 'width': _width(ci), 'n_used': ci['n_used']})
    print(f'{path}: seed {seed}: width {_width(ci):.3f} ({ci["a"][0]:.3f}-{ci["a"][1]:.3f})',
          flush=True)
  widths = np.array([r['width'] for r in out['intervals']])
  out.update(width_mean=float(widths.mean()), width_std=float(widths.std(ddof=1)) if repeats > 1
             else None, width_min=float(widths.min()), width_max=float(widths.max()))
  if large:
    ci = chinchilla.bootstrap_approach3(N, D, L, law['theta'], n_boot=large, seed=repeats,
                                        noise_std=sigma)
    out['large'] = {'n_boot': large, 'seed': repeats, 'a': ci['a'], 'width': _width(ci),
                    'n_used': ci['n_used']}
    print(f'{path}: {large} resamples: width {_width(ci):.3f}', flush=True)
  out['seconds'] = time.perf_counter() - t0
  return out


def main(argv):
  pairs = [a.split('=', 1) for a in argv[1:]]
  if not pairs or any(len(p) != 2 or not p[0] for p in pairs):
    raise SystemExit('name each table as LABEL=path/to/results.csv, e.g. '
                     'SP=docs/results/exponent_one_aspect/results.csv')
  for _, path in pairs:
    if not os.path.isfile(path):
      raise SystemExit(f'{path} does not exist; pass the results.csv of a finished sweep.')
  with threadpool_limits(limits=1, user_api='blas'):
    result = {label: measure(path, FLAGS.repeats, FLAGS.bootstrap, FLAGS.large)
              for label, path in pairs}
  os.makedirs(FLAGS.out, exist_ok=True)
  with open(os.path.join(FLAGS.out, 'result.json'), 'w') as f:
    json.dump({'bootstrap': FLAGS.bootstrap, 'repeats': FLAGS.repeats, 'tables': result}, f, indent=1)
  lines = [f'Approach 3 interval width of a: {FLAGS.repeats} bootstrap seeds at {FLAGS.bootstrap} '
           f'resamples each, and one interval from {FLAGS.large} resamples.', '',
           '| table | runs | a | seed noise | width, seed 0 | mean ± std over seeds | min-max | '
           f'width, {FLAGS.large} resamples |', '|---|---|---|---|---|---|---|---|']
  for label, r in result.items():
    std = f" ± {r['width_std']:.3f}" if r['width_std'] is not None else ''
    big = f"{r['large']['width']:.3f}" if 'large' in r else '-'
    lines.append(f"| {label} | {r['runs']} | {r['a']:.3f} | {100 * r['noise_std']:.2f}% | "
                 f"{r['intervals'][0]['width']:.3f} | {r['width_mean']:.3f}{std} | "
                 f"{r['width_min']:.3f}-{r['width_max']:.3f} | {big} |")
  with open(os.path.join(FLAGS.out, 'table.md'), 'w') as f:
    f.write('\n'.join(lines) + '\n')
  print('\n'.join(lines))


if __name__ == '__main__':
  app.run(main)
