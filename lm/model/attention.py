"""Causal multi-head attention with grouped-query heads, positional encodings and a KV cache.

Shape letters as in lm/model/transformer.py. Positional variants:
  learned / sinusoidal: added to the token embeddings (in the model);
  rope:  rotary embeddings on q and k (Su et al. 2021), pairs (2i, 2i+1) rotated by
         pos * base^(-2i/H);
  alibi: a per-head linear bias -m_h * (i - j) on the attention logits (Press et al. 2022);
  none:  causal masking alone supplies order information.
"""
import math

import flax.linen as nn
import jax
import jax.numpy as jnp

from lm.model import lora
from lm.model import parametrization as mup
from lm.model.sharding import constrain
from lm.errors import UserError
from lm.config import ModelConfig


def sinusoidal_table(positions, d: int):
  """The original Transformer's encoding: PE[p, 2i] = sin(p / 10000^(2i/d)), PE[p, 2i+1] = cos."""
  inv_freq = 10000.0 ** (-jnp.arange(0, d, 2, dtype=jnp.float32) / d)     # [d/2]
  angles = positions[..., None].astype(jnp.float32) * inv_freq            # [..., d/2]
  return jnp.stack([jnp.sin(angles), jnp.cos(angles)], axis=-1).reshape(*positions.shape, d)


def apply_rope(x_BTNH, positions_BT, base: float):
  """Rotates each pair (2i, 2i+1) of the head dimension by the angle pos * base^(-2i/H)."""
  H = x_BTNH.shape[-1]
  inv_freq = base ** (-jnp.arange(0, H, 2, dtype=jnp.float32) / H)        # [H/2]
  angles = positions_BT[..., None].astype(jnp.float32) * inv_freq         # [B, T, H/2]
  cos = jnp.cos(angles)[:, :, None, :]
  sin = jnp.sin(angles)[:, :, None, :]
  x = x_BTNH.astype(jnp.float32).reshape(*x_BTNH.shape[:-1], H // 2, 2)
  x1, x2 = x[..., 0], x[..., 1]
  out = jnp.stack([x1 * cos - x2 * sin, x1 * sin + x2 * cos], axis=-1)
  return out.reshape(x_BTNH.shape).astype(x_BTNH.dtype)


def alibi_slopes(n_heads: int):
  """Geometric slopes 2^(-8h/n); for n not a power of two, interleave the next power's slopes."""
  def power_of_two(n):
    return [2.0 ** (-8.0 * (h + 1) / n) for h in range(n)]
  p = 2 ** math.floor(math.log2(n_heads))
  slopes = power_of_two(p)
  if p < n_heads:
    slopes += power_of_two(2 * p)[0::2][: n_heads - p]
  return jnp.array(slopes, jnp.float32)


def alibi_bias(n_heads: int, q_pos, k_pos):
  """ALiBi's float32 bias -m_h * (q - k) for query positions q_pos [B or 1, T] and key positions
  k_pos [B or 1, S]: [B or 1, N, T, S]. Training passes slots [1, T], so the bias is one
  [1, N, T, T] array however large the batch (see Attention)."""
  dist = (q_pos[:, :, None] - k_pos[:, None, :]).astype(jnp.float32)
  return -alibi_slopes(n_heads)[None, :, None, None] * dist[:, None]


def causal_mask(q_slot_T, k_slot_S, k_valid_BS=None):
  """[B or 1, 1, T, S] True where query slot t may attend to key slot s."""
  mask = (k_slot_S[None, :] <= q_slot_T[:, None])[None, None]
  if k_valid_BS is not None:
    mask = mask & k_valid_BS[:, None, None, :]
  return mask


BRANCHES = 64   # segment ids >= this are branches of a shared prefix (see segment_mask)


def segment_mask(segment_ids_BT):
  """[B, 1, T, T] causal and within one segment: packed examples never see each other.

  Shared prefixes (scoring several continuations of one context, lm/eval/harness.py): a segment
  id -g (negative) marks the tokens of a context g, and an id g * BRANCHES + k (k >= 1) the tokens
  of its k-th continuation, which see the context and themselves but not the other
  continuations. Ids 0..BRANCHES-1 (packed examples, padding) are untouched by this rule."""
  T = segment_ids_BT.shape[1]
  q, k = segment_ids_BT[:, :, None], segment_ids_BT[:, None, :]
  visible = (q == k) | ((q >= BRANCHES) & (k == -(q // BRANCHES)))
  return visible[:, None] & causal_mask(jnp.arange(T), jnp.arange(T))


CUDNN_DTYPES = ('bfloat16', 'float16')


def choose_implementation(requested: str, dtype: str, platform: str, head_dim: int, pos: str
                          ) -> tuple[str, str]:
  """(implementation, why) for jax.nn.dot_product_attention: 'cudnn' (the fused flash-attention
  kernel) or 'xla'. 'auto' takes cuDNN where it applies: a GPU, a 16-bit compute dtype, a head
  dimension that is a multiple of 8 up to 128, and no ALiBi bias (cuDNN would read a
  materialised bias); XLA otherwise. An explicit 'cudnn' that cannot run is a UserError here,
  at config time, rather than an error inside JAX at the first step."""
  why_not = []
  if platform != 'gpu':
    why_not.append(f'it needs a GPU (this is {platform})')
  if dtype not in CUDNN_DTYPES:
    why_not.append(f'it needs model.dtype bfloat16 or float16 (not {dtype})')
  if head_dim % 8 or head_dim > 128:
    why_not.append(f'it needs a head dimension that is a multiple of 8 up to 128 (not {head_dim})')
  if pos == 'alibi':
    why_not.append('ALiBi needs a bias it does not take here')
  if requested == 'cudnn':
    if why_not:
      raise UserError('model.attention_impl=cudnn cannot run: ' + '; '.join(why_not)
                      + '. Use auto (cuDNN where it applies, XLA otherwise) or xla.')
    return 'cudnn', 'requested'
  if requested == 'xla':
    return 'xla', 'requested'
  if why_not:
    return 'xla', 'auto: cuDNN not used because ' + '; '.join(why_not)
  return 'cudnn', 'auto: GPU, 16-bit compute, head dimension within cuDNN\'s limits'


def causal_blocks(T: int) -> int:
  """Query blocks for causal training attention (see `blocked_attention`): 4 for T >= 128
  divisible by 4, where it was measured to pay; shorter rows are not worth the extra kernels."""
  return 4 if T >= 128 and T % 4 == 0 else 1


def blocked_attention(q_BTNH, k_BTKH, v_BTKH, blocks: int, bias=None, mask=None,
                      implementation=None, scale=None):
  """Causal self-attention computed block by block over the queries.

  Query block i (rows [i c, (i+1) c), c = T / blocks) can only see keys [0, (i+1) c), so it is
  scored against that prefix alone: the scores and softmax cover (blocks + 1) / (2 blocks) of
  the T x T square (5/8 at 4 blocks) instead of all of it. The keys a block skips are exactly
  the ones the causal mask removes, so the result equals full causal attention up to float
  rounding. bias [B or 1, N, T, T] and mask [B or 1, 1 or N, T, T] (segments) are cut to match.
  On CPU at T = 128-256 this makes the training step 10-15% faster (benchmarks/README.md).
  """
  T = q_BTNH.shape[1]
  c = T // blocks
  outs = []
  for i in range(blocks):
    rows, S = slice(i * c, (i + 1) * c), (i + 1) * c
    keep = causal_mask(i * c + jnp.arange(c), jnp.arange(S))
    if mask is not None:
      keep = keep & mask[:, :, rows, :S]
    b = None if bias is None else bias[:, :, rows, :S]
    outs.append(jax.nn.dot_product_attention(q_BTNH[:, rows], k_BTKH[:, :S], v_BTKH[:, :S],
                                             bias=b, mask=keep, scale=scale,
                                             implementation=implementation))
  return jnp.concatenate(outs, axis=1)


def head_rms_norm(x, scale_H, eps: float):
  """x [..., H] / RMS over H (in float32) * scale: QK-norm, which bounds the attention logits
  however large the projections grow (Dehghani et al. 2023, ViT-22B)."""
  x32 = x.astype(jnp.float32)
  x32 = x32 * jax.lax.rsqrt((x32 * x32).mean(-1, keepdims=True) + eps)
  return (x32 * scale_H.astype(jnp.float32)).astype(x.dtype)


class Attention(nn.Module):
  """Causal self-attention; with a cache, writes this call's k/v at the cache index first.

  segment_ids_BT (training only): tokens attend only within their own segment (packed rows).
  """
  cfg: ModelConfig
  deterministic: bool = True

  @nn.compact
  def __call__(self, x_BTD, positions_BT, layer_cache=None, cache_meta=None,
               segment_ids_BT=None):
    c = self.cfg
    dt, pdt = jnp.dtype(c.dtype), jnp.dtype(c.param_dtype)
    N, K, H, D = c.n_heads, c.n_kv_heads, c.head_dim, c.d_model
    std = mup.hidden_init_std(c)
    init = nn.initializers.normal(std)

    def proj(name, heads, axes):
      w = self.param(name, nn.with_logical_partitioning(init, ('embed', axes, 'head_dim')),
                     (D, heads, H), pdt)
      y = jnp.einsum('btd,dnh->btnh', x_BTD, w.astype(dt))
      y += lora.adapter(self, name[1], x_BTD, (D, heads, H), 1, ('embed',), (axes, 'head_dim'),
                        self.deterministic)
      if c.use_bias:
        y += self.param(name + '_bias', nn.with_logical_partitioning(
            nn.initializers.zeros, (axes, 'head_dim')), (heads, H), pdt).astype(dt)
      return constrain(y, 'batch', None, axes, None)

    q_BTNH = proj('wq', N, 'heads')
    k_BTKH = proj('wk', K, 'kv_heads')
    v_BTKH = proj('wv', K, 'kv_heads')
    if c.qk_norm:   # each head's query and key to unit RMS times a learned scale, before RoPE
      scale = lambda name: self.param(name, nn.with_logical_partitioning(
          nn.initializers.ones, ('head_dim',)), (H,), pdt)
      q_BTNH = head_rms_norm(q_BTNH, scale('q_norm'), c.norm_eps)
      k_BTKH = head_rms_norm(k_BTKH, scale('k_norm'), c.norm_eps)
    if c.pos == 'rope':
      q_BTNH = apply_rope(q_BTNH, positions_BT, c.rope_base)
      k_BTKH = apply_rope(k_BTKH, positions_BT, c.rope_base)

    T = x_BTD.shape[1]
    if layer_cache is None:
      k_BSKH, v_BSKH, k_pos_BS = k_BTKH, v_BTKH, positions_BT
      # Plain causal (mask None) lets the fused kernels skip the upper triangle.
      mask = None if segment_ids_BT is None else segment_mask(segment_ids_BT)
    else:
      index, k_pos_BS, k_valid_BS = cache_meta
      k_cache, v_cache, layer = layer_cache
      if layer is None:   # this layer's own [B, S, K, H] slice (the scanned model)
        k_BSKH = jax.lax.dynamic_update_slice_in_dim(k_cache, k_BTKH.astype(k_cache.dtype),
                                                     index, axis=1)
        v_BSKH = jax.lax.dynamic_update_slice_in_dim(v_cache, v_BTKH.astype(v_cache.dtype),
                                                     index, axis=1)
        layer_cache = (k_BSKH, v_BSKH, None)
      else:  # the stacked [L, B, S, K, H] cache, updated in place rather than re-stacked
        at = (layer, 0, index, 0, 0)
        k_cache = jax.lax.dynamic_update_slice(k_cache, k_BTKH[None].astype(k_cache.dtype), at)
        v_cache = jax.lax.dynamic_update_slice(v_cache, v_BTKH[None].astype(v_cache.dtype), at)
        k_BSKH, v_BSKH = k_cache[layer], v_cache[layer]
        layer_cache = (k_cache, v_cache, layer)
      S = k_BSKH.shape[1]
      mask = causal_mask(index + jnp.arange(T), jnp.arange(S), k_valid_BS)
      k_BSKH, v_BSKH = k_BSKH.astype(dt), v_BSKH.astype(dt)

    bias = None
    if c.pos == 'alibi' and layer_cache is None:
      # Without a cache, positions advance by one per slot within each example (the default,
      # packed segments restarting at 0, left padding), so wherever the mask lets query i see
      # key j their distance is i - j: one [1, N, T, T] bias serves the whole batch instead of
      # a [B, N, T, T] one built from positions_BT.
      slots = jnp.arange(T)[None]
      bias = alibi_bias(N, slots, slots)
      if mask is None:  # the bias needs an explicit mask beside it on every implementation
        mask = causal_mask(jnp.arange(T), jnp.arange(T))
    elif c.pos == 'alibi':   # decoding: rows may sit at different positions
      bias = alibi_bias(N, positions_BT, k_pos_BS)

    impl = None if c.attention_impl == 'auto' else c.attention_impl
    blocks = causal_blocks(T) if layer_cache is None and impl != 'cudnn' else 1
    if blocks > 1:
      out_BTNH = blocked_attention(q_BTNH, k_BSKH, v_BSKH, blocks, bias=bias, mask=mask,
                                   implementation=impl, scale=mup.attention_scale(c))
    else:
      out_BTNH = jax.nn.dot_product_attention(
          q_BTNH, k_BSKH, v_BSKH, bias=bias, mask=mask, is_causal=mask is None,
          scale=mup.attention_scale(c), implementation=impl)

    out_BTNH = constrain(out_BTNH, 'batch', None, 'heads', None)
    wo = self.param('wo', nn.with_logical_partitioning(
        nn.initializers.normal(std / math.sqrt(2 * c.n_layers)),
        ('heads', 'head_dim', 'embed')), (N, H, D), pdt)
    y_BTD = jnp.einsum('btnh,nhd->btd', out_BTNH, wo.astype(dt))
    y_BTD += lora.adapter(self, 'o', out_BTNH, (N, H, D), 2, ('heads', 'head_dim'), ('embed',),
                          self.deterministic)
    if c.use_bias:
      y_BTD += self.param('bo', nn.with_logical_partitioning(
          nn.initializers.zeros, ('embed',)), (D,), pdt).astype(dt)
    return y_BTD, layer_cache
