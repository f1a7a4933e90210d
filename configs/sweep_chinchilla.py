"""A larger IsoFLOP sweep for the compute-optimal exponents: 5 budgets from 1e13 to 1e14 FLOPs.

7 sizes per budget (N*/4 .. 4·N*), 35 runs, about 1.2e15 FLOPs in all (Chinchilla App. F count).
Expected cost: roughly 10-20 hours on a 2-core CPU; well under an hour on one modern GPU
(add --config.base.model.dtype=bfloat16 there). Byte tokenizer, full Python stdlib corpus.
"""
from configs import sweep_smoke


def get_config():
  c = sweep_smoke.get_config()
  c.base.data.max_bytes = 0                      # the whole stdlib (~30 MB of text)
  c.base.model.max_len = 256
  c.base.train.batch_size, c.base.train.seq_len = 32, 256
  c.base.train.eval_batches = 16
  s = c.sweep
  s.budgets = (1e13, 2e13, 4e13, 7e13, 1e14)
  s.sizes_per_budget = 7
  s.head_dim = 32
  s.aspect = 48.0
  s.warmup_max = 200
  return c
