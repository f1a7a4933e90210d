"""Scaling-law fits of final losses (and optionally training curves): Chinchilla Approaches 1-3, Kaplan power laws.

References:
  Hoffmann et al. 2022, "Training Compute-Optimal Large Language Models", arXiv:2203.15556 (Approaches 1-3).
  Besiroglu et al. 2024, "Chinchilla Scaling: A replication attempt", arXiv:2404.10102 (summed Huber refit).
  Kaplan et al. 2020, "Scaling Laws for Neural Language Models", arXiv:2001.08361 (L(N), L(D), L(C)).

Everything here is numpy/scipy so that fitting never needs an accelerator.

Approach 3 cost, measured on the 240 Chinchilla runs on a shared 2-core CPU: L-BFGS-B from all 4500 grid
starts takes ~16 s with scipy's default tolerances and ~90 s with LBFGS_OPTIONS; scoring the grid in one
vectorised pass (~40 ms) and refining only the best 100 starts takes ~0.7 s and reaches the same optimum
(objective equal to 1e-15 relative). A bootstrap refit costs ~3 L-BFGS-B runs, ~0.1 s.
"""

import csv
import json
import math
import time
from pathlib import Path

import numpy as np
from scipy import optimize
from threadpoolctl import threadpool_limits

from lm.errors import UserError

HUBER_DELTA = 1e-3
# Hoffmann et al. 2022 (Approach 3, fitting details in Appendix D): the initialisation grid.
GRID_ALPHA = np.arange(0.0, 2.01, 0.5)
GRID_BETA = np.arange(0.0, 2.01, 0.5)
GRID_E = np.arange(-1.0, 1.01, 0.5)
GRID_A = np.arange(0.0, 25.01, 5.0)
GRID_B = np.arange(0.0, 25.01, 5.0)
# L-BFGS-B stops when (f_k - f_k+1) / max(|f_k|, |f_k+1|, 1) <= ftol. The summed Huber loss is ~1e-3, so
# scipy's default ftol (2.2e-9) is effectively an absolute test that fires early; these are tight enough to
# reach the optimum from the paper's own starting point (tests/test_fit.py).
LBFGS_OPTIONS = {'ftol': 1e-14, 'gtol': 1e-10, 'maxiter': 2000}
# On the Chinchilla data the starts that reach the optimum rank 1st, 3rd and 5th of 4500 by initial loss, so
# refining the best 100 keeps a wide margin at ~1/100 of the full grid's cost (timings above).
DEFAULT_TOP_K = 100
LOSS_KEYS = ('loss', 'eval_loss', 'final_loss')


def _lse_parts(theta, x, y):
  """Log-sum-exp terms of log L̂ = LSE(a - α log N, b - β log D, e) and their softmax weights."""
  a, b, e, alpha, beta = theta
  u = np.stack([a - alpha * x, b - beta * y, np.full_like(x, e)])
  m = u.max(axis=0)
  w = np.exp(u - m)
  s = w.sum(axis=0)
  return m + np.log(s), w / s


def _huber(r, delta):
  ar = np.abs(r)
  return np.where(ar <= delta, 0.5 * r * r, delta * (ar - 0.5 * delta))


def approach3_objective(theta, x, y, t, delta=HUBER_DELTA, reduction='sum'):
  """Huber loss of log-loss residuals and its analytic gradient in θ = (a, b, e, α, β)."""
  lse, w = _lse_parts(theta, x, y)
  r = lse - t
  dr = np.clip(r, -delta, delta)  # Huber'(r)
  grad = np.array([
      (dr * w[0]).sum(), (dr * w[1]).sum(), (dr * w[2]).sum(),
      -(dr * w[0] * x).sum(), -(dr * w[1] * y).sum()])
  f = _huber(r, delta).sum()
  if reduction == 'mean':
    f, grad = f / len(t), grad / len(t)
  return f, grad


def _grid_objective(thetas, x, y, t, delta, chunk=512):
  """Summed Huber loss for many θ at once (K, 5) -> (K,), chunked to bound memory."""
  out = np.empty(len(thetas))
  for i in range(0, len(thetas), chunk):
    th = thetas[i:i + chunk, :, None]
    u = np.stack([th[:, 0] - th[:, 3] * x, th[:, 1] - th[:, 4] * y, np.broadcast_to(th[:, 2], (len(th), len(x)))])
    m = u.max(axis=0)
    lse = m + np.log(np.exp(u - m).sum(axis=0))
    out[i:i + chunk] = _huber(lse - t, delta).sum(axis=1)
  return out


def initial_grid():
  """The 4500 starts (a, b, e, α, β) of Hoffmann et al. 2022."""
  g = np.meshgrid(GRID_A, GRID_B, GRID_E, GRID_ALPHA, GRID_BETA, indexing='ij')
  return np.stack([v.ravel() for v in g], axis=1)


def _minimize(theta0, x, y, t, delta, reduction, options):
  res = optimize.minimize(approach3_objective, theta0, args=(x, y, t, delta, reduction), jac=True,
                          method='L-BFGS-B', options=options)
  return res.fun, res.x


def _exp(v: float) -> float:
  return math.exp(v) if v < 709.0 else math.inf   # a degenerate fit can run off to e^1000


def _law_from_theta(theta):
  a, b, e, alpha, beta = (float(v) for v in theta)
  out = {'E': _exp(e), 'A': _exp(a), 'B': _exp(b), 'alpha': alpha, 'beta': beta,
         'a': None, 'b': None, 'G': None}
  if alpha > 0 and beta > 0:
    out['a'] = beta / (alpha + beta)
    out['b'] = alpha / (alpha + beta)
    if math.isfinite(out['A']) and math.isfinite(out['B']):
      out['G'] = (alpha * out['A'] / (beta * out['B'])) ** (1.0 / (alpha + beta))
  return out


def fit_approach3(N, D, L, delta=HUBER_DELTA, reduction='sum', top_k=DEFAULT_TOP_K, starts=None,
                  lbfgs_options=None):
  """Fit L(N, D) = E + A/N^α + B/D^β (Hoffmann et al. 2022, Approach 3).

  All grid starts are scored with one vectorised pass; L-BFGS-B runs from the best `top_k` of them
  (top_k=None: from every start). `starts` overrides the grid; `lbfgs_options` overrides LBFGS_OPTIONS
  ({} gives scipy's defaults).
  """
  x, y, t = np.log(np.asarray(N, float)), np.log(np.asarray(D, float)), np.log(np.asarray(L, float))
  if len(t) < 5:
    raise UserError(f'Approach 3 has 5 parameters but only {len(t)} runs were given: add runs to the results file.')
  starts = initial_grid() if starts is None else np.atleast_2d(np.asarray(starts, float))
  options = LBFGS_OPTIONS if lbfgs_options is None else lbfgs_options
  if top_k is not None and top_k < len(starts):
    starts = starts[np.argsort(_grid_objective(starts, x, y, t, delta))[:top_k]]
  best_f, best_theta = np.inf, None
  for s in starts:
    f, th = _minimize(s, x, y, t, delta, reduction, options)
    if f < best_f:
      best_f, best_theta = f, th
  out = _law_from_theta(best_theta)
  out.update(objective=float(best_f), theta=[float(v) for v in best_theta], n_runs=int(len(t)),
             n_starts=int(len(starts)), reduction=reduction,
             loss_function=f'huber({delta:g}) {"summed" if reduction == "sum" else "averaged"} over log L')
  return out


def design_points(N, D) -> list:
  """One label per run: runs of the same size and token count (to 0.1%) share it, the seeds of
  one point of the design."""
  return [(round(math.log(float(n)), 3), round(math.log(float(d)), 3)) for n, d in zip(N, D)]


def seed_noise(rows, loss_key='loss', params_key='params', tokens_key='tokens'):
  """Run-to-run noise from runs repeated with other seeds: runs of one design point (the same
  size and token count) form a group; the pooled standard deviation of log loss within the
  groups of two or more. None when no run was repeated."""
  groups = {}
  keys = design_points([r[params_key] for r in rows], [r[tokens_key] for r in rows])
  for key, r in zip(keys, rows):
    groups.setdefault(key, []).append(math.log(float(r[loss_key])))
  reps = [np.asarray(v) for v in groups.values() if len(v) >= 2]
  if not reps:
    return None
  dof = sum(len(v) - 1 for v in reps)
  var = sum(float(((v - v.mean()) ** 2).sum()) for v in reps) / dof
  return {'groups': len(reps), 'runs': int(sum(len(v) for v in reps)), 'dof': int(dof),
          'std_log_loss': math.sqrt(var),
          'max_spread': max(float(math.exp(v.max() - v.min()) - 1) for v in reps)}


def bootstrap_approach3(N, D, L, theta, n_boot=100, seed=0, n_grid_starts=2, delta=HUBER_DELTA,
                        noise_std=0.0, groups=None):
  """Percentile intervals (2.5, 97.5) from refits on runs resampled with replacement.

  groups: one label per run; runs with the same label (the seeds of one size and token count)
  are resampled together, as one unit (a cluster bootstrap): they share the point's distance from
  the law, so drawing them one by one would count one point's misfit as independent evidence.
  Each run's own seed noise is in its loss already and so in the resamples.

  noise_std > 0 also perturbs each resampled loss by a lognormal factor of that width, on top of
  the noise the losses carry; benchmarks/bootstrap_coverage.py measures what that does to the
  intervals' coverage.

  Each refit starts from the full-data optimum `theta` plus the `n_grid_starts` grid points that score best
  on the full data: resamples move the optimum only a little, and re-screening the grid per resample would
  double the cost.
  """
  N, D, L = (np.asarray(v, float) for v in (N, D, L))
  rng = np.random.default_rng(seed)
  grid = initial_grid()
  screen = _grid_objective(grid, np.log(N), np.log(D), np.log(L), delta)
  starts = np.vstack([theta, grid[np.argsort(screen)[:n_grid_starts]]])
  keys = ('E', 'A', 'B', 'alpha', 'beta', 'a', 'b', 'G')
  samples = {k: [] for k in keys}
  failed = degenerate = 0
  if groups is None:
    units = [np.array([i]) for i in range(len(L))]
  else:
    members = {}
    for i, g in enumerate(groups):
      members.setdefault(g, []).append(i)
    units = [np.asarray(v) for v in members.values()]
  for _ in range(n_boot):
    idx = np.concatenate([units[j] for j in rng.integers(0, len(units), len(units))])
    x, y, t = np.log(N[idx]), np.log(D[idx]), np.log(L[idx])
    if noise_std:
      t = t + rng.normal(0.0, noise_std, len(t))
    fits = [ft for ft in (_minimize(s, x, y, t, delta, 'sum', LBFGS_OPTIONS) for s in starts)
            if np.isfinite(ft[0])]
    if not fits:
      failed += 1
      continue
    law = _law_from_theta(min(fits, key=lambda ft: ft[0])[1])
    if law['a'] is None:   # alpha or beta <= 0: no exponent, counted rather than folded in
      degenerate += 1
      continue
    for k in keys:
      if law[k] is not None and math.isfinite(law[k]):
        samples[k].append(law[k])
  ci = {k: ([float(np.percentile(v, 2.5)), float(np.percentile(v, 97.5))] if len(v) >= 2 else None)
        for k, v in samples.items()}
  ci['n_boot'] = int(n_boot)
  ci['n_used'] = int(n_boot - failed - degenerate)
  ci['n_failed'] = int(failed)
  ci['n_degenerate'] = int(degenerate)
  over = ('runs, the seeds of one size and token count drawn together' if groups is not None
          and len(units) < len(L) else 'runs')
  ci['method'] = (f'bootstrap over {over}, 2.5/97.5 percentiles of the resamples whose fit '
                  'converged with alpha, beta > 0' + (
                      f'; each loss also perturbed by the measured seed noise (std of log loss '
                      f'{noise_std:.4f})' if noise_std else ''))
  ci['units'] = len(units)
  ci['noise_std'] = float(noise_std)
  return ci


def predict_loss(law, N, D):
  """L̂(N, D) = E + A/N^α + B/D^β."""
  N, D = np.asarray(N, float), np.asarray(D, float)
  return law['E'] + law['A'] / N ** law['alpha'] + law['B'] / D ** law['beta']


def flops_per_nd_law(N, D, C) -> dict:
  """k(N) = C / (N D) as a power of N fitted to the runs' own counts: ln k = ln_k0 + slope ln N.

  With C = 6ND the slope is 0 and k = 6. Under the Appendix-F count, attention and embedding FLOPs
  make k fall with N (about 13 to 7 over a CPU sweep's sizes, slope near -0.15).
  """
  N, D, C = (np.asarray(v, float) for v in (N, D, C))
  lk, ln = np.log(C / (N * D)), np.log(N)
  if np.ptp(ln) == 0 or np.ptp(lk) < 1e-9:
    return {'ln_k0': float(np.mean(lk)), 'slope': 0.0}
  slope, icpt = np.polyfit(ln, lk, 1)
  return {'ln_k0': float(icpt), 'slope': float(slope)}


def flops_per_nd(k, N):
  """k(N) from a number (constant k) or a flops_per_nd_law dict."""
  if isinstance(k, dict):
    return np.exp(k['ln_k0']) * np.asarray(N, float) ** k['slope']
  return np.full_like(np.asarray(N, float), float(k))


def frontier(law, C, k=6.0):
  """Compute-optimal (N_opt, D_opt) for budget C when C = k(N)·N·D.

  k a number: the paper's closed form N_opt = G (C/k)^a, D_opt = G^-1 (C/k)^b. k a flops_per_nd_law
  dict (k = e^ln_k0 N^s, each run's own count): minimising E + A/N^α + B/D^β with D = C/(k(N) N)
  gives, by the same algebra, N_opt = [αA / (β(1+s)B)]^(1/(α+β(1+s))) (C e^-ln_k0)^(β/(α+β(1+s))).
  """
  C = np.asarray(C, float)
  nan = (np.full_like(C, np.nan), np.full_like(C, np.nan))
  if law.get('G') is None:
    return nan
  if not isinstance(k, dict):
    return law['G'] * (C / k) ** law['a'], (C / k) ** law['b'] / law['G']
  al, be, s = law['alpha'], law['beta'], k['slope']
  denom = al + be * (1 + s)
  if 1 + s <= 0 or denom <= 0:
    return nan
  n = (al * law['A'] / (be * (1 + s) * law['B'])) ** (1 / denom) * (C * math.exp(-k['ln_k0'])) ** (be / denom)
  return n, C / (flops_per_nd(k, n) * n)


def tokens_per_param(law, C, k=6.0):
  """D_opt / N_opt at budget C: G^-2 (C/k)^((α-β)/(α+β))."""
  n, d = frontier(law, C, k)
  return d / n


def _loglog_fit(X, Y):
  """Least-squares slope, intercept of log Y on log X and the slope's standard error (None below 3 points)."""
  lx, ly = np.log(X), np.log(Y)
  if len(lx) < 2 or np.ptp(lx) == 0:
    return None, None, None
  slope, icpt = np.polyfit(lx, ly, 1)
  se = None
  if len(lx) >= 3:
    resid = ly - (slope * lx + icpt)
    se = float(math.sqrt(resid @ resid / (len(lx) - 2) / ((lx - lx.mean()) ** 2).sum()))
  return float(slope), float(icpt), se


def group_budgets(C, budget=None, decades=0.1):
  """Budget label per run: the `budget` column when given, else log10(C) rounded to `decades`.

  Rounding can split a budget that straddles a bin edge, so sweeps should write `budget`.
  """
  if budget is not None:
    return np.asarray(budget, float)
  return 10.0 ** (np.round(np.log10(C) / decades) * decades)


def _isoflop_vertex(N, L):
  """Parabola L = c2 u² + c1 u + c0 in u = ln N; returns (coefs, u_min, loss_min, opens_up, inside)."""
  u = np.log(N)
  mu = u.mean()
  p2, p1, p0 = np.polyfit(u - mu, L, 2)
  coefs = [float(p2), float(p1 - 2 * p2 * mu), float(p2 * mu * mu - p1 * mu + p0)]
  v = -p1 / (2 * p2) if p2 > 0 else None
  span = float(np.ptp(u))
  if v is None or not (u.min() - mu - 3 * span <= v <= u.max() - mu + 3 * span):
    # No minimum, or one so far outside the grid (a nearly flat parabola) that it says nothing:
    # fall back to the best observed run and flag it.
    i = int(np.argmin(L))
    return coefs, float(u[i]), float(L[i]), False, False
  inside = bool(u.min() - mu <= v <= u.max() - mu)
  return coefs, float(v + mu), float(p0 - p1 * p1 / (4 * p2)), True, inside


def flops_per_nd_at(N, D, C, n):
  """k = C / (N D) at size n, read off the runs' own FLOPs per token: each run's k_i = C_i / (N_i D_i),
  interpolated linearly in log N (the nearest run's value outside their range). Under the Appendix-F
  count k falls from ~13 to ~7 over the sizes of a CPU sweep, so one median k for a budget would put
  D_opt off by up to a factor 1.5 at the grid's edges."""
  N, D, C = (np.asarray(v, float) for v in (N, D, C))
  order = np.argsort(N)
  k = C[order] / (N[order] * D[order])
  return float(np.exp(np.interp(math.log(n), np.log(N[order]), np.log(k))))


def _approach2_points(N, D, L, C, labels):
  budgets, skipped = [], []
  for lab in np.unique(labels):
    m = labels == lab
    n_distinct = len(np.unique(N[m]))
    if n_distinct < 3:
      skipped.append({'C': float(lab), 'n_runs': int(m.sum()), 'reason': f'{n_distinct} distinct N (< 3)'})
      continue
    coefs, u_min, loss_min, up, inside = _isoflop_vertex(N[m], L[m])
    n_opt = math.exp(u_min)
    k = flops_per_nd_at(N[m], D[m], C[m], n_opt)
    budgets.append({'C': float(lab), 'N_opt': n_opt, 'D_opt': float(lab) / (k * n_opt), 'loss_min': loss_min,
                    'minimum_inside_grid': inside, 'opens_upward': up, 'n_runs': int(m.sum()),
                    'n_distinct_N': n_distinct, 'N_range': [float(N[m].min()), float(N[m].max())],
                    'flops_per_ND': k, 'parabola_ln_N': coefs})
  return budgets, skipped


def _approach2_exponents(budgets):
  use = [b for b in budgets if b['minimum_inside_grid']]
  fallback = False
  if len(use) < 2:  # better a flagged extrapolation than nothing
    use, fallback = [b for b in budgets if b['opens_upward']], True
  C = np.array([b['C'] for b in use])
  a, ia, a_se = _loglog_fit(C, np.array([b['N_opt'] for b in use])) if len(use) >= 2 else (None, None, None)
  b_, ib, b_se = _loglog_fit(C, np.array([b['D_opt'] for b in use])) if len(use) >= 2 else (None, None, None)
  return {'a': a, 'N_intercept_ln': ia, 'a_se': a_se, 'b': b_, 'D_intercept_ln': ib, 'b_se': b_se,
          'n_budgets_fitted': len(use) if a is not None else 0, 'uses_minima_outside_grid': fallback}


def fit_approach2(N, D, L, C, budget=None, decades=0.1, n_boot=100, seed=0):
  """IsoFLOP fits (Hoffmann et al. 2022, Approach 2): per-budget parabola minima, then N_opt ∝ C^a, D_opt ∝ C^b.

  D_opt = C / (k N_opt) with k = C/(N D) of the budget's own runs interpolated at N_opt (flops_per_nd_at), so the
  FLOP convention is respected run by run.
  Power laws use budgets whose minimum lies inside their N grid (all upward-opening ones if fewer than two).
  Intervals: bootstrap resampling runs within each budget (a_ci, b_ci); least-squares standard errors of the
  slopes (a_se, b_se) when there are 3+ budgets.
  """
  N, D, L, C = (np.asarray(v, float) for v in (N, D, L, C))
  labels = group_budgets(C, budget, decades)
  budgets, skipped = _approach2_points(N, D, L, C, labels)
  out = {'budgets': budgets, 'skipped_budgets': skipped,
         'grouping': 'budget column' if budget is not None else f'log10(flops) rounded to {decades:g} decades',
         'budget_decades': None if budget is not None else decades}
  out.update(_approach2_exponents(budgets))
  out['a_ci'] = out['b_ci'] = None
  if out['a'] is not None and n_boot:
    rng = np.random.default_rng(seed)
    groups = [np.flatnonzero(labels == lab) for lab in np.unique(labels)]
    a_s, b_s = [], []
    for _ in range(n_boot):
      idx = np.concatenate([rng.choice(g, len(g)) for g in groups])
      bs, _ = _approach2_points(N[idx], D[idx], L[idx], C[idx], labels[idx])
      ex = _approach2_exponents(bs)
      if ex['a'] is not None:
        a_s.append(ex['a'])
        b_s.append(ex['b'])
    if len(a_s) >= 2:
      out['a_ci'] = [float(np.percentile(a_s, 2.5)), float(np.percentile(a_s, 97.5))]
      out['b_ci'] = [float(np.percentile(b_s, 2.5)), float(np.percentile(b_s, 97.5))]
    out['n_boot'] = len(a_s)
    out['n_boot_requested'] = int(n_boot)
  return out


def fit_approach1(curves, n_grid=60):
  """Training-curve envelope (Hoffmann et al. 2022, Approach 1).

  curves: run -> {params, curve_flops[], curve_tokens[], curve_loss[]}. On a log grid of C, each run's loss
  and tokens are interpolated in log C; the lowest loss gives (N_opt, D_opt). Grid points covered by fewer
  than two runs are dropped (there is no choice to make there), and so are points won by the smallest or
  largest model, where the envelope is pinned to the edge of the size grid rather than at the optimum
  (all points are used if that leaves fewer than two sizes).
  """
  runs = []
  for name, c in curves.items():
    try:
      f, tok, loss = (np.asarray(c[k], float) for k in ('curve_flops', 'curve_tokens', 'curve_loss'))
      n = float(c['params'])
    except (KeyError, TypeError, ValueError) as e:
      raise UserError(f'Training curve {name!r} lacks a numeric {e} entry: give params, curve_flops, '
                      'curve_tokens and curve_loss for every run.') from None
    ok = (f > 0) & (tok > 0) & np.isfinite(loss)
    if ok.sum() < 2:
      continue
    o = np.argsort(f[ok])
    runs.append((n, np.log(f[ok][o]), np.log(tok[ok][o]), loss[ok][o]))
  if len(runs) < 2:
    raise UserError('Approach 1 needs training curves from at least two runs: pass curves for more runs.')
  lo, hi = min(r[1][0] for r in runs), max(r[1][-1] for r in runs)
  n_min, n_max = min(r[0] for r in runs), max(r[0] for r in runs)
  env = []
  for lc in np.linspace(lo, hi, n_grid):
    cands = [(np.interp(lc, lf, ls), n, np.interp(lc, lf, lt)) for n, lf, lt, ls in runs if lf[0] <= lc <= lf[-1]]
    if len(cands) >= 2:
      loss, n, lt = min(cands)
      env.append({'C': float(math.exp(lc)), 'loss': float(loss), 'N_opt': n, 'D_opt': float(math.exp(lt)),
                  'at_grid_edge': n in (n_min, n_max)})
  use = [p for p in env if not p['at_grid_edge']]
  if len({p['N_opt'] for p in use}) < 2:
    use = env
  out = {'envelope': env, 'a': None, 'b': None, 'a_se': None, 'b_se': None, 'n_points_fitted': len(use),
         'n_distinct_N': len({p['N_opt'] for p in use})}
  if out['n_distinct_N'] >= 2:
    C = np.array([p['C'] for p in use])
    out['a'], out['N_intercept_ln'], out['a_se'] = _loglog_fit(C, np.array([p['N_opt'] for p in use]))
    out['b'], out['D_intercept_ln'], out['b_se'] = _loglog_fit(C, np.array([p['D_opt'] for p in use]))
  return out


def _pareto(X, L):
  """Indices of the lower envelope: runs whose loss beats every run with smaller-or-equal X."""
  order = np.lexsort((L, X))
  keep, best = [], np.inf
  for i in order:
    if L[i] < best:
      keep.append(i)
      best = L[i]
  return np.array(keep, int)


def _kaplan_law(X, L, name):
  """L = (X_c / X)^α fit as a line in log-log space, plus L = E + (X_c / X)^α when it converges."""
  slope, icpt, se = _loglog_fit(X, L)
  if slope is None:
    return None
  alpha = -slope
  out = {f'alpha_{name}': alpha, f'alpha_{name}_se': se, 'n_points': int(len(X)),
         f'{name}_c': float(math.exp(icpt / alpha)) if alpha > 0 else None,
         'points': {'X': [float(v) for v in X], 'loss': [float(v) for v in L]}, 'with_irreducible': None}
  if len(X) >= 4 and alpha > 0:
    lx, ll = np.log(X), np.log(L)

    def resid(p):  # p = (E, α, ln X_c); residuals in log L as in Approach 3
      return np.log(p[0] + np.exp(p[1] * (p[2] - lx))) - ll
    try:
      p0 = [0.5 * L.min(), alpha, icpt / alpha]
      r = optimize.least_squares(resid, p0, bounds=([0, 0, -np.inf], [L.min(), 5, np.inf]))
      if r.success:
        out['with_irreducible'] = {'E': float(r.x[0]), f'alpha_{name}': float(r.x[1]),
                                   f'{name}_c': float(math.exp(r.x[2]))}
    except (ValueError, FloatingPointError, OverflowError):
      pass
  return out


def fit_kaplan(N, D, L, C):
  """Kaplan et al. 2020 power laws L(N), L(D), L(C) on lower envelopes of final losses.

  L(N): best loss per N, kept when no smaller model did better (the loss a model of that size can reach);
  L(D) likewise per token count; L(C): the compute frontier (envelope of final loss vs C).
  The frontier's N also gives a Kaplan-style N_opt ∝ C^a.
  """
  N, D, L, C = (np.asarray(v, float) for v in (N, D, L, C))
  out = {}
  for name, X in (('N', N), ('D', D)):
    ux = np.unique(X)
    best = np.array([L[X == v].min() for v in ux])
    keep = _pareto(ux, best)
    out[f'L_{name}'] = _kaplan_law(ux[keep], best[keep], name)
  keep = _pareto(C, L)
  out['L_C'] = _kaplan_law(C[keep], L[keep], 'C')
  slope, _, se = _loglog_fit(C[keep], N[keep])
  out['frontier_N_opt_exponent'] = slope
  out['frontier_N_opt_exponent_se'] = se
  return out


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
  law = fit_approach3(N[train], D[train], L[train], **fit_kwargs)
  pred = predict_loss(law, N[test], D[test])
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
  has_flops = flops_key in rows[0]
  C = np.array([float(r[flops_key]) for r in rows]) if has_flops else 6.0 * N * D
  budget = None
  if 'budget' in rows[0] and all(r.get('budget') not in (None, '') for r in rows):
    budget = np.array([float(r['budget']) for r in rows])
  return N, D, L, C, budget, has_flops


@threadpool_limits.wrap(limits=1, user_api='blas')
def fit_results(rows, flops_key='flops', params_key='params', loss_key='loss', tokens_key='tokens',
                bootstrap=100, seed=0, curves=None, top_k=DEFAULT_TOP_K, budget_decades=0.1):
  """The full fit.json content for result rows (dicts of floats).

  BLAS is held to one thread: the 5-parameter L-BFGS problems are far too small to share, and on
  a busy machine idle BLAS threads spinning for work made the fit ten times slower.
  """
  N, D, L, C, budget, has_flops = columns_of(rows, loss_key, params_key, flops_key, tokens_key)
  t0 = time.perf_counter()
  a3 = fit_approach3(N, D, L, top_k=top_k)
  a3['fit_seconds'] = time.perf_counter() - t0
  k = float(np.median(C / (N * D)))
  a3['flops_per_ND'] = k
  kfit = flops_per_nd_law(N, D, C)
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
  noise = seed_noise(rows, loss_key, params_key, tokens_key)
  a3['ci'] = bootstrap_approach3(N, D, L, a3['theta'], n_boot=bootstrap, seed=seed,
                                 noise_std=noise['std_log_loss'] if noise else 0.0) \
      if bootstrap else None
  a3['bootstrap_seconds'] = time.perf_counter() - t0
  a2 = fit_approach2(N, D, L, C, budget, budget_decades, n_boot=bootstrap, seed=seed)
  labels = group_budgets(C, budget, budget_decades)
  tpp = {'approach2': [{'C': b['C'], 'tokens_per_param': b['D_opt'] / b['N_opt']} for b in a2['budgets']],
         'approach3': [{'C': float(c), 'tokens_per_param': float(tokens_per_param(a3, c, kfit))}
                       for c in ([b['C'] for b in a2['budgets']] or np.unique(labels))]
                      if a3['G'] is not None else [],
         'approach3_formula': {'expression': 'D_opt/N_opt = G^-2 (C/k)^((alpha-beta)/(alpha+beta))', 'G': a3['G'],
                               'k': kfit, 'exponent': (a3['b'] - a3['a']) if a3['G'] is not None else None}}
  out = {
      'approach3': a3,
      'approach2': a2,
      'approach1': (fit_approach1(curves_in_convention(curves, rows, params_key, flops_key,
                                                        tokens_key, has_flops))
                    if curves else None),
      'kaplan': fit_kaplan(N, D, L, C),
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


def other_params_exponent(rows, N, D, L, params_key, top_k=DEFAULT_TOP_K):
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
  fit = fit_approach3(n_other, D, L, top_k=top_k)
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
  """Rows of a results CSV as dicts; used columns must be positive numbers, other cells are kept as text."""
  path = Path(path)
  if not path.is_file():
    raise UserError(f'Results file {path} does not exist: pass --results=FILE.csv written by a sweep.')
  with open(path, newline='') as f:
    reader = csv.DictReader(f)
    columns = reader.fieldnames or []
    rows = list(reader)
  if not columns:
    raise UserError(f'Results file {path} is empty: it needs a header with params, tokens and loss columns.')
  loss_key = resolve_loss_key(columns, loss_key)
  needed = [params_key, tokens_key, loss_key]
  optional = [k for k in (flops_key or 'flops', 'budget') if k in columns]
  for key in needed:
    if key not in columns:
      raise UserError(f'Results file {path} has no {key!r} column: add it (or name another column by argument).')
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


def read_curves(curves):
  """Training curves from a dict or a JSON file: run -> {params, curve_flops, curve_tokens, curve_loss}."""
  if curves is None or isinstance(curves, dict):
    return curves
  path = Path(curves)
  try:
    data = json.loads(path.read_text())
  except FileNotFoundError:
    raise UserError(f'Curves file {path} does not exist: pass a JSON file of per-run training curves.') from None
  except json.JSONDecodeError:
    raise UserError(f'Curves file {path} is not valid JSON: write run -> {{params, curve_flops, ...}}.') from None
  if not isinstance(data, dict):
    raise UserError(f'Curves file {path} must hold a JSON object mapping run name to its curve.')
  return data
