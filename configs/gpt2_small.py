"""GPT-2 small (124M with its 50257-token vocabulary; here with a 32K SentencePiece vocabulary):
learned positions, pre-norm LayerNorm, GELU, biases, tied embeddings. For accelerators."""
from configs import base


def get_config():
  c = base.get_config()
  m = c.model
  m.n_layers, m.d_model, m.n_heads, m.d_ff, m.max_len = 12, 768, 12, 3072, 1024
  m.pos, m.norm, m.mlp, m.use_bias, m.tie_embeddings = 'learned', 'layernorm', 'gelu', True, True
  m.dtype = 'bfloat16'
  c.data.tokenizer = 'sentencepiece'
  c.data.vocab_size = 32768
  t = c.train
  t.steps, t.batch_size, t.seq_len = 20_000, 256, 1024
  t.lr, t.warmup_steps, t.b2, t.weight_decay = 6e-4, 1000, 0.95, 0.1
  t.eval_every, t.checkpoint_every = 1000, 1000
  return c
