"""Parameter and FLOP accounting: every count the project reports comes from here."""
import jax
import numpy as np


def count_params(tree) -> int:
  """Total number of scalars in a pytree of arrays (or ShapeDtypeStructs)."""
  return sum(int(np.prod(x.shape)) for x in jax.tree_util.tree_leaves(tree))


def param_counts(params) -> dict:
  """{'total': all scalars, 'nonembed': minus token/position embeddings and an untied head}."""
  from lm.model import is_embedding_path  # local: lm.model imports nothing from here
  total = embed = 0
  for path, x in jax.tree_util.tree_flatten_with_path(params)[0]:
    n = int(np.prod(x.shape))
    total += n
    if is_embedding_path(tuple(getattr(k, 'key', str(k)) for k in path)):
      embed += n
  return {'total': total, 'nonembed': total - embed}


def chinchilla_forward_flops(cfg, seq_len: int) -> dict:
  """Forward FLOPs of one sequence, term by term, after Hoffmann et al. 2022, Appendix F.

  Extended to grouped-query heads (k/v projections have n_kv_heads) and SwiGLU (three
  matrices). A multiply-add counts as 2 FLOPs; the softmax as 3 per logit.
  """
  T, D, V, F = seq_len, cfg.d_model, cfg.vocab_size, cfg.d_ff
  q_width = cfg.n_heads * cfg.head_dim
  kv_width = cfg.n_kv_heads * cfg.head_dim
  mlp_mats = 3 if cfg.mlp == 'swiglu' else 2
  terms = {
      'embeddings': 2 * T * V * D,
      'attention_qkv': 2 * T * D * (q_width + 2 * kv_width),
      'attention_logits': 2 * T * T * q_width,
      'attention_softmax': 3 * cfg.n_heads * T * T,
      'attention_values': 2 * T * T * q_width,
      'attention_out': 2 * T * q_width * D,
      'mlp': 2 * T * mlp_mats * D * F,
      'logits': 2 * T * D * V,
  }
  per_layer = ('attention_qkv', 'attention_logits', 'attention_softmax', 'attention_values',
               'attention_out', 'mlp')
  for k in per_layer:
    terms[k] *= cfg.n_layers
  terms['total'] = sum(terms.values())
  return terms


def flops_per_token(cfg, seq_len: int, n_params: int) -> dict:
  """Training FLOPs per token in both conventions: Chinchilla App. F (3x forward) and 6N."""
  fwd = chinchilla_forward_flops(cfg, seq_len)['total']
  return {'chinchilla': 3 * fwd / seq_len, '6n': 6 * n_params}


# Dense peak rates (FLOP/s) per device from the vendors' data sheets, for MFU.
PEAK_FLOPS = {
    # device_kind substring: {dtype: flop/s}
    'H200': {'bfloat16': 989e12, 'float32': 67e12},
    'H100': {'bfloat16': 989e12, 'float32': 67e12},
    'A100': {'bfloat16': 312e12, 'float32': 19.5e12},
    'L4': {'bfloat16': 121e12, 'float32': 30e12},
    'V100': {'bfloat16': 125e12, 'float32': 15.7e12},
    'TPU v6': {'bfloat16': 918e12, 'float32': 918e12},
    'TPU v5p': {'bfloat16': 459e12, 'float32': 459e12},
    'TPU v5 lite': {'bfloat16': 197e12, 'float32': 197e12},
    'TPU v5e': {'bfloat16': 197e12, 'float32': 197e12},
    'TPU v4': {'bfloat16': 275e12, 'float32': 275e12},
}


def peak_flops(device_kind: str, dtype: str, override: float = 0.0) -> float:
  """Peak FLOP/s of one device: the user's figure, else the table, else 0 (MFU not shown)."""
  if override > 0:
    return float(override)
  for key, rates in PEAK_FLOPS.items():
    if key.lower() in device_kind.lower():
      return rates.get(dtype, rates['bfloat16'])
  return 0.0


def param_counts_from_config(cfg) -> dict:
  """The same counts as `param_counts`, from the shape alone (fast: used to plan sweeps)."""
  D, F, V, H = cfg.d_model, cfg.d_ff, cfg.vocab_size, cfg.head_dim
  q, kv = cfg.n_heads * H, cfg.n_kv_heads * H
  bias = cfg.use_bias
  attn = D * (q + 2 * kv) + q * D + (q + 2 * kv + D if bias else 0)
  mlp = (3 if cfg.mlp == 'swiglu' else 2) * D * F + (F + D if bias else 0)
  norm = D * (2 if cfg.norm == 'layernorm' and bias else 1)
  layer = attn + mlp + 2 * norm
  final_norm = norm if cfg.block == 'prenorm' else 0
  embed = V * D + (0 if cfg.tie_embeddings else D * V) + (cfg.max_len * D if cfg.pos == 'learned'
                                                           else 0)
  total = cfg.n_layers * layer + final_norm + embed
  return {'total': total, 'nonembed': total - embed}
