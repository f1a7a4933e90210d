"""Parameter and FLOP accounting: every count the project reports comes from here."""
import jax
import numpy as np

from lm.model.transformer import is_embedding_path


def count_params(tree) -> int:
  """Total number of scalars in a pytree of arrays (or ShapeDtypeStructs)."""
  return sum(int(np.prod(x.shape)) for x in jax.tree_util.tree_leaves(tree))


def param_counts(params) -> dict:
  """{'total': all scalars, 'nonembed': minus token/position embeddings and an untied head}."""
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


def model_flops_per_token(cfg, seq_len: int, n_nonembed: int, causal: bool = True) -> float:
  """Model FLOPs per training token as the PaLM paper defines them for MFU (Chowdhery et al.
  2022, App. B): 6 N + 12 L H Q T, with N the non-embedding parameters and H Q the attention
  width. PaLM counts the full T x T attention; a causal model needs only the lower triangle,
  and a kernel that skips the masked blocks does half that work, so `causal` (the default, used
  for the `mfu` this project reports) halves the attention term to 6 L H Q T."""
  attn = 12 * cfg.n_layers * cfg.n_heads * cfg.head_dim * seq_len
  return 6 * n_nonembed + (attn / 2 if causal else attn)


def flops_per_token(cfg, seq_len: int, n_params: int, n_nonembed: int | None = None) -> dict:
  """Training FLOPs per token: Chinchilla App. F (3x forward; what budgets count), 6N and, given
  the non-embedding count, the model FLOPs that MFU divides by."""
  fwd = chinchilla_forward_flops(cfg, seq_len)['total']
  out = {'chinchilla': 3 * fwd / seq_len, '6n': 6 * n_params}
  if n_nonembed is not None:
    out['model'] = model_flops_per_token(cfg, seq_len, n_nonembed)
  return out


# Dense peak rates (FLOP/s) per device from the vendors' data sheets, for MFU, keyed by the exact
# `device_kind` JAX reports (no substring matching: 'NVIDIA L4' is not 'NVIDIA L40S').
# float32 is the plain FP32 rate (no TF32).
_H100 = {'bfloat16': 989e12, 'float32': 67e12}
PEAK_FLOPS = {
    'NVIDIA H200': _H100,
    'NVIDIA H100 80GB HBM3': _H100,
    'NVIDIA H100 PCIe': {'bfloat16': 756e12, 'float32': 51e12},
    'NVIDIA H100 NVL': {'bfloat16': 835e12, 'float32': 60e12},
    'NVIDIA A100-SXM4-80GB': {'bfloat16': 312e12, 'float32': 19.5e12},
    'NVIDIA A100-SXM4-40GB': {'bfloat16': 312e12, 'float32': 19.5e12},
    'NVIDIA A100 80GB PCIe': {'bfloat16': 312e12, 'float32': 19.5e12},
    'NVIDIA A100-PCIE-40GB': {'bfloat16': 312e12, 'float32': 19.5e12},
    'NVIDIA L40S': {'bfloat16': 362e12, 'float32': 91.6e12},
    'NVIDIA L4': {'bfloat16': 121e12, 'float32': 30.3e12},
    'Tesla V100-SXM2-16GB': {'bfloat16': 125e12, 'float32': 15.7e12},
    'Tesla V100-SXM2-32GB': {'bfloat16': 125e12, 'float32': 15.7e12},
    'TPU v2': {'bfloat16': 45e12, 'float32': 45e12},
    'TPU v3': {'bfloat16': 123e12, 'float32': 123e12},
    'TPU v4': {'bfloat16': 275e12, 'float32': 275e12},
    'TPU v5 lite': {'bfloat16': 197e12, 'float32': 197e12},
    'TPU v5': {'bfloat16': 459e12, 'float32': 459e12},
    'TPU v5p': {'bfloat16': 459e12, 'float32': 459e12},
    'TPU v6 lite': {'bfloat16': 918e12, 'float32': 918e12},
}


def peak_flops(device_kind: str, dtype: str, override: float = 0.0) -> float:
  """Peak FLOP/s of one device: the user's figure, else the table's entry for exactly this
  device kind, else 0 (MFU not shown; `unknown_device_note` says how to set it)."""
  if override > 0:
    return float(override)
  rates = PEAK_FLOPS.get(device_kind.strip())
  if rates is None:
    return 0.0
  return rates.get(dtype, rates['bfloat16'])


def unknown_device_note(device_kind: str, platform: str) -> str | None:
  """One sentence for an accelerator whose peak is not in the table (None on CPUs and known
  devices): MFU needs train.peak_flops."""
  if platform == 'cpu' or device_kind.strip() in PEAK_FLOPS:
    return None
  return (f'unknown device {device_kind!r}: MFU is not reported; set train.peak_flops to its '
          'peak FLOP/s for the compute dtype to see it.')


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
