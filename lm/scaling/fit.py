"""Scaling-law fits of a results table (final losses, and optionally training curves): fit_results
runs Chinchilla's Approaches 1-3 (lm.scaling.chinchilla) and Kaplan's power laws (lm.scaling.kaplan)
on it, with a held-out check; read_results and read_curves read the inputs.

References:
  Hoffmann et al. 2022, "Training Compute-Optimal Large Language Models", arXiv:2203.15556 (Approaches 1-3).
  Besiroglu et al. 2024, "Chinchilla Scaling: A replication attempt", arXiv:2404.10102 (summed Huber refit).
  Kaplan et al. 2020, "Scaling Laws for Neural Language Models", arXiv:2001.08361 (L(N), L(D), L(C)).

Everything here is numpy/scipy so that fitting never needs an accelerator.
"""

import csv
import hashlib
import io
import json
import math
import time
from pathlib import Path

import numpy as np
from threadpoolctl import threadpool_limits

from lm.data import corpus
from lm.errors import UserError
from lm.metrics import read_json_object
from lm.scaling import chinchilla, kaplan, numerics

LOSS_KEYS = ('loss', 'eval_loss', 'final_loss')
MIN_POINTS = 3     # distinct (N, D) points a fit needs, whatever the number of rows


def heldout_check(N, D, L, labels, **fit_kwargs):
  """Fit Approach 3 on the budgets below the largest one with 3+ runs, then predict that budget's runs.

  Budgets above it (single stray runs when budgets come from binning FLOPs) are left out of both sides,
  so the check is always an extrapolation in compute.
  """
  labs, counts = np.unique(labels, return_counts=True)
  top = labs[counts >= 3].max() if (counts >= 3).any() else labs.max()
  train, test = labels < top, labels == top
  if train.sum() < 5:
    return None
  law = chinchilla.fit_approach3(N[train], D[train], L[train], **fit_kwargs)
  pred = numerics.predict_loss(law, N[test], D[test])
  err = pred - L[test]
  return {'heldout_C': float(top), 'n_train': int(train.sum()), 'n_test': int(test.sum()),
          'n_unused': int((labels > top).sum()),
          'mean_abs_error': float(np.abs(err).mean()), 'mean_rel_error': float(np.abs(err / L[test]).mean()),
          'max_abs_error': float(np.abs(err).max()),
          'fit': {k: law[k] for k in ('E', 'A', 'B', 'alpha', 'beta', 'a')},
          'runs': [{'N': float(n), 'D': float(d), 'loss': float(l), 'predicted': float(p)}
                   for n, d, l, p in zip(N[test], D[test], L[test], pred)]}


FLOPS_CONVENTIONS = {'flops': 'chinchilla_appendix_f', 'flops_6nd': '6nd',
                     'flops_6nd_nonembed': '6nd_nonembedding (Kaplan et al. 2020)'}
PARAMS_CONVENTIONS = {'params': 'total', 'params_nonembed': 'nonembedding'}


def columns_of(rows, loss_key='loss', params_key='params', flops_key='flops', tokens_key='tokens'):
  """Arrays N, D, L, C and budget labels (or None) from result rows; C = 6ND when `flops_key` is absent."""
  if not rows:
    raise UserError('No runs to fit: the results file has a header but no rows; run a sweep first.')
  for key in (params_key, tokens_key, loss_key):
    if key not in rows[0]:
      raise UserError(f'The results have no {key!r} column: add it or choose another column by argument.')
  N, D, L = (np.array([float(r[k]) for r in rows]) for k in (params_key, tokens_key, loss_key))
  points = len(set(zip(N.tolist(), D.tolist())))
  if points < MIN_POINTS:
    raise UserError(f'The results hold {len(rows)} run{"s" * (len(rows) != 1)} but only {points} distinct '
                    f'({params_key}, {tokens_key}) point{"s" * (points != 1)}; a scaling law needs '
                    f'at least {MIN_POINTS} runs of different sizes or token counts (repeats of one '
                    'run measure its seed noise, not a trend): add runs or check the table.')
  has_flops = flops_key in rows[0]
  C = np.array([float(r[flops_key]) for r in rows]) if has_flops else 6.0 * N * D
  budget = None
  if 'budget' in rows[0] and all(r.get('budget') not in (None, '') for r in rows):
    budget = np.array([float(r['budget']) for r in rows])
  return N, D, L, C, budget, has_flops


@threadpool_limits.wrap(limits=1, user_api='blas')
def fit_results(rows, flops_key='flops', params_key='params', loss_key='loss', tokens_key='tokens',
                bootstrap=100, seed=0, curves=None, top_k=chinchilla.DEFAULT_TOP_K, budget_decades=0.1):
  """The full fit.json content for result rows (dicts of floats).

  BLAS is held to one thread: the 5-parameter L-BFGS problems are far too small to share, and on
  a busy machine idle BLAS threads spinning for work made the fit ten times slower.
  """
  N, D, L, C, budget, has_flops = columns_of(rows, loss_key, params_key, flops_key, tokens_key)
  t0 = time.perf_counter()
  a3 = chinchilla.fit_approach3(N, D, L, top_k=top_k)
  a3['fit_seconds'] = time.perf_counter() - t0
  k = float(np.median(C / (N * D)))
  a3['flops_per_ND'] = k
  kfit = numerics.flops_per_nd_law(N, D, C)
  a3['flops_per_ND_law'] = kfit
  a3['a_this_count'] = None
  if a3['a'] is not None and a3['alpha'] + a3['beta'] * (1 + kfit['slope']) > 0:
    # The slope of N_opt against this count of C: with k(N) falling as N^slope, larger models are
    # relatively cheaper per token and the frontier tilts toward them.
    a3['a_this_count'] = a3['beta'] / (a3['alpha'] + a3['beta'] * (1 + kfit['slope']))
  a3['frontier'] = ('N_opt = G\' (C e^-ln_k0)^(beta/(alpha+beta(1+s))), D_opt = C/(k(N_opt) N_opt), '
                    'k(N) = e^ln_k0 N^s fitted to the runs\' own C/(N D) (flops_per_ND_law); with s = 0 '
                    'this is the paper\'s N_opt = G (C/k)^a')
  a3['a_other_params'] = other_params_exponent(rows, N, D, L, params_key, top_k)
  t0 = time.perf_counter()
  noise = numerics.seed_noise(rows, loss_key, params_key, tokens_key)
  a3['ci'] = chinchilla.bootstrap_approach3(N, D, L, a3['theta'], n_boot=bootstrap, seed=seed,
                                 noise_std=noise['std_log_loss'] if noise else 0.0) \
      if bootstrap else None
  a3['bootstrap_seconds'] = time.perf_counter() - t0
  a2 = chinchilla.fit_approach2(N, D, L, C, budget, budget_decades, n_boot=bootstrap, seed=seed)
  labels = numerics.group_budgets(C, budget, budget_decades)
  tpp = {'approach2': [{'C': b['C'], 'tokens_per_param': b['D_opt'] / b['N_opt']} for b in a2['budgets']],
         'approach3': [{'C': float(c), 'tokens_per_param': float(numerics.tokens_per_param(a3, c, kfit))}
                       for c in ([b['C'] for b in a2['budgets']] or np.unique(labels))]
                      if a3['G'] is not None else [],
         'approach3_formula': {'expression': 'D_opt/N_opt = G^-2 (C/k)^((alpha-beta)/(alpha+beta))', 'G': a3['G'],
                               'k': kfit, 'exponent': (a3['b'] - a3['a']) if a3['G'] is not None else None}}
  out = {
      'approach3': a3,
      'approach2': a2,
      'approach1': (chinchilla.fit_approach1(curves_in_convention(curves, rows, params_key, flops_key,
                                                        tokens_key, has_flops))
                    if curves else None),
      'kaplan': kaplan.fit_kaplan(N, D, L, C),
      'tokens_per_param_at_optimum': tpp,
      'heldout': heldout_check(N, D, L, labels, top_k=top_k),
      'seed_noise': noise,
      'flops_convention': FLOPS_CONVENTIONS.get(flops_key, flops_key) if has_flops else '6nd',
      'params_convention': PARAMS_CONVENTIONS.get(params_key, params_key),
      'columns': {'params': params_key, 'tokens': tokens_key, 'loss': loss_key,
                  'flops': flops_key if has_flops else None},
      'n_runs': int(len(L)),
  }
  return _plain(out)


def other_params_exponent(rows, N, D, L, params_key, top_k=chinchilla.DEFAULT_TOP_K):
  """Approach 3's a with parameters counted the other way (all parameters against non-embedding),
  when the rows have both columns; else None. At small sizes the embedding is a large and
  shrinking share of N, and the two counts give different exponents from the same losses
  (Kaplan et al. 2020, Sec. 3; Pearce & Song 2024 trace Kaplan's 0.73 against Chinchilla's 0.5
  largely to this), so the report shows both."""
  other = {'params': 'params_nonembed', 'params_nonembed': 'params'}.get(params_key)
  if other is None:
    return None
  try:
    n_other = np.array([float(r[other]) for r in rows])
  except (KeyError, TypeError, ValueError):   # no such column, or an empty or non-numeric cell
    return None
  if not np.all(np.isfinite(n_other) & (n_other > 0)) or np.allclose(n_other, N):
    return None
  fit = chinchilla.fit_approach3(n_other, D, L, top_k=top_k)
  return {'params_key': other, 'convention': PARAMS_CONVENTIONS[other], 'a': fit['a'],
          'alpha': fit['alpha'], 'beta': fit['beta']}


def curves_in_convention(curves, rows, params_key='params', flops_key='flops', tokens_key='tokens',
                         has_flops=True):
  """Training curves counted the way the fit counts its runs. A sweep's curves carry total
  parameters and Appendix F FLOPs; fitted with another convention (Kaplan's non-embedding N and
  6·N·D), each curve takes its run's N from `params_key` and its FLOPs as tokens times the run's
  own FLOPs per token in `flops_key` (6·N without a FLOP column). A curve is matched to its row by
  run name, else (WSD curves are named by size) by its total parameter count. In the sweep's own
  convention the curves are used as they are."""
  if params_key == 'params' and flops_key == 'flops' and has_flops:
    return curves
  by_name = {r.get('run'): r for r in rows if r.get('run')}
  by_params = {}
  for r in rows:
    if r.get('params') not in (None, ''):
      by_params.setdefault(round(float(r['params'])), r)
  out = {}
  for name, c in curves.items():
    row = by_name.get(name)
    if row is None and c.get('params') is not None:
      row = by_params.get(round(float(c['params'])))
    if row is None:
      raise UserError(f'Training curve {name!r} matches no run of the results (by run name or '
                      f'parameter count), so it cannot be counted as {params_key}/{flops_key}; '
                      'fit in the sweep\'s own convention or pass the curves of these runs only.')
    n = float(row[params_key])
    per_token = (float(row[flops_key]) / float(row[tokens_key])) if has_flops else 6.0 * n
    out[name] = dict(c, params=n, curve_flops=[float(t) * per_token for t in c['curve_tokens']])
  return out


def _plain(v):
  """Plain JSON types; NaN/inf become None so the file stays standard JSON."""
  if isinstance(v, dict):
    return {str(k): _plain(x) for k, x in v.items()}
  if isinstance(v, (list, tuple, np.ndarray)):
    return [_plain(x) for x in v]
  if isinstance(v, (bool, np.bool_)):
    return bool(v)
  if isinstance(v, (int, np.integer)):
    return int(v)
  if isinstance(v, (float, np.floating)):
    return float(v) if math.isfinite(v) else None
  return v


def resolve_loss_key(columns, loss_key=None):
  """The loss column to use: `loss_key` if given, else the first of loss, eval_loss, final_loss present."""
  if loss_key is not None:
    return loss_key
  for k in LOSS_KEYS:
    if k in columns:
      return k
  return LOSS_KEYS[0]


def read_results(path, loss_key=None, params_key='params', flops_key=None, tokens_key='tokens'):
  """Rows of a results CSV as dicts; used columns must be positive numbers, other cells are kept as text.

  A column named by argument (loss_key, params_key, flops_key) must exist: there is no fallback
  from a misspelt name. flops_key None uses a `flops` column when there is one (else 6ND)."""
  path = Path(path)
  if not path.exists():
    raise UserError(f'Results file {path} does not exist: pass --results=FILE.csv written by a sweep.')
  text, _ = corpus.read_text(str(path), 'results file')
  reader = csv.DictReader(io.StringIO(text, newline=''))
  columns = [c.strip() for c in reader.fieldnames or []]   # "params, tokens" names `tokens`
  reader.fieldnames = columns
  rows = list(reader)
  if not columns:
    raise UserError(f'Results file {path} is empty: it needs a header with params, tokens and loss columns.')
  twice = sorted({c for c in columns if columns.count(c) > 1})
  if twice:
    raise UserError(f'Results file {path} names the column {twice[0]!r} twice in its header, so its '
                    'values are ambiguous: rename or drop one of them.')
  loss_key = resolve_loss_key(columns, loss_key)
  needed = [params_key, tokens_key, loss_key] + ([flops_key] if flops_key is not None else [])
  optional = [k for k in ('flops',) * (flops_key is None) + ('budget',) if k in columns]
  for key in needed:
    if key not in columns:
      raise UserError(f'Results file {path} has no {key!r} column (its columns: '
                      f'{", ".join(map(repr, columns))}): add it or name one of those by argument.')
  if not rows:
    raise UserError(f'Results file {path} has no runs: it needs one row per finished training run.')
  out = []
  for i, row in enumerate(rows, start=2):  # line 1 is the header
    rec = dict(row)
    for key in needed + optional:
      cell = (row.get(key) or '').strip()
      if key == 'budget' and not cell:
        continue
      try:
        v = float(cell)
      except ValueError:
        raise UserError(f'Column {key!r} of {path} line {i} is {cell!r}, not a number: fix or drop that row.') from None
      if not (math.isfinite(v) and v > 0):
        raise UserError(f'Column {key!r} of {path} line {i} is {cell!r}; it must be a positive finite number: '
                        'drop diverged or unfinished runs.')
      rec[key] = v
    out.append(rec)
  return out


def table_identity(path, rows) -> dict:
  """What identifies the results table a fit was made from (fit.json's `results`; `run.py plot`
  compares it with the table it is given): the sha256 of its rows as read_results returns them
  (so a byte-order mark, line endings or quoting do not count, the runs and their numbers do),
  their number, and the file's path."""
  text = json.dumps(rows, sort_keys=True, default=str)
  return {'sha256': hashlib.sha256(text.encode('utf-8')).hexdigest(), 'rows': len(rows),
          'path': str(path)}


def check_same_table(fitted: dict, path, rows) -> str | None:
  """Refuses a results table other than the one `fitted` (a fit.json) was made from; for a fit.json
  written before tables were recorded, returns a note saying the match cannot be checked."""
  recorded = fitted.get('results')
  if not isinstance(recorded, dict) or 'sha256' not in recorded:
    return (f'note: this fit.json does not record which results table it was fitted from, so '
            f'{path} cannot be checked against it; run `run.py fit` again to record it.')
  found = table_identity(path, rows)
  if found['sha256'] != recorded['sha256']:
    was = recorded.get('path')
    raise UserError(f'{path} ({found["rows"]} runs) is not the results table this folder was '
                    f'fitted from ({f"{was}, " if was else ""}{recorded.get("rows")} runs, sha256 '
                    f'{recorded["sha256"][:12]}); plot with that table, or run `run.py fit` on '
                    'this one into a new folder.')
  return None


def read_curves(curves):
  """Training curves from a dict or a JSON file: run -> {params, curve_flops, curve_tokens, curve_loss}."""
  if curves is None or isinstance(curves, dict):
    return curves
  path = Path(curves)
  if not path.is_file():
    raise UserError(f'Curves file {path} does not exist: pass a JSON file of per-run training curves.')
  return read_json_object(str(path), 'restore it, or delete it to go on without the training curves '
                          '(Approach 1)')
