"""The numerics every fit shares: the law L(N, D) = E + A/N^α + B/D^β and its compute-optimal
frontier, the FLOPs-per-(N·D) count it is read in, log-log line fits, the Pareto envelope, budget
labels and the run-to-run noise of repeated seeds. numpy only.
"""

import math

import numpy as np


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


def flops_per_nd_at(N, D, C, n):
  """k = C / (N D) at size n, read off the runs' own FLOPs per token: each run's k_i = C_i / (N_i D_i),
  interpolated linearly in log N (the nearest run's value outside their range). Under the Appendix-F
  count k falls from ~13 to ~7 over the sizes of a CPU sweep, so one median k for a budget would put
  D_opt off by up to a factor 1.5 at the grid's edges."""
  N, D, C = (np.asarray(v, float) for v in (N, D, C))
  order = np.argsort(N)
  k = C[order] / (N[order] * D[order])
  return float(np.exp(np.interp(math.log(n), np.log(N[order]), np.log(k))))


def loglog_fit(X, Y):
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


def pareto(X, L):
  """Indices of the lower envelope: runs whose loss beats every run with smaller-or-equal X."""
  order = np.lexsort((L, X))
  keep, best = [], np.inf
  for i in order:
    if L[i] < best:
      keep.append(i)
      best = L[i]
  return np.array(keep, int)
