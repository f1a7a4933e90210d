"""A larger IsoFLOP sweep for the compute-optimal exponents: 5 budgets from 1e13 to 1e14 FLOPs.

7 sizes per budget (N*/4 .. 4·N*), 34 distinct runs (two targets share a shape), 1.66e15 FLOPs
in all (Chinchilla App. F count), 343K optimizer steps. Byte tokenizer, the whole Python stdlib.

Cost, measured on a 2-core CPU with --config.sweep.parallel=2 (one run per core, 3.1-3.8e10 FLOP/s
each): 22, 30, 70 and 110 minutes for 1e13, 2e13, 4e13 and 7e13, about 3 hours more for 1e14,
about 7 hours in all; results of the first four budgets in docs/results/chinchilla_cpu. On one GPU
(not measured) these models are too small to keep it busy: the 343K steps at a few milliseconds
each, plus 34 compilations, come to roughly 30-60 minutes. Start with the small budgets, e.g.
--config.sweep.budgets='(1e13, 2e13)'; rerunning with more budgets skips what is done.
"""
from configs import sweep_smoke


def get_config():
  c = sweep_smoke.get_config()
  c.base.data.max_bytes = 0                      # the whole stdlib (~30 MB of text)
  # The 259-id byte vocabulary of the recorded runs (docs/results/chinchilla_cpu), so that later
  # budgets are the same family of models; the chat tokens only matter for fine-tuning.
  c.base.data.chat_tokens = False
  c.base.model.max_len = 256
  # 8 x 256 = 2048 tokens a step. At 1e13 FLOPs a batch of 32 x 256 ended 0.02 nats higher in eval
  # loss for the smallest model (33K) and 0.32 higher for the largest (579K, 238 steps): above the
  # critical batch at these losses, it starves the larger models of steps and skews the minima.
  c.base.train.batch_size, c.base.train.seq_len = 8, 256
  c.base.train.eval_batches = 64                 # the same 131K evaluation tokens as 16 x 32 x 256
  s = c.sweep
  s.budgets = (1e13, 2e13, 4e13, 7e13, 1e14)
  s.sizes_per_budget = 7
  s.head_dim = 32
  s.aspect = 48.0
  s.warmup_max = 200
  return c
