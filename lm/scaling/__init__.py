"""Scaling-law sweeps (sweep), fits (fit: numerics only), figures (plot) and the markdown
summary (report: report.run_fit fits a results table, then plots and writes report.md)."""
