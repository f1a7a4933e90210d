"""Figures of a scaling-law fit (PNG, Agg backend).

Loss vs compute, IsoFLOP curves, compute-optimal allocation and the Approach-3 fit against the data.
"""

from pathlib import Path

import matplotlib

matplotlib.use('Agg')  # fitting runs headless (CI, remote machines)
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
from matplotlib import cm, colors, ticker  # noqa: E402

from lm.scaling import fit as fitlib  # noqa: E402
from lm.scaling import numerics  # noqa: E402

DPI = 150
LOSS_LABEL = 'Final loss (nats/token)'
# Chinchilla's rule of thumb (Hoffmann et al. 2022): D ≈ 20 N with C = 6 N D, i.e. N_opt = sqrt(C / 120).
CHINCHILLA_TOKENS_PER_PARAM = 20.0


def _data(fit, rows):
  c = fit['columns']
  N, D, L, C, _, _ = fitlib.columns_of(rows, c['loss'], c['params'], c['flops'] or 'flops', c['tokens'])
  return N, D, L, C


def _lognorm(values):
  v = np.asarray(values, float)
  lo, hi = v.min(), v.max()
  return colors.LogNorm(lo, hi if hi > lo else lo * 1.01)


def _plain_log_ticks(ax):
  """Loss spans less than a decade, so label its log axis with plain evenly spaced values (2.4, not 2.4×10^0)."""
  lo, hi = ax.get_ylim()
  ticks = ticker.MaxNLocator(7).tick_values(lo, hi)
  ax.yaxis.set_major_locator(ticker.FixedLocator(ticks[(ticks >= lo) & (ticks <= hi) & (ticks > 0)]))
  ax.yaxis.set_major_formatter(ticker.ScalarFormatter())
  ax.yaxis.set_minor_formatter(ticker.NullFormatter())


def _save(fig, path):
  for ax in fig.axes:   # label 1-2-5 steps on log x axes; unlabelled minor ticks never collide
    if ax.get_xscale() == 'log' and ax.get_label() != '<colorbar>':
      ax.xaxis.set_major_locator(ticker.LogLocator(base=10, subs=(1.0, 2.0, 5.0)))
      ax.xaxis.set_minor_locator(ticker.LogLocator(base=10, subs=np.arange(1, 10)))
      ax.xaxis.set_minor_formatter(ticker.NullFormatter())
  fig.tight_layout()
  fig.savefig(path, dpi=DPI)
  plt.close(fig)
  return str(path)


def _kspec(a3):
  """FLOPs per N·D as the fit has it: fitted against N (newer fits) or one median number."""
  return a3.get('flops_per_ND_law') or a3['flops_per_ND']


def _a3_law(fit):
  a3 = fit['approach3']
  return a3 if a3.get('G') is not None else None


def plot_loss_vs_compute(fit, rows, path, curves=None):
  """Every run's training curve (or final point) vs compute, the frontier, and Approach 3's frontier loss."""
  N, D, L, C = _data(fit, rows)
  fig, ax = plt.subplots(figsize=(6.4, 4.6))
  cmap = plt.get_cmap('viridis')
  if curves:
    ns = [float(c['params']) for c in curves.values()]
    norm = _lognorm(ns)
    for c in curves.values():
      ax.plot(c['curve_flops'], c['curve_loss'], color=cmap(norm(float(c['params']))), lw=0.8, alpha=0.8)
  else:
    norm = _lognorm(N)
  ax.scatter(C, L, c=N, cmap=cmap, norm=norm, s=14, edgecolors='k', linewidths=0.3, zorder=3, label='final loss')
  keep = numerics.pareto(C, L)
  ax.plot(C[keep], L[keep], 'k-', lw=1.2, label='frontier (envelope of final losses)')
  a1 = fit.get('approach1')
  if a1 and a1['envelope']:
    env = a1['envelope']
    ax.plot([p['C'] for p in env], [p['loss'] for p in env], 'k:', lw=1.2, label='training-curve envelope')
  law = _a3_law(fit)
  if law:
    cs = np.geomspace(C.min(), C.max(), 100)
    n, d = numerics.frontier(law, cs, _kspec(fit['approach3']))
    ax.plot(cs, numerics.predict_loss(law, n, d), 'r--', lw=1.2, label='Approach 3 compute-optimal loss')
  ax.set(xscale='log', yscale='log', xlabel='Compute C (FLOPs)', title='Loss vs compute',
         ylabel='Loss (nats/token)' if curves else LOSS_LABEL)
  _plain_log_ticks(ax)
  fig.colorbar(cm.ScalarMappable(norm=norm, cmap=cmap), ax=ax, label='Parameters N')
  ax.legend(fontsize=7)
  return _save(fig, path)


def plot_isoflop(fit, rows, path):
  """Loss vs N per FLOP budget, the fitted parabolas in log N and their minima (hollow: outside the grid)."""
  N, D, L, C = _data(fit, rows)
  fig, ax = plt.subplots(figsize=(6.4, 4.6))
  budgets = fit['approach2']['budgets']
  cmap = plt.get_cmap('plasma')
  labels = numerics.group_budgets(C, _budget_column(rows), _decades(fit))
  allc = [b['C'] for b in budgets] or list(labels)
  norm = _lognorm(allc)
  for b in budgets:
    m = np.isclose(labels, b['C'], rtol=1e-9)
    col = cmap(norm(b['C']) * 0.9)  # the top of 'plasma' is too pale on white
    ax.scatter(N[m], L[m], color=col, s=16, zorder=3)
    lo, hi = np.log(b['N_range'])
    u = np.linspace(min(lo, np.log(b['N_opt'])), max(hi, np.log(b['N_opt'])), 100)
    ax.plot(np.exp(u), np.polyval(b['parabola_ln_N'], u), color=col, lw=1)
    ax.plot(b['N_opt'], b['loss_min'], marker='*', ms=11, color=col if b['minimum_inside_grid'] else 'none',
            markeredgecolor='k', zorder=4)
  ax.set(xscale='log', xlabel='Parameters N', ylabel=LOSS_LABEL,
         title='IsoFLOP curves (hollow star: minimum outside grid)')
  fig.colorbar(cm.ScalarMappable(norm=norm, cmap=cmap), ax=ax, label='FLOP budget C')
  return _save(fig, path)


def plot_optimal_allocation(fit, path):
  """N_opt(C) and D_opt(C): Approach 1/2 points and fits, Approach 3's frontier, and Chinchilla's 20 tokens/param."""
  fig, axes = plt.subplots(1, 2, figsize=(11, 4.4))
  a2, a1, law = fit['approach2'], fit.get('approach1'), _a3_law(fit)
  cs = [b['C'] for b in a2['budgets']] + ([p['C'] for p in a1['envelope']] if a1 else [])
  if not cs:
    cs = [1e12, 1e14]
  grid = np.geomspace(min(cs) / 3, max(cs) * 3, 100)
  for ax, key, letter, ylabel in ((axes[0], 'N', 'a', 'Optimal parameters N_opt'),
                                  (axes[1], 'D', 'b', 'Optimal tokens D_opt')):
    inside = [b for b in a2['budgets'] if b['minimum_inside_grid']]
    outside = [b for b in a2['budgets'] if not b['minimum_inside_grid']]
    ax.scatter([b['C'] for b in inside], [b[f'{key}_opt'] for b in inside], color='C0', zorder=3,
               label='Approach 2 minima')
    if outside:
      ax.scatter([b['C'] for b in outside], [b[f'{key}_opt'] for b in outside], facecolors='none',
                 edgecolors='C0', zorder=3, label='Approach 2 minima outside grid')
    if a2.get(letter) is not None:
      ax.plot(grid, np.exp(a2[f'{key}_intercept_ln']) * grid ** a2[letter], 'C0-',
              label=f'Approach 2 fit, {letter} = {a2[letter]:.3f}')
    if a1 and a1.get(letter) is not None:
      env = a1['envelope']
      ax.scatter([p['C'] for p in env], [p[f'{key}_opt'] for p in env], color='C2', s=8,
                 label='Approach 1 envelope (hollow: at the edge of the size grid)',
                 facecolors=['none' if p['at_grid_edge'] else 'C2' for p in env])
      ax.plot(grid, np.exp(a1[f'{key}_intercept_ln']) * grid ** a1[letter], 'C2-',
              label=f'Approach 1 fit, {letter} = {a1[letter]:.3f}')
    if law:
      n, d = numerics.frontier(law, grid, _kspec(fit['approach3']))
      ax.plot(grid, n if key == 'N' else d, 'r--', label=f'Approach 3 frontier, {letter} = {law[letter]:.3f}')
    n_ref = np.sqrt(grid / (6 * CHINCHILLA_TOKENS_PER_PARAM))
    ax.plot(grid, n_ref if key == 'N' else CHINCHILLA_TOKENS_PER_PARAM * n_ref, 'k:',
            label='Chinchilla: D = 20 N, C = 6 N D')
    ax.set(xscale='log', yscale='log', xlabel='Compute C (FLOPs)', ylabel=ylabel)
    ax.legend(fontsize=7)
  fig.suptitle(f'Compute-optimal allocation ({fit["params_convention"]} parameters, {fit["flops_convention"]} FLOPs)')
  return _save(fig, path)


def plot_approach3_fit(fit, rows, path):
  """Approach 3 against the data: predicted vs observed loss, and loss vs N along each budget's IsoFLOP curve."""
  N, D, L, C = _data(fit, rows)
  fig, axes = plt.subplots(1, 2, figsize=(11, 4.4))
  law = fit['approach3']
  pred = numerics.predict_loss(law, N, D)
  norm = _lognorm(N)
  sc = axes[0].scatter(L, pred, c=N, norm=norm, cmap='viridis', s=14, edgecolors='k', linewidths=0.3)
  lim = [min(L.min(), pred.min()) * 0.98, max(L.max(), pred.max()) * 1.02]
  axes[0].plot(lim, lim, 'k--', lw=1, label='y = x')
  held = fit.get('heldout')
  if held:
    axes[0].scatter([r['loss'] for r in held['runs']], [r['predicted'] for r in held['runs']], marker='x',
                    color='r', s=30, label=f'held out (fit without C = {held["heldout_C"]:.2g})')
  axes[0].set(xlim=lim, ylim=lim, xlabel=f'Observed {LOSS_LABEL.lower()}',
              ylabel='Predicted loss (nats/token)', title='Approach 3: predicted vs observed')
  axes[0].legend(fontsize=7)
  fig.colorbar(sc, ax=axes[0], label='Parameters N')
  labels = numerics.group_budgets(C, _budget_column(rows), _decades(fit))
  cmap = plt.get_cmap('plasma')
  bnorm = _lognorm(labels)
  k = _kspec(law)
  for lab in np.unique(labels):
    m = labels == lab
    col = cmap(bnorm(lab) * 0.9)
    axes[1].scatter(N[m], L[m], color=col, s=14)
    if len(np.unique(N[m])) >= 2:
      ns = np.geomspace(N[m].min(), N[m].max(), 60)
      axes[1].plot(ns, numerics.predict_loss(law, ns, lab / (numerics.flops_per_nd(k, ns) * ns)), color=col, lw=1)
  axes[1].set(xscale='log', xlabel='Parameters N', ylabel=LOSS_LABEL,
              title='Approach 3 along each budget (lines), data (points)')
  fig.colorbar(cm.ScalarMappable(norm=bnorm, cmap=cmap), ax=axes[1], label='FLOP budget C')
  return _save(fig, path)


def _budget_column(rows):
  if rows and 'budget' in rows[0] and all(r.get('budget') not in (None, '') for r in rows):
    return np.array([float(r['budget']) for r in rows])
  return None


def _decades(fit):
  return fit['approach2'].get('budget_decades') or 0.1


FILES = {'loss_vs_compute': 'loss_vs_compute.png', 'isoflop': 'isoflop.png',
         'optimal_allocation': 'optimal_allocation.png', 'approach3_fit': 'approach3_fit.png'}


def make_all(fit, rows, workdir, curves=None):
  """All figures into workdir; returns their paths."""
  workdir = Path(workdir)
  workdir.mkdir(parents=True, exist_ok=True)
  paths = [plot_loss_vs_compute(fit, rows, workdir / FILES['loss_vs_compute'], curves)]
  if fit['approach2']['budgets']:
    paths.append(plot_isoflop(fit, rows, workdir / FILES['isoflop']))
  paths.append(plot_optimal_allocation(fit, workdir / FILES['optimal_allocation']))
  paths.append(plot_approach3_fit(fit, rows, workdir / FILES['approach3_fit']))
  return paths


def plot_task_vs_compute(rows: list[dict], tasks: list[str], path):
  """A sweep's benchmarks against training compute, beside its loss: one panel of eval loss and
  one per harness task (its first metric), every run a point coloured by model size. Where a task
  jumps from chance while the loss falls smoothly is where emergence shows."""
  metric = {t: next((k for k in rows[0] if k.startswith(f'{t}/')), None) for t in tasks}
  panels = [('eval_loss', 'eval loss (nats/token)')] + [
      (metric[t], metric[t]) for t in tasks if metric[t]]
  fig, axes = plt.subplots(1, len(panels), figsize=(4.2 * len(panels), 3.6), squeeze=False)
  N = np.array([float(r['params']) for r in rows])
  C = np.array([float(r['flops']) for r in rows])
  norm = _lognorm(N)
  for ax, (key, label) in zip(axes[0], panels):
    y = np.array([float(r[key]) if r.get(key) not in (None, '') else np.nan for r in rows])
    sc = ax.scatter(C, y, c=N, cmap='viridis', norm=norm, s=28, edgecolors='k', linewidths=0.4)
    ax.set_xscale('log')
    if C.max() < 10 * C.min():   # less than a decade of compute: show one, centred
      mid = float(np.sqrt(C.max() * C.min()))
      ax.set_xlim(mid / 10 ** 0.5, mid * 10 ** 0.5)
    ax.xaxis.set_major_locator(ticker.LogLocator(base=10, subs=(1.0, 2.0, 5.0)))
    ax.xaxis.set_minor_locator(ticker.LogLocator(base=10, subs=np.arange(1, 10)))
    ax.xaxis.set_minor_formatter(ticker.NullFormatter())
    ax.set_xlabel('training FLOPs (Chinchilla App. F count)')
    ax.set_title(label, fontsize=10)
    ax.grid(alpha=0.3, which='both')
  fig.colorbar(sc, ax=axes[0].tolist(), label='parameters N')
  fig.savefig(path, dpi=DPI, bbox_inches='tight')
  plt.close(fig)
  return str(path)
