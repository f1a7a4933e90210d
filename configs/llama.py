"""A Llama-shaped model (~150M): RoPE, RMSNorm, SwiGLU, grouped-query attention, no biases,
untied output head, bfloat16 compute. For accelerators."""
from configs import base


def get_config():
  c = base.get_config()
  m = c.model
  m.n_layers, m.d_model, m.n_heads, m.n_kv_heads, m.max_len = 16, 768, 12, 4, 2048
  m.d_ff = 2048
  m.pos, m.norm, m.mlp, m.use_bias, m.tie_embeddings = 'rope', 'rmsnorm', 'swiglu', False, False
  m.rope_base = 500000.0
  m.dtype = 'bfloat16'
  m.scan_layers = True
  c.data.tokenizer = 'sentencepiece'
  c.data.vocab_size = 32768
  t = c.train
  t.steps, t.batch_size, t.seq_len = 20_000, 128, 2048
  t.lr, t.warmup_steps, t.b2, t.weight_decay = 3e-4, 1000, 0.95, 0.1
  t.eval_every, t.checkpoint_every = 1000, 1000
  return c
