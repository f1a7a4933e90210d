"""LoRA: low-rank adapters on a frozen model (Hu et al. 2021).

A target matrix W (fan_in x fan_out, stored in whatever shape the model keeps it, e.g. wq as
[D, N, H]) gets two trainable factors A [fan_in, r] and B [r, fan_out]; the layer computes
x W + (alpha / r) (dropout(x) A) B. B starts at zero, so at step 0 the adapted model computes
exactly the base model's function, and the update to W has rank at most r. The low-rank path is
evaluated as two thin matmuls and W is never materialised with its update, so the gradient
reaches A and B without a gradient for W ever being formed.

Layout: the adapters live in their own Flax collection, 'lora', beside 'params', with the same
module paths: params ['layer_0']['attn']['wq'] has adapters ['layer_0']['attn']['wq_a'] and
['wq_b']. Training differentiates the 'lora' tree alone (lm/stages/finetune.py); the base is an input.

Trainable numbers per adapted matrix: r (fan_in + fan_out); for a 4096 x 4096 matrix at rank 16
that is 131,072 of 16,777,216 (0.78%). `merge` folds the adapters back: W + (alpha / r) A B.

Token rows (mc.lora_tokens): tokens that never occurred in pretraining, such as the chat markers,
have embeddings the base never trained, and a low-rank update of the layers cannot give them a
meaning. Their rows of the embedding table (and of the head when it is untied) get a trainable
additive delta, zero at step 0, like the trainable-token option of Hugging Face PEFT: d_model
numbers per token ('embed_rows', 'head_rows' in the lora collection).
"""
import dataclasses
import math

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from lm.config import LORA_TARGETS, ModelConfig

COLLECTION = 'lora'


def adapter(module: nn.Module, target: str, x, w_shape: tuple[int, ...], in_ndim: int,
            in_axes: tuple, out_axes: tuple, deterministic: bool):
  """The low-rank term (alpha/r) (x A) B for the weight `target` of `module`, or 0 if not adapted.

  x: [..., *w_shape[:in_ndim]]; returns [..., *w_shape[in_ndim:]] in x's dtype.
  """
  c: ModelConfig = module.cfg
  if not c.lora_rank or target not in c.lora_targets:
    return 0.0
  r = c.lora_rank
  name = LORA_TARGETS[target][1]
  in_shape, out_shape = w_shape[:in_ndim], w_shape[in_ndim:]
  # A like PEFT's Kaiming-uniform default: U(-1/sqrt(fan_in), 1/sqrt(fan_in)); B zero.
  a_init = nn.initializers.variance_scaling(1 / 3, 'fan_in', 'uniform',
                                            in_axis=tuple(range(in_ndim)), out_axis=-1)
  a = module.variable(COLLECTION, name + '_a', lambda: nn.LogicallyPartitioned(
      a_init(module.make_rng('params'), in_shape + (r,), jnp.float32), in_axes + (None,)))
  b = module.variable(COLLECTION, name + '_b', lambda: nn.LogicallyPartitioned(
      jnp.zeros((r,) + out_shape, jnp.float32), (None,) + out_axes))
  a, b = nn.meta.unbox(a.value), nn.meta.unbox(b.value)
  if c.lora_dropout:
    x = nn.Dropout(c.lora_dropout, deterministic=deterministic, name=name + '_lora_dropout')(x)
  dt = x.dtype
  xa = jnp.tensordot(x, a.astype(dt), axes=in_ndim)                 # [..., r]
  return (c.lora_alpha / r) * jnp.tensordot(xa, b.astype(dt), axes=1)


def token_rows(module: nn.Module, table, name: str, transposed: bool = False):
  """`table` ([V, D], or [D, V] when transposed) with a trainable delta added at mc.lora_tokens."""
  c: ModelConfig = module.cfg
  if not c.lora_rank or not c.lora_tokens:
    return table
  delta = module.variable(COLLECTION, name + '_rows', lambda: nn.LogicallyPartitioned(
      jnp.zeros((len(c.lora_tokens), c.d_model), jnp.float32), (None, 'embed')))
  return _add_rows(table, nn.meta.unbox(delta.value), c.lora_tokens, transposed)


def _add_rows(table, delta, ids, transposed):
  ids = np.asarray(ids, np.int32)
  if transposed:
    return table.at[:, ids].add(delta.T.astype(table.dtype))
  return table.at[ids].add(delta.astype(table.dtype))


def trainable_count(mc: ModelConfig) -> int:
  """Trainable numbers in closed form: n_layers * sum over targets of r (fan_in + fan_out), plus
  d_model per trained token row (twice with an untied head)."""
  if not mc.lora_rank:
    return 0
  rows = len(mc.lora_tokens) * mc.d_model * (1 if mc.tie_embeddings else 2)
  return mc.n_layers * sum(mc.lora_rank * sum(mc.lora_fans(t)) for t in mc.lora_targets) + rows


def _merge_one(w, a, b, scale: float):
  """W + scale * A B with A [*in, r], B [r, *out] and W [*in, *out]."""
  return w + scale * jnp.tensordot(a, b, axes=1)


def merge(mc: ModelConfig, params, adapters):
  """A plain params tree whose forward pass equals the adapted model's (for the base config)."""
  scale = mc.lora_alpha / mc.lora_rank
  merge_fn = _merge_one
  if mc.scan_layers:                       # leaves carry a leading layer axis
    merge_fn = jax.vmap(_merge_one, in_axes=(0, 0, 0, None))

  def visit(p, l):
    out = {}
    for k, v in p.items():
      if isinstance(v, dict):
        out[k] = visit(v, l.get(k, {}))
      elif k + '_a' in l:
        out[k] = merge_fn(v, l[k + '_a'], l[k + '_b'], scale)
      elif k + '_rows' in l:
        out[k] = _add_rows(v, l[k + '_rows'], mc.lora_tokens, transposed=k == 'head')
      else:
        out[k] = v
    return out
  return visit(params, adapters)


def base_config(mc: ModelConfig) -> ModelConfig:
  """The same model without adapters (what merged params are applied with)."""
  return dataclasses.replace(mc, lora_rank=0, lora_targets=(), lora_dropout=0.0, lora_tokens=())


def tree_bytes(tree) -> int:
  """Bytes of all array leaves of a pytree (abstract shapes work too)."""
  return int(sum(np.prod(x.shape) * np.dtype(x.dtype).itemsize for x in jax.tree.leaves(tree)))


def tree_size(tree) -> int:
  return int(sum(math.prod(x.shape) for x in jax.tree.leaves(tree)))
