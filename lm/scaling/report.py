"""report.md: the fitted numbers next to the published ones, the held-out error, the figures and caveats."""

import json
from pathlib import Path

from lm.metrics import write_json_atomic
from lm.scaling import chinchilla
from lm.scaling import fit as fitlib
from lm.scaling import plot
from lm.scaling.plot import FILES

# Hoffmann et al. 2022 (arXiv:2203.15556): Table 2 exponents and the Approach-3 law of Section 3.3.
CHINCHILLA = {'E': 1.69, 'A': 406.4, 'B': 410.7, 'alpha': 0.34, 'beta': 0.28,
              'a1': 0.50, 'a2': 0.49, 'a3': 0.46, 'tokens_per_param': 20}
# Besiroglu et al. 2024 (arXiv:2404.10102): refit of the paper's own data with the summed Huber loss.
EPOCH = {'E': 1.817, 'A': 482, 'B': 2085, 'alpha': 0.348, 'beta': 0.366, 'a3': 0.51}
# Kaplan et al. 2020 (arXiv:2001.08361): N_opt ∝ C^0.73 and the L(N), L(D), L(C_min) exponents.
KAPLAN = {'a': 0.73, 'alpha_N': 0.076, 'alpha_D': 0.095, 'alpha_C': 0.050}


def _num(v, digits=4):
  if v is None:
    return '–'
  if abs(v) >= 1e5 or (v != 0 and abs(v) < 1e-3):
    return f'{v:.3e}'
  if abs(v) >= 100:
    return f'{v:.0f}'
  return f'{v:.{digits}g}'


def _ci(ci, key):
  if not ci or ci.get(key) is None:
    return ''
  lo, hi = ci[key]
  return f' ({_num(lo, 3)}–{_num(hi, 3)})'


def _tpp(points):
  """Tokens per parameter per budget; a range when there are too many budgets to list."""
  if len(points) <= 5:
    return ', '.join(f'{_num(p["tokens_per_param"], 3)} at C = {p["C"]:.2g}' for p in points)
  v = [p['tokens_per_param'] for p in points]
  return (f'{_num(min(v), 3)}–{_num(max(v), 3)} over C = {points[0]["C"]:.2g}–{points[-1]["C"]:.2g} '
          f'({len(points)} budgets; fit.json lists each)')


def _row(name, ours, chin='', epoch='', kaplan=''):
  return f'| {name} | {ours} | {chin} | {epoch} | {kaplan} |'


def verdict(fit) -> str:
  """The report's first paragraph, in plain words: does this sweep pin the exponent a?"""
  a3, a2 = fit['approach3'], fit['approach2']
  budgets = sorted({b['C'] for b in a2['budgets']} | {b['C'] for b in a2['skipped_budgets']})
  span = budgets[-1] / budgets[0] if len(budgets) > 1 else 1.0
  c = lambda x: f'{x:.2g}'.replace('e+', 'e')
  where = (f'{len(budgets)} budgets from {c(budgets[0])} to {c(budgets[-1])} FLOPs (a factor '
           f'{span:.3g})' if len(budgets) > 1 else 'one budget' if budgets else
           'no IsoFLOP budget')
  ci = (a3.get('ci') or {}).get('a')
  held = fit.get('heldout')
  held_text = (f' A fit without the largest budget predicts its runs within '
               f'{100 * held["mean_rel_error"]:.1f}% on average.' if held else '')
  if a3['a'] is None:
    return (f'**These runs do not give an exponent.** They cover {where}, and the fitted law has '
            'no positive α or β: more runs over a wider range of compute are needed.' + held_text)
  outside = [b['C'] for b in a2['budgets'] if not b['minimum_inside_grid']]
  grid = ('' if not outside else ' The IsoFLOP minimum of C = '
          + ', '.join(c(x) for x in outside) + ' lies outside its size grid, so its '
          'optimum is a guess from the edge.')
  if ci is None or ci[1] - ci[0] > 0.3:
    both = ci is not None and ci[0] <= 0.5 and ci[1] >= 0.73
    width = (f'the 95% interval for a runs from {ci[0]:.2f} to {ci[1]:.2f}'
             + (', which holds Chinchilla\'s value (about 0.5) and Kaplan\'s (0.73) alike'
                if both else ', wider than 0.3') if ci else
             'no interval was computed (sweep.bootstrap = 0)')
    if span < 30:
      advice = ('Budgets spread over a factor 30 or more narrow it (configs/sweep_exponent.py; its '
                'measured result is in docs/results/exponent_cpu).')
    else:
      advice = ('The budgets already span a factor 30, so what narrows it now is less noise per '
                'point (more seeds, larger runs) or a still wider range of compute.')
    return (f'**These runs do not pin the exponent.** They cover {where}, and {width}. The point '
            f'value a = {a3["a"]:.3f} is therefore no sign of disagreeing with Chinchilla: it is '
            'what a few small, noisy runs allow. ' + advice + grid + held_text)
  return (f'**N_opt grows as C^a with a = {a3["a"]:.3f} (95% interval {ci[0]:.2f}–{ci[1]:.2f})**, '
          f'from {where}; Chinchilla found about 0.5 (0.46 by its Approach 3, 0.51 in Epoch\'s '
          'refit).' + grid + held_text)


def write_report(fit, workdir):
  """Write workdir/report.md and return its path."""
  workdir = Path(workdir)
  lines = (_header(fit) + _table_rows(fit) + _heldout_section(fit) + _minutes_section(workdir, fit)
           + _figures_section(workdir) + _notes_section(fit))
  notes = _caveats(fit)
  if notes:
    lines += [''] + [f'- {n}' for n in notes]
  path = workdir / 'report.md'
  path.write_text('\n'.join(lines) + '\n')
  return str(path)


def _header(fit) -> list[str]:
  """The title, the verdict, how the runs are counted and fitted, and the table's head."""
  a3 = fit['approach3']
  return ['# Scaling-law fit', '', verdict(fit), '',
          f'{fit["n_runs"]} runs; parameters counted as **{fit["params_convention"]}**, FLOPs as '
          f'**{fit["flops_convention"]}** (k = C/(N·D) = {_num(a3["flops_per_ND"])}); Approach 3 loss: '
          f'{a3["loss_function"]}, L-BFGS-B from the best {a3["n_starts"]} of the 4500 grid starts of '
          'Hoffmann et al. 2022. Intervals are 95% bootstrap percentiles over runs.', '',
          '| quantity | this fit (95% CI) | Chinchilla (Hoffmann et al. 2022) | Epoch refit (Besiroglu et al. 2024) '
          '| Kaplan et al. 2020 |',
          '|---|---|---|---|---|']


def _table_rows(fit) -> list[str]:
  """The table: this fit's numbers next to Chinchilla's, Epoch's and Kaplan's."""
  a3, a2, a1, ka = fit['approach3'], fit['approach2'], fit.get('approach1'), fit['kaplan']
  ci = a3.get('ci')
  lines = []
  for key in ('E', 'A', 'B', 'alpha', 'beta'):
    lines.append(_row(f'{key} (Approach 3)', _num(a3[key]) + _ci(ci, key), CHINCHILLA[key], EPOCH[key]))
  lines.append(_row('a = β/(α+β) (Approach 3)', _num(a3['a']) + _ci(ci, 'a'), CHINCHILLA['a3'], EPOCH['a3'],
                    f'{KAPLAN["a"]} (N_opt ∝ C^a)'))
  kl = a3.get('flops_per_ND_law')
  if kl and a3.get('a_this_count') is not None and abs(kl['slope']) > 1e-6:
    lines.append(_row(f'slope of N_opt in this C (k ∝ N^{kl["slope"]:.3f})', _num(a3['a_this_count']), ''))
  other = a3.get('a_other_params')
  if other and other.get('a') is not None:
    lines.append(_row(f'a with {other["convention"]} parameters (Approach 3, same runs)',
                      _num(other['a']), ''))
  a2_ci = f' ({_num(a2["a_ci"][0], 3)}–{_num(a2["a_ci"][1], 3)})' if a2.get('a_ci') else ''
  lines.append(_row('a (Approach 2, IsoFLOP)', _num(a2['a']) + a2_ci, CHINCHILLA['a2']))
  b2_ci = f' ({_num(a2["b_ci"][0], 3)}–{_num(a2["b_ci"][1], 3)})' if a2.get('b_ci') else ''
  lines.append(_row('b (Approach 2, IsoFLOP)', _num(a2['b']) + b2_ci, 0.51))
  if a1:
    lines.append(_row('a (Approach 1, envelope)', _num(a1['a']), CHINCHILLA['a1']))
  tpp = fit['tokens_per_param_at_optimum']
  for name in ('approach3', 'approach2'):
    if tpp[name]:
      lines.append(_row(f'tokens/param at optimum ({name.replace("approach", "Approach ")})', _tpp(tpp[name]),
                        f'~{CHINCHILLA["tokens_per_param"]}'))
  for key, name, kkey in (('L_N', 'α_N in L(N) = (N_c/N)^α_N', 'alpha_N'),
                          ('L_D', 'α_D in L(D) = (D_c/D)^α_D', 'alpha_D'),
                          ('L_C', 'α_C in L(C) = (C_c/C)^α_C', 'alpha_C')):
    law = ka.get(key)
    lines.append(_row(name, _num(law[kkey]) if law else '–', '', '', KAPLAN[kkey]))
  lines.append(_row('a from the final-loss frontier (Kaplan-style)', _num(ka.get('frontier_N_opt_exponent')), '', '',
                    KAPLAN['a']))
  return lines


def _heldout_section(fit) -> list[str]:
  lines = ['', '## Held-out check', '']
  held = fit.get('heldout')
  if held:
    lines.append(f'Approach 3 fit on {held["n_train"]} runs without the largest budget (C = {held["heldout_C"]:.3g}) '
                 f'predicts its {held["n_test"]} runs with mean absolute error {held["mean_abs_error"]:.4f} nats '
                 f'({100 * held["mean_rel_error"]:.2f}% relative; worst {held["max_abs_error"]:.4f})'
                 + (f'; {held["n_unused"]} run(s) above that budget are unused.' if held['n_unused'] else '.'))
  else:
    lines.append('Not run: it needs at least two budgets and five runs below the largest one.')
  return lines


def _minutes_section(workdir: Path, fit=None) -> list[str]:
  """What the span of compute chosen by --minutes (DIR/minutes_plan.json) can and cannot pin;
  nothing when the fitted runs are not that plan's (the folder swept again without --minutes)."""
  try:
    plan = json.loads((workdir / 'minutes_plan.json').read_text())
    budgets, minutes = [float(b) for b in plan['budgets']], float(plan['minutes'])
    rates = [float(m['flops_per_s']) for m in plan['measured']]
    predicted = float(plan['predicted_s']['total_s']) / 60
  except (OSError, ValueError, KeyError, TypeError):
    return []
  if fit is not None:
    a2 = fit['approach2']
    fitted = sorted({b['C'] for b in a2['budgets']} | {b['C'] for b in a2['skipped_budgets']})
    if len(fitted) != len(budgets) or any(abs(x / y - 1) > 1e-6
                                          for x, y in zip(fitted, sorted(budgets))):
      return []
  span = budgets[-1] / budgets[0]
  c = lambda x: f'{x:.2g}'.replace('e+', 'e')
  rate = c(min(rates)) + ('' if max(rates) < 1.05 * min(rates) else f'–{c(max(rates))}')
  text = (f'This sweep was sized by `--minutes={minutes:g}` to the {rate} FLOP/s measured on its '
          f'shapes ({plan.get("device", "this machine")}): {len(budgets)} budgets, '
          f'{", ".join(c(b) for b in budgets)} FLOPs, a factor {span:.3g} of compute, predicted '
          f'to take {predicted:.1f} minutes. ')
  if span < 10:
    text += ('A span under a factor 10 cannot pin the exponent a: its interval stays wide (a '
             'factor 3 gave 0.23–0.74 here, docs/results/default_sweep); these runs show each '
             "budget's IsoFLOP minimum, not the law's slope. ")
  elif span < 30:
    text += ('A span of 10–30 narrows the exponent a without pinning it (a factor 10 gave an '
             'interval 0.43 wide here, docs/results/default_sweep). ')
  else:
    text += ('A factor 30 of compute is what this project\'s CPU sweeps needed for an interval '
             'on a about 0.25 wide (docs/results/exponent_cpu); whether these runs pin it depends '
             'on their noise, which the interval above states. ')
  text += ('No span pins the loss beyond the largest budget: that is an extrapolation. More '
           'minutes or a faster device widen the span (up to a factor 32, then larger budgets).')
  return ['', f'## The plan for {minutes:g} minutes', '', text]


def _figures_section(workdir: Path) -> list[str]:
  lines = ['', '## Figures', '']
  for name, fname in FILES.items():
    if (workdir / fname).exists():
      lines.append(f'- [{name}]({fname})')
  return lines


def _notes_section(fit) -> list[str]:
  """How Approaches 2 and 1 and the Kaplan-style laws used the runs, budget by budget."""
  a2, a1 = fit['approach2'], fit.get('approach1')
  if a2['n_budgets_fitted'] == 0:
    how = 'Approach 2 was not fitted (it needs two budgets with a minimum).'
  elif a2['uses_minima_outside_grid']:
    how = (f'the power laws use {a2["n_budgets_fitted"]} budgets including minima outside their grids '
           '(fewer than two inside).')
  else:
    how = f'the power laws use the {a2["n_budgets_fitted"]} budgets whose minimum lies inside the grid.'
  lines = ['', '## Notes', '', f'- Approach 2 budgets grouped by {a2["grouping"]}; {how}']
  for b in a2['budgets']:
    where = ('inside the N grid' if b['minimum_inside_grid'] else
             'outside the N grid' if b['opens_upward'] else 'absent (parabola opens downward)')
    lo, hi = (_num(v, 3) for v in b['N_range'])
    lines.append(f'- C = {b["C"]:.3g}: minimum {where}; N grid {lo}–{hi}; '
                 f'N_opt = {_num(b["N_opt"], 3)}, {b["n_runs"]} runs.')
  if a2['skipped_budgets']:
    lines.append('- Skipped (fewer than 3 distinct N): C = '
                 + ', '.join(f'{s["C"]:.3g}' for s in a2['skipped_budgets']) + '.')
  if a1:
    lines.append(f'- Approach 1 fits {a1["n_points_fitted"]} envelope points; points won by the smallest or largest '
                 'model are left out, since there the envelope sits at the edge of the size grid.')
  lines.append('- Kaplan-style laws use lower envelopes of final losses: the best loss per N (or D) kept only when '
               'no smaller N (D) did better, and the loss-vs-C frontier; fit as lines in log-log space.')
  lines.append('- Approach-2 minima are biased by off-centre or narrow grids: centre each budget on the predicted '
               'optimum and span about 1/4 to 4 times it.')
  return lines


def _caveats(fit) -> list[str]:
  """What to keep in mind reading the numbers: a missing or loose exponent, seed noise, the
  resamples the intervals rest on (the report's last bullets)."""
  a3, a2 = fit['approach3'], fit['approach2']
  ci = a3.get('ci')
  notes = []
  if a3['a'] is None:
    notes.append('Approach 3 gives no exponent: a fitted α or β is not positive, so in these runs '
                 'loss does not fall with both parameters and data. More runs, over a wider range '
                 'of budgets, are what it needs.')
  if a3['a'] is not None and ci and ci.get('a') and ci['a'][1] - ci['a'][0] > 0.3:
    lo, hi = ci['a']
    held_values = [name for name, value in (('Chinchilla (about 0.5)', 0.5), ('Kaplan (0.73)', 0.73))
                   if lo <= value <= hi]
    holds = (', a range that holds ' + ('both ' if len(held_values) == 2 else '')
             + ' and '.join(held_values) if held_values else '')
    notes.append(f'Read the interval, not the point: the data allow any a from {lo:.2f} to {hi:.2f}'
                 f'{holds}. These runs do not pin the exponent; more budgets over a wider range of '
                 'compute (or repeated seeds) narrow it.')
  noise = fit.get('seed_noise')
  if noise:
    notes.append(f'Seed noise: {noise["runs"]} runs in {noise["groups"]} groups repeated with other '
                 f'seeds differ by a standard deviation of {100 * noise["std_log_loss"]:.2f}% in loss '
                 f'(largest spread within a group {100 * noise["max_spread"]:.2f}%); the Approach 3 '
                 'intervals include this noise.')
  else:
    notes.append('Seed noise: no run was repeated with another seed, so the intervals do not include '
                 'run-to-run noise (a sweep measures it with sweep.seeds_smallest = 2).')
  if ci and 'n_used' in ci:
    notes.append(f'Bootstrap: {ci["n_used"]} of {ci["n_boot"]} resamples give the intervals; '
                 f'{ci["n_failed"]} did not converge and {ci["n_degenerate"]} gave α or β ≤ 0 '
                 '(no exponent), and are left out of them.')
  if a2.get('n_boot_requested'):
    notes.append(f'Approach 2 intervals: {a2["n_boot"]} of {a2["n_boot_requested"]} resamples had '
                 'two or more usable IsoFLOP minima.')
  return notes


def run_fit(results_csv, workdir, loss_key=None, params_key='params', flops_key=None, bootstrap=100,
            curves=None, seed=0, top_k=chinchilla.DEFAULT_TOP_K):
  """The analysis of a results table: read it, fit, write workdir/fit.json, the plots and workdir/report.md; return the fit."""
  rows = fitlib.read_results(results_csv, loss_key, params_key, flops_key)
  flops_key = flops_key or 'flops'
  loss_key = fitlib.resolve_loss_key(rows[0].keys(), loss_key)
  curves = fitlib.read_curves(curves)
  fit = fitlib.fit_results(rows, flops_key=flops_key, params_key=params_key, loss_key=loss_key, bootstrap=bootstrap,
                    seed=seed, curves=curves, top_k=top_k)
  fit['results'] = fitlib.table_identity(results_csv, rows)     # `run.py plot` checks its table
  workdir = Path(workdir)
  workdir.mkdir(parents=True, exist_ok=True)
  write_json_atomic(workdir / 'fit.json', fit)
  plot.make_all(fit, rows, workdir, curves=curves)
  write_report(fit, workdir)
  return fit
