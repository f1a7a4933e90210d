"""Kaplan et al. 2020 ("Scaling Laws for Neural Language Models", arXiv:2001.08361) power laws
L(N), L(D), L(C) on the lower envelopes of final losses."""

import math

import numpy as np
from scipy import optimize

from lm.scaling import numerics


def _kaplan_law(X, L, name):
  """L = (X_c / X)^α fit as a line in log-log space, plus L = E + (X_c / X)^α when it converges."""
  slope, icpt, se = numerics.loglog_fit(X, L)
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
    keep = numerics.pareto(ux, best)
    out[f'L_{name}'] = _kaplan_law(ux[keep], best[keep], name)
  keep = numerics.pareto(C, L)
  out['L_C'] = _kaplan_law(C[keep], L[keep], 'C')
  slope, _, se = numerics.loglog_fit(C[keep], N[keep])
  out['frontier_N_opt_exponent'] = slope
  out['frontier_N_opt_exponent_se'] = se
  return out
