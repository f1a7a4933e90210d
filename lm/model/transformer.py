"""The decoder-only transformer in Flax Linen.

Shape letters used in names:
  B batch, T query length, S key length (cache slots or T), D d_model, N query heads,
  K key/value heads, H head dim, F d_ff, V vocabulary, L layers, M = B*T rows.

Every parameter carries logical axis names (vocab, embed, heads, kv_heads, head_dim, mlp,
norm, pos, layers); lm/model/sharding.py maps them to mesh axes, the model never names a mesh axis.
Params are a plain pytree after `nn.meta.unbox`; `logical_specs(cfg)` gives their axis names.

The forward pass optionally takes a key/value cache (see `init_cache`): the same attention code
serves training (no cache) and sampling (prefill, then one token at a time).
"""
import functools
import math
from typing import Any, NamedTuple

import flax.linen as nn
import jax
import jax.numpy as jnp

from lm.model import lora
from lm.model import parametrization as mup
from lm.model.sharding import constrain
from lm.config import ModelConfig
from lm.model.attention import Attention, sinusoidal_table


class KVCache(NamedTuple):
  """Per-layer keys/values, stacked over layers, written at `index` by each forward call.

  k, v: [L, B, S, K, H] (RoPE already applied to k); pos: [B, S] absolute positions of the
  slots; valid: [B, S] which slots hold a real token; index: [] next slot to write.
  """
  k: jax.Array
  v: jax.Array
  pos: jax.Array
  valid: jax.Array
  index: jax.Array


def init_cache(cfg: ModelConfig, batch: int, slots: int, dtype=None) -> KVCache:
  """An empty cache with room for `slots` tokens per sequence."""
  dtype = dtype or jnp.dtype(cfg.dtype)
  shape = (cfg.n_layers, batch, slots, cfg.n_kv_heads, cfg.head_dim)
  return KVCache(k=jnp.zeros(shape, dtype), v=jnp.zeros(shape, dtype),
                 pos=jnp.zeros((batch, slots), jnp.int32),
                 valid=jnp.zeros((batch, slots), bool), index=jnp.zeros((), jnp.int32))


def _param(module, name, init, shape, axes):
  return module.param(name, nn.with_logical_partitioning(init, axes), shape,
                      jnp.dtype(module.cfg.param_dtype))


class Norm(nn.Module):
  """LayerNorm or RMSNorm over the last axis; statistics in float32."""
  cfg: ModelConfig

  @nn.compact
  def __call__(self, x):
    c = self.cfg
    dtype = x.dtype
    x = x.astype(jnp.float32)
    if c.norm == 'layernorm':
      x = x - x.mean(-1, keepdims=True)
    x = x * jax.lax.rsqrt((x * x).mean(-1, keepdims=True) + c.norm_eps)
    x = x * _param(self, 'scale', nn.initializers.ones, (c.d_model,), ('norm',))
    if c.norm == 'layernorm' and c.use_bias:
      x = x + _param(self, 'bias', nn.initializers.zeros, (c.d_model,), ('norm',))
    return x.astype(dtype)


class Mlp(nn.Module):
  """GELU MLP (D -> F -> D) or SwiGLU (gate and up D -> F, down F -> D)."""
  cfg: ModelConfig
  deterministic: bool = True

  @nn.compact
  def __call__(self, x_BTD):
    c = self.cfg
    dt = jnp.dtype(c.dtype)
    std = mup.hidden_init_std(c)
    init = nn.initializers.normal(std)
    out_init = nn.initializers.normal(std / math.sqrt(2 * c.n_layers))
    # The matmuls run on [B*T, D]: with 3-D einsums XLA:CPU fuses the GELU backward into a
    # transposed copy and the MLP becomes about twice as slow (benchmarks/train_step.py).
    B, T, D = x_BTD.shape
    x_MD = x_BTD.reshape(B * T, D)
    wi = _param(self, 'wi', init, (c.d_model, c.d_ff), ('embed', 'mlp'))
    h_MF = constrain(x_MD @ wi.astype(dt), 'batch', 'mlp')
    h_MF += self._lora('up', x_MD, (D, c.d_ff))
    if c.use_bias:
      h_MF += _param(self, 'bi', nn.initializers.zeros, (c.d_ff,), ('mlp',)).astype(dt)
    if c.mlp == 'swiglu':
      wg = _param(self, 'wg', init, (c.d_model, c.d_ff), ('embed', 'mlp'))
      g_MF = constrain(x_MD @ wg.astype(dt), 'batch', 'mlp')
      h_MF = nn.silu(g_MF + self._lora('gate', x_MD, (D, c.d_ff))) * h_MF
    else:
      h_MF = nn.gelu(h_MF)
    wo = _param(self, 'wo', out_init, (c.d_ff, c.d_model), ('mlp', 'embed'))
    y_BTD = (h_MF @ wo.astype(dt) + self._lora('down', h_MF, (c.d_ff, D))).reshape(B, T, D)
    if c.use_bias:
      y_BTD += _param(self, 'bo', nn.initializers.zeros, (c.d_model,), ('embed',)).astype(dt)
    return y_BTD

  def _lora(self, target, x, shape):
    axes = {'up': (('embed',), ('mlp',)), 'gate': (('embed',), ('mlp',)),
            'down': (('mlp',), ('embed',))}[target]
    return lora.adapter(self, target, x, shape, 1, *axes, self.deterministic)


class Block(nn.Module):
  """One transformer layer; pre-norm (x + f(norm(x))) or post-norm (norm(x + f(x)))."""
  cfg: ModelConfig
  deterministic: bool = True

  @nn.compact
  def __call__(self, x_BTD, positions_BT, layer_cache, cache_meta, segment_ids_BT=None):
    c = self.cfg
    drop = nn.Dropout(c.dropout, deterministic=self.deterministic)
    attn = Attention(c, self.deterministic, name='attn')
    mlp = Mlp(c, self.deterministic, name='mlp')
    if c.block == 'prenorm':
      a, layer_cache = attn(Norm(c, name='norm1')(x_BTD), positions_BT, layer_cache, cache_meta,
                            segment_ids_BT)
      x_BTD = x_BTD + drop(a)
      x_BTD = x_BTD + drop(mlp(Norm(c, name='norm2')(x_BTD)))
    else:
      a, layer_cache = attn(x_BTD, positions_BT, layer_cache, cache_meta, segment_ids_BT)
      x_BTD = Norm(c, name='norm1')(x_BTD + drop(a))
      x_BTD = Norm(c, name='norm2')(x_BTD + drop(mlp(x_BTD)))
    return constrain(x_BTD, 'batch', None, 'embed'), layer_cache


class _ScanBlock(Block):
  """Block with the (carry, scanned inputs) signature that nn.scan expects."""

  def __call__(self, x_BTD, layer_cache, positions_BT, cache_meta, segment_ids_BT=None):
    return super().__call__(x_BTD, positions_BT, layer_cache, cache_meta, segment_ids_BT)


class Transformer(nn.Module):
  """tokens [B, T] -> logits [B, T, V] in float32 (and the updated cache when one is given).

  segment_ids_BT (training without a cache): packed examples, each attending only to itself;
  pass positions_BT restarting at 0 for each example too. return_hidden: the final (normed) hidden
  states [B, T, D] in float32 instead of logits, for heads of other shapes (a reward or value head).
  """
  cfg: ModelConfig

  @nn.compact
  def __call__(self, tokens_BT, positions_BT=None, cache: KVCache | None = None,
               deterministic: bool = True, segment_ids_BT=None, return_hidden: bool = False):
    c = self.cfg
    dt = jnp.dtype(c.dtype)
    B, T = tokens_BT.shape
    if positions_BT is None:
      start = 0 if cache is None else cache.index
      positions_BT = jnp.broadcast_to(start + jnp.arange(T, dtype=jnp.int32), (B, T))

    embed_VD = _param(self, 'embed', nn.initializers.normal(c.init_std),
                      (c.vocab_size, c.d_model), ('vocab', 'embed'))
    embed_VD = lora.token_rows(self, embed_VD, 'embed')
    # The table whole along d_model before the lookup (FSDP gathers weights where they are
    # used): a gather from a table split over fsdp into rows split over fsdp has no cheap plan.
    embed_VD = constrain(embed_VD, 'vocab', 'embed')
    x_BTD = jnp.take(embed_VD, tokens_BT, axis=0).astype(dt)
    if c.pos == 'learned':
      pos_PD = _param(self, 'pos_embed', nn.initializers.normal(c.init_std),
                      (c.max_len, c.d_model), ('pos', 'embed'))
      x_BTD += jnp.take(constrain(pos_PD, None, 'embed'), positions_BT, axis=0).astype(dt)
    elif c.pos == 'sinusoidal':
      x_BTD += sinusoidal_table(positions_BT, c.d_model).astype(dt)
    x_BTD = constrain(nn.Dropout(c.dropout, deterministic=deterministic)(x_BTD),
                      'batch', None, 'embed')

    # What attention needs to read and write the cache, shared by all layers.
    cache_meta = None
    if cache is not None:
      slot_T = cache.index + jnp.arange(T)
      pos = cache.pos.at[:, slot_T].set(positions_BT)
      valid = cache.valid.at[:, slot_T].set(True)
      cache_meta = (cache.index, pos, valid)

    block_cls = _ScanBlock if c.scan_layers else Block
    if c.remat:
      block_cls = nn.remat(block_cls, prevent_cse=not c.scan_layers)
    if c.scan_layers:
      stack = nn.scan(block_cls, variable_axes={'params': 0, lora.COLLECTION: 0},
                      split_rngs={'params': True, 'dropout': True},
                      in_axes=(0, nn.broadcast, nn.broadcast, nn.broadcast),
                      length=c.n_layers, metadata_params={nn.PARTITION_NAME: 'layers'})
      scanned = None if cache is None else (cache.k, cache.v, None)
      x_BTD, new_kv = stack(c, deterministic, name='layers')(
          x_BTD, scanned, positions_BT, cache_meta, segment_ids_BT)
    else:
      # The whole [L, ...] cache goes through every layer; each writes its own slice in place.
      new_kv = None if cache is None else (cache.k, cache.v, None)
      for i in range(c.n_layers):
        lc = None if cache is None else (new_kv[0], new_kv[1], i)
        x_BTD, new_kv = block_cls(c, deterministic, name=f'layer_{i}')(
            x_BTD, positions_BT, lc, cache_meta, segment_ids_BT)

    if c.block == 'prenorm':
      x_BTD = Norm(c, name='final_norm')(x_BTD)
    if return_hidden and cache is None:
      return x_BTD.astype(jnp.float32)
    if c.tie_embeddings:
      logits_BTV = jnp.einsum('btd,vd->btv', x_BTD, embed_VD.astype(dt))
    else:
      head_DV = _param(self, 'head', nn.initializers.normal(c.init_std),
                       (c.d_model, c.vocab_size), ('embed', 'vocab'))
      head_DV = lora.token_rows(self, head_DV, 'head', transposed=True)
      logits_BTV = jnp.einsum('btd,dv->btv', x_BTD, head_DV.astype(dt))
    logits_BTV = logits_BTV.astype(jnp.float32)
    if mup.is_mup(c):
      logits_BTV = logits_BTV * mup.logit_multiplier(c)
    logits_BTV = constrain(logits_BTV, 'batch', None, 'vocab')
    if cache is None:
      return logits_BTV
    new_cache = KVCache(k=new_kv[0], v=new_kv[1], pos=cache_meta[1], valid=cache_meta[2],
                        index=cache.index + T)
    return logits_BTV, new_cache


def init_variables(cfg: ModelConfig, rng: jax.Array, seq_len: int = 8):
  """{'params': ..., 'lora': ...} (lora only with cfg.lora_rank), float32, boxes removed."""
  tokens = jnp.zeros((1, min(seq_len, cfg.max_len)), jnp.int32)
  return nn.meta.unbox(Transformer(cfg).init(rng, tokens))


def init_params(cfg: ModelConfig, rng: jax.Array, seq_len: int = 8):
  """Plain float32 params pytree (metadata boxes removed)."""
  return init_variables(cfg, rng, seq_len)['params']


def logical_specs(cfg: ModelConfig, collection: str = 'params'):
  """A collection's logical axis names, as PartitionSpecs of logical names."""
  tokens = jax.ShapeDtypeStruct((1, 1), jnp.int32)
  boxed = jax.eval_shape(lambda: Transformer(cfg).init(jax.random.PRNGKey(0), tokens))
  return nn.get_partition_spec(boxed)[collection]


def param_shapes(cfg: ModelConfig):
  """ShapeDtypeStructs of the params, without allocating them."""
  return jax.eval_shape(functools.partial(init_params, cfg), jax.random.PRNGKey(0))


def is_embedding_path(path: tuple[str, ...]) -> bool:
  """Vocabulary-sized and positional tables: excluded from the non-embedding count."""
  return path[-1] in ('embed', 'pos_embed', 'head')


def apply(cfg: ModelConfig, params, tokens_BT, adapters=None, **kw) -> Any:
  """Functional forward pass: `Transformer(cfg).apply({'params': params}, tokens, ...)`; a LoRA
  model also takes its adapters (the 'lora' collection, lm/model/lora.py)."""
  rngs = kw.pop('rngs', None)
  variables = {'params': params}
  if adapters is not None:
    variables[lora.COLLECTION] = adapters
  return Transformer(cfg).apply(variables, tokens_BT, rngs=rngs, **kw)


def token_logprobs(cfg: ModelConfig, params, tokens_BT, temperature: float = 1.0):
  """log p(token t | tokens < t) for t = 1..T-1 at a sampling temperature: [B, T-1]. The one
  scoring forward every evaluation and preference objective uses."""
  logits = apply(cfg, params, tokens_BT[:, :-1]) / temperature
  return jnp.take_along_axis(jax.nn.log_softmax(logits, axis=-1), tokens_BT[:, 1:, None],
                             axis=-1)[..., 0]
