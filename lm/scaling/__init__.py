"""Scaling-law sweeps and fits.

Sweeps: sweep (run_sweep: plan, train, book, fit), plan (the runs a sweep config describes and
their configs), runner (training the plan: retries, failures, progress, WSD branches, packs),
parallel (runs in worker processes), packed (runs trained as one vmapped program), results
(results.csv and training curves).
Fits, numpy and scipy only: fit (fit_results on a results table, reading results), chinchilla
(Approaches 1-3), kaplan (Kaplan power laws), numerics (the law, its frontier and shared
numerics). Figures (plot) and the markdown summary (report: report.run_fit fits a results
table, then plots and writes report.md)."""
