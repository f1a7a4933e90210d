"""An IsoFLOP sweep on the synthetic Markov corpus, whose entropy rate is the true irreducible loss:
the fitted E of Approach 3 can be checked against it (report.md, fit.json 'truth')."""
from configs import sweep_smoke


def get_config():
  c = sweep_smoke.get_config()
  d = c.base.data
  d.corpus, d.tokenizer = 'synthetic', 'bytes'
  d.synthetic_vocab, d.synthetic_order, d.synthetic_branching = 64, 2, 6
  d.synthetic_tokens = 20_000_000
  c.sweep.budgets = (3e11, 1e12, 3e12)
  return c
