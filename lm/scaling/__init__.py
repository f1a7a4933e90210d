"""Scaling-law fitting (fit), figures (plot) and the markdown summary (report) of a sweep's results."""

from lm.scaling.fit import fit_results, read_results, run_fit

__all__ = ['fit_results', 'read_results', 'run_fit']
