"""Hugging Face model folders in and out: GPT-2 (`GPT2LMHeadModel`) and Llama (`LlamaForCausalLM`).

  export_run(workdir, out)  a trained run -> config.json, model.safetensors (sharded with an index
                            above `max_shard_bytes`), tokenizer.json and tokenizer_config.json.
  import_model(hf_dir, workdir)  such a folder -> a plain run folder (config.json, tokenizer/,
                            one checkpoint) that sample, finetune, reward, ppo, dpo and train
                            (`train.init_from`, continued pretraining) read like any run.

Which family a run exports as follows from its model options:
  gpt2:  pos=learned, norm=layernorm, mlp=gelu (tanh approximation), block=prenorm, use_bias,
         tied head, n_kv_heads = n_heads.
  llama: pos=rope, norm=rmsnorm, mlp=swiglu, block=prenorm, no biases; any n_kv_heads, tied or not.
Anything else is refused with the options that do not fit.

Layouts. This codebase stores projections as [in, ...out] (q: [D, N, H], o: [N, H, D]); PyTorch's
Linear stores [out, in] and GPT-2's Conv1D [in, out] with q, k and v fused into one c_attn. RoPE
here rotates the pairs (2i, 2i+1) of a head; Llama's code rotates the halves (i, i + H/2), so the
q and k output features are permuted within each head on the way out (evens first, then odds) and
back on the way in. Weights are only ever read from safetensors: a pickle checkpoint
(pytorch_model.bin) is refused, since loading one runs code stored in it.
"""
import contextlib
import dataclasses
import json
import os
import shutil
import tempfile

import jax
import jax.numpy as jnp
import numpy as np

from lm import host
from lm import lock as lock_lib
from lm import metrics as metrics_lib
from lm import runs
from lm.data import tokenizer as tokenizer_lib
from lm.config import ModelConfig
from lm.model import parametrization
from lm.errors import UserError

FAMILIES = ('gpt2', 'llama')
PICKLE_SUFFIXES = ('.bin', '.pt', '.pth', '.ckpt', '.pkl', '.pickle')
SAFE_INDEX = 'model.safetensors.index.json'
DEFAULT_SHARD_BYTES = 2 << 30
FETCH_AGAIN = 'the folder is damaged, fetch or copy the model again'


# ---------------------------------------------------------------------------------------------
# Which family a model belongs to.

def _wants(family: str) -> dict:
  if family == 'gpt2':
    return {'pos': 'learned', 'norm': 'layernorm', 'mlp': 'gelu', 'block': 'prenorm',
            'use_bias': True, 'tie_embeddings': True}
  return {'pos': 'rope', 'norm': 'rmsnorm', 'mlp': 'swiglu', 'block': 'prenorm',
          'use_bias': False}


def _misfits(mc: ModelConfig, family: str) -> list[str]:
  bad = [f'{k}={getattr(mc, k)!r} (needs {v!r})' for k, v in _wants(family).items()
         if getattr(mc, k) != v]
  if family == 'gpt2' and mc.n_kv_heads != mc.n_heads:
    bad.append(f'n_kv_heads={mc.n_kv_heads} (needs n_heads={mc.n_heads})')
  if mc.qk_norm:   # neither layout has a place for the query and key norms
    bad.append('qk_norm=True (needs False)')
  return bad


def family_of(mc: ModelConfig) -> str:
  """'gpt2' or 'llama'; a model that fits neither raises UserError naming what does not fit."""
  misfits = {f: _misfits(mc, f) for f in FAMILIES}
  for f in FAMILIES:
    if not misfits[f]:
      return f
  raise UserError('this model fits neither Hugging Face family: for GPT-2 it has '
                  f"{', '.join(misfits['gpt2'])}; for Llama it has {', '.join(misfits['llama'])}; "
                  'train with one family\'s options to export.')


# ---------------------------------------------------------------------------------------------
# Parameter trees <-> Hugging Face tensors.

def _rope_perm(h: int) -> np.ndarray:
  """Index map from Llama's half-split head layout to this codebase's interleaved pairs:
  hf[..., j] = ours[..., perm[j]] (evens, then odds)."""
  return np.concatenate([np.arange(0, h, 2), np.arange(1, h, 2)])


def _layers(params, n_layers: int) -> list:
  """Per-layer param dicts, from the unrolled (layer_i) or the scanned (layers, [L, ...]) tree."""
  if 'layers' in params:
    return [jax.tree.map(lambda x, i=i: x[i], params['layers']) for i in range(n_layers)]
  return [params[f'layer_{i}'] for i in range(n_layers)]


def standard_form(mc: ModelConfig, params) -> tuple[ModelConfig, dict]:
  """The SP model computing the same logits (parametrization.to_standard): Hugging Face's
  layouts have no μP multipliers. GPT-2's ties its head to the embedding, so a tied μP model
  away from its base width (whose head needs its own 1/m) exports only as Llama."""
  if not parametrization.is_mup(mc):
    return mc, params
  if (family_of(mc) == 'gpt2' and mc.tie_embeddings
      and parametrization.width_mult(mc) != 1.0):
    raise UserError(f'this μP model (d_model {mc.d_model}, model.mup_base_width '
                    f'{mc.mup_base_width}) scales its logits by 1/{parametrization.width_mult(mc):g}, '
                    "which GPT-2's tied head cannot hold; export it at its base width or train "
                    'a Llama-family μP model, whose head can be untied.')
  return parametrization.to_standard(mc, params)


def to_hf(mc: ModelConfig, params) -> tuple[str, dict]:
  """(family, {name: float32 array}) in the layout `transformers` reads (a μP model in its
  standard form)."""
  mc, params = standard_form(mc, params)
  family = family_of(mc)
  p = jax.tree.map(lambda x: np.asarray(x, np.float32), jax.device_get(params))
  D, N, K, H = mc.d_model, mc.n_heads, mc.n_kv_heads, mc.head_dim
  out = {}
  if family == 'gpt2':
    out['transformer.wte.weight'] = p['embed']
    out['transformer.wpe.weight'] = p['pos_embed']
    for i, lp in enumerate(_layers(p, mc.n_layers)):
      pre, a, m = f'transformer.h.{i}.', lp['attn'], lp['mlp']
      out[pre + 'ln_1.weight'] = lp['norm1']['scale']
      out[pre + 'ln_1.bias'] = lp['norm1']['bias']
      out[pre + 'attn.c_attn.weight'] = np.concatenate(
          [a[w].reshape(D, N * H) for w in ('wq', 'wk', 'wv')], axis=1)
      out[pre + 'attn.c_attn.bias'] = np.concatenate(
          [a[w + '_bias'].reshape(N * H) for w in ('wq', 'wk', 'wv')])
      out[pre + 'attn.c_proj.weight'] = a['wo'].reshape(N * H, D)
      out[pre + 'attn.c_proj.bias'] = a['bo']
      out[pre + 'ln_2.weight'] = lp['norm2']['scale']
      out[pre + 'ln_2.bias'] = lp['norm2']['bias']
      out[pre + 'mlp.c_fc.weight'] = m['wi']
      out[pre + 'mlp.c_fc.bias'] = m['bi']
      out[pre + 'mlp.c_proj.weight'] = m['wo']
      out[pre + 'mlp.c_proj.bias'] = m['bo']
    out['transformer.ln_f.weight'] = p['final_norm']['scale']
    out['transformer.ln_f.bias'] = p['final_norm']['bias']
  else:
    perm = _rope_perm(H)
    out['model.embed_tokens.weight'] = p['embed']
    for i, lp in enumerate(_layers(p, mc.n_layers)):
      pre, a, m = f'model.layers.{i}.', lp['attn'], lp['mlp']
      out[pre + 'input_layernorm.weight'] = lp['norm1']['scale']
      out[pre + 'self_attn.q_proj.weight'] = a['wq'][:, :, perm].reshape(D, N * H).T
      out[pre + 'self_attn.k_proj.weight'] = a['wk'][:, :, perm].reshape(D, K * H).T
      out[pre + 'self_attn.v_proj.weight'] = a['wv'].reshape(D, K * H).T
      out[pre + 'self_attn.o_proj.weight'] = a['wo'].reshape(N * H, D).T
      out[pre + 'post_attention_layernorm.weight'] = lp['norm2']['scale']
      out[pre + 'mlp.gate_proj.weight'] = m['wg'].T
      out[pre + 'mlp.up_proj.weight'] = m['wi'].T
      out[pre + 'mlp.down_proj.weight'] = m['wo'].T
    out['model.norm.weight'] = p['final_norm']['scale']
    if not mc.tie_embeddings:
      out['lm_head.weight'] = p['head'].T
  return family, {k: np.ascontiguousarray(v) for k, v in out.items()}


def _expected_shapes(mc: ModelConfig, family: str) -> dict:
  """{hf name: shape} of every tensor a model of this config must have."""
  D, N, K, H, F, V = (mc.d_model, mc.n_heads, mc.n_kv_heads, mc.head_dim, mc.d_ff,
                      mc.vocab_size)
  shapes = {}
  if family == 'gpt2':
    shapes.update({'transformer.wte.weight': (V, D), 'transformer.wpe.weight': (mc.max_len, D),
                   'transformer.ln_f.weight': (D,), 'transformer.ln_f.bias': (D,)})
    for i in range(mc.n_layers):
      pre = f'transformer.h.{i}.'
      shapes.update({pre + 'ln_1.weight': (D,), pre + 'ln_1.bias': (D,),
                     pre + 'attn.c_attn.weight': (D, 3 * D), pre + 'attn.c_attn.bias': (3 * D,),
                     pre + 'attn.c_proj.weight': (D, D), pre + 'attn.c_proj.bias': (D,),
                     pre + 'ln_2.weight': (D,), pre + 'ln_2.bias': (D,),
                     pre + 'mlp.c_fc.weight': (D, F), pre + 'mlp.c_fc.bias': (F,),
                     pre + 'mlp.c_proj.weight': (F, D), pre + 'mlp.c_proj.bias': (D,)})
  else:
    shapes.update({'model.embed_tokens.weight': (V, D), 'model.norm.weight': (D,)})
    for i in range(mc.n_layers):
      pre = f'model.layers.{i}.'
      shapes.update({pre + 'input_layernorm.weight': (D,),
                     pre + 'post_attention_layernorm.weight': (D,),
                     pre + 'self_attn.q_proj.weight': (N * H, D),
                     pre + 'self_attn.k_proj.weight': (K * H, D),
                     pre + 'self_attn.v_proj.weight': (K * H, D),
                     pre + 'self_attn.o_proj.weight': (D, N * H),
                     pre + 'mlp.gate_proj.weight': (F, D), pre + 'mlp.up_proj.weight': (F, D),
                     pre + 'mlp.down_proj.weight': (D, F)})
    if not mc.tie_embeddings:
      shapes['lm_head.weight'] = (V, D)
  return shapes


def from_hf(mc: ModelConfig, family: str, t: dict):
  """This codebase's (unrolled) params tree from {hf name: float32 array}."""
  D, N, K, H = mc.d_model, mc.n_heads, mc.n_kv_heads, mc.head_dim
  p = {}
  if family == 'gpt2':
    p['embed'] = t['transformer.wte.weight']
    p['pos_embed'] = t['transformer.wpe.weight']
    for i in range(mc.n_layers):
      pre = f'transformer.h.{i}.'
      w, b = t[pre + 'attn.c_attn.weight'], t[pre + 'attn.c_attn.bias']
      attn = {}
      for j, name in enumerate(('wq', 'wk', 'wv')):
        attn[name] = w[:, j * D:(j + 1) * D].reshape(D, N, H)
        attn[name + '_bias'] = b[j * D:(j + 1) * D].reshape(N, H)
      attn['wo'] = t[pre + 'attn.c_proj.weight'].reshape(N, H, D)
      attn['bo'] = t[pre + 'attn.c_proj.bias']
      p[f'layer_{i}'] = {
          'norm1': {'scale': t[pre + 'ln_1.weight'], 'bias': t[pre + 'ln_1.bias']},
          'attn': attn,
          'norm2': {'scale': t[pre + 'ln_2.weight'], 'bias': t[pre + 'ln_2.bias']},
          'mlp': {'wi': t[pre + 'mlp.c_fc.weight'], 'bi': t[pre + 'mlp.c_fc.bias'],
                  'wo': t[pre + 'mlp.c_proj.weight'], 'bo': t[pre + 'mlp.c_proj.bias']}}
    p['final_norm'] = {'scale': t['transformer.ln_f.weight'], 'bias': t['transformer.ln_f.bias']}
  else:
    inv = np.argsort(_rope_perm(H))
    p['embed'] = t['model.embed_tokens.weight']
    for i in range(mc.n_layers):
      pre = f'model.layers.{i}.self_attn.'
      q = t[pre + 'q_proj.weight'].T.reshape(D, N, H)[:, :, inv]
      k = t[pre + 'k_proj.weight'].T.reshape(D, K, H)[:, :, inv]
      attn = {'wq': q, 'wk': k, 'wv': t[pre + 'v_proj.weight'].T.reshape(D, K, H),
              'wo': t[pre + 'o_proj.weight'].T.reshape(N, H, D)}
      pre = f'model.layers.{i}.'
      p[f'layer_{i}'] = {
          'norm1': {'scale': t[pre + 'input_layernorm.weight']},
          'attn': attn,
          'norm2': {'scale': t[pre + 'post_attention_layernorm.weight']},
          'mlp': {'wg': t[pre + 'mlp.gate_proj.weight'].T, 'wi': t[pre + 'mlp.up_proj.weight'].T,
                  'wo': t[pre + 'mlp.down_proj.weight'].T}}
    p['final_norm'] = {'scale': t['model.norm.weight']}
    if not mc.tie_embeddings:
      p['head'] = t['lm_head.weight'].T
  return jax.tree.map(lambda x: np.ascontiguousarray(x, np.float32), p)


# ---------------------------------------------------------------------------------------------
# config.json <-> ModelConfig.

def hf_config(mc: ModelConfig, family: str, tokenizer) -> dict:
  """A `transformers` config.json for the model (and the tokenizer's special ids)."""
  special = {'bos_token_id': tokenizer.bos_id, 'eos_token_id': tokenizer.eos_id,
             'pad_token_id': tokenizer.pad_id}
  if family == 'gpt2':
    return {'architectures': ['GPT2LMHeadModel'], 'model_type': 'gpt2',
            'vocab_size': mc.vocab_size, 'n_positions': mc.max_len, 'n_embd': mc.d_model,
            'n_layer': mc.n_layers, 'n_head': mc.n_heads, 'n_inner': mc.d_ff,
            'activation_function': 'gelu_new', 'layer_norm_epsilon': mc.norm_eps,
            'resid_pdrop': 0.0, 'embd_pdrop': 0.0, 'attn_pdrop': 0.0,
            'scale_attn_weights': True, 'scale_attn_by_inverse_layer_idx': False,
            'reorder_and_upcast_attn': False, 'initializer_range': mc.init_std,
            'tie_word_embeddings': True, 'use_cache': True, 'dtype': 'float32', **special}
  return {'architectures': ['LlamaForCausalLM'], 'model_type': 'llama',
          'vocab_size': mc.vocab_size, 'hidden_size': mc.d_model,
          'intermediate_size': mc.d_ff, 'num_hidden_layers': mc.n_layers,
          'num_attention_heads': mc.n_heads, 'num_key_value_heads': mc.n_kv_heads,
          'head_dim': mc.head_dim, 'hidden_act': 'silu', 'max_position_embeddings': mc.max_len,
          'rms_norm_eps': mc.norm_eps, 'rope_theta': mc.rope_base, 'rope_scaling': None,
          'rope_parameters': {'rope_type': 'default', 'rope_theta': mc.rope_base},
          'attention_bias': False, 'mlp_bias': False, 'attention_dropout': 0.0,
          'pretraining_tp': 1, 'tie_word_embeddings': mc.tie_embeddings,
          'initializer_range': mc.init_std, 'use_cache': True, 'dtype': 'float32', **special}


def _family_of_config(c: dict, path: str) -> str:
  arch = (c.get('architectures') or [None])[0]
  kind = c.get('model_type')
  if kind == 'gpt2' or arch in ('GPT2LMHeadModel', 'GPT2Model'):
    return 'gpt2'
  if kind == 'llama' or arch in ('LlamaForCausalLM', 'LlamaModel'):
    return 'llama'
  raise UserError(f'{path} describes a {arch or kind or "model of no named architecture"}; '
                  'only GPT-2 (GPT2LMHeadModel) and Llama (LlamaForCausalLM) checkpoints can be '
                  'imported.')


def model_config_from_hf(c: dict, path: str) -> tuple[str, ModelConfig]:
  """(family, ModelConfig) of a `transformers` config.json; unsupported options are refused."""
  family = _family_of_config(c, path)

  def refuse(what: str):
    raise UserError(f'{path} sets {what}, which this codebase does not implement; only plain '
                    f'{"GPT-2" if family == "gpt2" else "Llama"} models can be imported.')

  if family == 'gpt2':
    act = c.get('activation_function', 'gelu_new')
    if act not in ('gelu_new', 'gelu_pytorch_tanh'):
      refuse(f'activation_function={act!r} (only the tanh GELU, gelu_new)')
    for key in ('scale_attn_by_inverse_layer_idx', 'reorder_and_upcast_attn'):
      if c.get(key):
        refuse(f'{key}=true')
    if c.get('scale_attn_weights') is False:
      refuse('scale_attn_weights=false')
    D = int(c.get('n_embd', 768))
    fields = dict(vocab_size=int(c.get('vocab_size', 50257)), n_layers=int(c.get('n_layer', 12)),
                  d_model=D, n_heads=int(c.get('n_head', 12)), n_kv_heads=int(c.get('n_head', 12)),
                  d_ff=int(c.get('n_inner') or 4 * D), max_len=int(c.get('n_positions', 1024)),
                  pos='learned', norm='layernorm', norm_eps=float(c.get('layer_norm_epsilon',
                                                                        1e-5)),
                  mlp='gelu', block='prenorm', use_bias=True, tie_embeddings=True,
                  init_std=float(c.get('initializer_range', 0.02)))
  else:
    if c.get('hidden_act', 'silu') != 'silu':
      refuse(f"hidden_act={c.get('hidden_act')!r} (only silu)")
    for key in ('attention_bias', 'mlp_bias'):
      if c.get(key):
        refuse(f'{key}=true')
    rope = c.get('rope_parameters') or {}
    scaling = c.get('rope_scaling') or {}
    kind = rope.get('rope_type') or scaling.get('rope_type') or scaling.get('type') or 'default'
    if kind != 'default':
      refuse(f'RoPE scaling of type {kind!r}')
    theta = rope.get('rope_theta', c.get('rope_theta', 10000.0))
    D, N = int(c['hidden_size']), int(c['num_attention_heads'])
    if c.get('head_dim') not in (None, D // N) or D % N:
      refuse(f"head_dim={c.get('head_dim')} other than hidden_size/num_attention_heads")
    fields = dict(vocab_size=int(c['vocab_size']), n_layers=int(c['num_hidden_layers']),
                  d_model=D, n_heads=N, n_kv_heads=int(c.get('num_key_value_heads') or N),
                  d_ff=int(c['intermediate_size']),
                  max_len=int(c.get('max_position_embeddings', 2048)),
                  rope_base=float(theta), norm_eps=float(c.get('rms_norm_eps', 1e-6)),
                  tie_embeddings=bool(c.get('tie_word_embeddings', False)),
                  init_std=float(c.get('initializer_range', 0.02)), **_wants(family))
  return family, ModelConfig(**fields)


# ---------------------------------------------------------------------------------------------
# safetensors files.

def write_safetensors(tensors: dict, out: str, max_shard_bytes: int) -> list[str]:
  """model.safetensors, or model-0000i-of-0000n.safetensors and the index above max_shard_bytes."""
  from safetensors.numpy import save_file
  names = list(tensors)
  shards, size = [[]], 0
  for n in names:
    b = tensors[n].nbytes
    if shards[-1] and size + b > max_shard_bytes:
      shards.append([])
      size = 0
    shards[-1].append(n)
    size += b
  meta = {'format': 'pt'}
  if len(shards) == 1:
    save_file(tensors, os.path.join(out, 'model.safetensors'), metadata=meta)
    return ['model.safetensors']
  files, weight_map = [], {}
  for i, group in enumerate(shards):
    f = f'model-{i + 1:05d}-of-{len(shards):05d}.safetensors'
    save_file({n: tensors[n] for n in group}, os.path.join(out, f), metadata=meta)
    files.append(f)
    weight_map.update({n: f for n in group})
  total = sum(t.nbytes for t in tensors.values())
  with open(os.path.join(out, SAFE_INDEX), 'w') as fh:
    json.dump({'metadata': {'total_size': total}, 'weight_map': weight_map}, fh, indent=2)
  return files + [SAFE_INDEX]


def _safetensor_files(hf_dir: str) -> list[str]:
  index = os.path.join(hf_dir, SAFE_INDEX)
  if os.path.isfile(index):
    weight_map = metrics_lib.read_json_object(index, FETCH_AGAIN).get('weight_map')
    if not isinstance(weight_map, dict) or not all(isinstance(v, str)
                                                   for v in weight_map.values()):
      raise UserError(f'{index} has no weight_map of tensor names to files; {FETCH_AGAIN}.')
    files = sorted(set(weight_map.values()))
    missing = [f for f in files if not os.path.isfile(os.path.join(hf_dir, f))]
    if missing:
      raise UserError(f'{index} names {missing[0]}, which is not in {hf_dir}; copy the whole '
                      'checkpoint folder.')
    return [os.path.join(hf_dir, f) for f in files]
  single = os.path.join(hf_dir, 'model.safetensors')
  if os.path.isfile(single):
    return [single]
  found = sorted(f for f in os.listdir(hf_dir) if f.endswith('.safetensors'))
  if found:
    return [os.path.join(hf_dir, f) for f in found]
  pickles = sorted(f for f in os.listdir(hf_dir) if f.endswith(PICKLE_SUFFIXES))
  if pickles:
    raise UserError(f'{hf_dir} holds its weights only as {pickles[0]}, a pickle file, and loading '
                    'a pickle runs code stored in it; convert it to safetensors with transformers '
                    '(save_pretrained(..., safe_serialization=True)) where you trust it.')
  raise UserError(f'{hf_dir} has no model.safetensors (nor a sharded index); point --hf at a '
                  'Hugging Face model folder.')


@contextlib.contextmanager
def _safetensors(path: str):
  """safe_open(path), with a file the library cannot read (truncated, random bytes, a tensor
  cut short) refused in one sentence naming it."""
  from safetensors import safe_open
  try:
    with safe_open(path, framework='flax') as f:
      yield f
  except UserError:
    raise
  except Exception as e:   # the library raises its own SafetensorError (and others) for bad files
    detail = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
    raise UserError(f'{path} is not a readable safetensors file ({detail}); the copy is '
                    'incomplete or damaged, fetch it again.') from None


# Tensors a checkpoint may hold that are buffers, not weights (the causal mask GPT-2 used to save,
# the RoPE frequencies older Llama code saved), and a head tied to the embedding.
def _ignored(name: str, expected: dict) -> bool:
  return (name.endswith(('.attn.bias', '.attn.masked_bias', '.rotary_emb.inv_freq'))
          or (name == 'lm_head.weight' and name not in expected))


def _unaccounted(hf_dir: str, extra: list[str], expected: dict) -> UserError:
  """The refusal of tensors that config.json does not describe (naming them)."""
  layer_of = lambda k: int(k.split('.')[2]) if k.split('.')[2:3] and k.split('.')[2].isdigit() \
      else None
  has = sorted({layer_of(k) for k in extra} - {None})
  n_cfg = len({layer_of(k) for k in expected} - {None})
  why = (f'; config.json describes {n_cfg} layer{"s" * (n_cfg != 1)} but the weights hold '
         f'{has[-1] + 1}' if has and has[-1] >= n_cfg else '')
  shown = ', '.join(extra[:4]) + (f' and {len(extra) - 4} more' if len(extra) > 4 else '')
  return UserError(f'{hf_dir} holds {len(extra)} tensor{"s" * (len(extra) != 1)} that its '
                   f'config.json does not account for ({shown}){why}; the config and the weights '
                   'disagree, so fix config.json or use the matching checkpoint.')


def read_safetensors(hf_dir: str, expected: dict, family: str) -> dict:
  """{name: float32 array} of the expected tensors; a missing, misshapen or unaccounted tensor
  (one the config does not describe, e.g. layers past its n_layers) is refused, and so is a file
  that is not safetensors."""
  where = {}
  for path in _safetensor_files(hf_dir):
    with _safetensors(path) as f:
      for k in f.keys():
        where[k] = path

  def canonical(k: str) -> str:   # GPT2Model / LlamaModel checkpoints lack the outer prefix
    outer = 'transformer.' if family == 'gpt2' else 'model.'
    return k if k.startswith(outer) or k == 'lm_head.weight' else outer + k

  names = {canonical(k): k for k in where}
  missing = [k for k in expected if k not in names]
  if missing:
    raise UserError(f'{hf_dir} has no tensor {missing[0]} (of {len(missing)} missing), which its '
                    'config.json needs; the checkpoint is incomplete or of another shape.')
  extra = sorted(names[k] for k in names if k not in expected and not _ignored(k, expected))
  if extra:
    raise _unaccounted(hf_dir, extra, expected)
  out = {}
  by_file: dict = {}
  for k in expected:
    by_file.setdefault(where[names[k]], []).append(k)
  for path, keys in by_file.items():
    with _safetensors(path) as f:
      for k in keys:
        shape = tuple(f.get_slice(names[k]).get_shape())
        if shape != tuple(expected[k]):
          raise UserError(f'tensor {names[k]} in {os.path.basename(path)} has shape '
                          f'{list(shape)}, but config.json implies {list(expected[k])}; the '
                          'weights and the config disagree.')
        out[k] = np.asarray(jnp.asarray(f.get_tensor(names[k]), jnp.float32))
  return out


# ---------------------------------------------------------------------------------------------
# Output folders.

def check_apart(source: str, out: str, source_flag: str, out_flag: str) -> None:
  """Refuses an output folder that is the source folder, lies inside it or holds it: replacing
  it (--overwrite) would delete what is being read, and writing into it mixes the two."""
  s, o = os.path.realpath(source), os.path.realpath(out)
  inside = lambda a, b: os.path.commonpath([a, b]) == b     # a is b or lies under it
  if not (inside(o, s) or inside(s, o)):
    return
  how = 'is' if s == o else 'lies inside' if inside(o, s) else 'holds'
  raise UserError(f'{out_flag}={out} {how} {source_flag}={source}, the folder it is made from, '
                  'so writing there would mix the two and --overwrite could delete the source; '
                  'choose an output folder outside it.')


def _check_out(out: str, overwrite: bool, flag: str) -> None:
  if os.path.exists(out) and not os.path.isdir(out):
    raise UserError(f'{flag}={out} is a file; choose a folder.')
  if os.path.isdir(out) and os.listdir(out) and not overwrite:
    raise UserError(f'{flag}={out} exists and is not empty; choose a new folder or pass '
                    '--overwrite to replace it.')
  if os.path.exists(os.path.join(out, lock_lib.NAME)):
    with lock_lib.hold(out):   # a folder another process is writing is never replaced
      pass


@contextlib.contextmanager
def _written_beside(out: str):
  """Yields a temporary folder beside `out`; when the block ends without an error the folder
  replaces `out` (whatever was there is removed only then), otherwise it is deleted."""
  parent = os.path.dirname(os.path.abspath(out))
  os.makedirs(parent, exist_ok=True)
  tmp = tempfile.mkdtemp(prefix='.tmp-' + os.path.basename(out.rstrip('/')) + '-', dir=parent)
  try:
    yield tmp
  except BaseException:
    shutil.rmtree(tmp, ignore_errors=True)
    raise
  old = None
  if os.path.isdir(out):
    old = out.rstrip('/') + f'.old-{os.getpid()}'
    os.rename(out, old)
  os.rename(tmp, out)
  if old:
    shutil.rmtree(old, ignore_errors=True)


# ---------------------------------------------------------------------------------------------
# Export and import.

def export_run(workdir: str, out: str, overwrite: bool = False,
               max_shard_bytes: int = DEFAULT_SHARD_BYTES) -> dict:
  """Writes the run in workdir (LoRA merged) as a Hugging Face model folder; returns a summary."""
  check_apart(workdir, out, '--workdir', '--out')
  _check_out(out, overwrite, '--out')
  mc, params, tokenizer, ident = runs.load_model(workdir)
  mc, params = standard_form(mc, params)
  family, tensors = to_hf(mc, params)
  with _written_beside(out) as tmp:
    files = write_safetensors(tensors, tmp, max_shard_bytes)
    metrics_lib.write_json_atomic(os.path.join(tmp, 'config.json'),
                                  hf_config(mc, family, tokenizer))
    metrics_lib.write_json_atomic(os.path.join(tmp, 'generation_config.json'),
                                  {'bos_token_id': tokenizer.bos_id,
                                   'eos_token_id': tokenizer.eos_id,
                                   'pad_token_id': tokenizer.pad_id})
    files += tokenizer_lib.export_hf(tokenizer, tmp)
    info = {'family': family, 'source': ident['workdir'], 'step': ident['step'],
            'params_sha256': ident['params_sha256'], 'files': sorted(files),
            'bytes': sum(t.nbytes for t in tensors.values())}
  return info


def _grow_vocab(params: dict, vocab: int) -> dict:
  """Embedding rows (and head columns) up to `vocab`, the new ones the mean of the old."""
  params = dict(params)
  e = params['embed']
  params['embed'] = np.concatenate([e, np.repeat(e.mean(0, keepdims=True), vocab - len(e), 0)])
  if 'head' in params:
    h = params['head']
    params['head'] = np.concatenate(
        [h, np.repeat(h.mean(1, keepdims=True), vocab - h.shape[1], 1)], 1)
  return params


def import_model(hf_dir: str, workdir: str, overwrite: bool = False,
                 add_chat_tokens: bool = False) -> dict:
  """Writes a plain run folder from a Hugging Face GPT-2 or Llama folder; returns a summary.

  add_chat_tokens: a tokenizer without the chat tokens (lm/data/tokenizer.py) gets them as new special
  tokens, and the embedding grows to hold them (new rows start at the mean row), so that the
  imported model can be fine-tuned with the chat template.
  """
  from configs import base as base_config
  cfg_path = os.path.join(hf_dir, 'config.json')
  if not os.path.isdir(hf_dir):
    raise UserError(f'--hf={hf_dir} is not a folder; point it at a Hugging Face model folder.')
  if not os.path.isfile(cfg_path):
    raise UserError(f'{hf_dir} has no config.json, so it is not a Hugging Face model folder.')
  check_apart(hf_dir, workdir, '--hf', '--workdir')
  hf_cfg = metrics_lib.read_json_object(cfg_path, FETCH_AGAIN)
  try:
    family, mc = model_config_from_hf(hf_cfg, cfg_path)
  except (KeyError, TypeError, ValueError) as e:   # a required field missing, or not a number
    raise UserError(f'{cfg_path} lacks or misstates a field this import needs ({type(e).__name__}: '
                    f'{e}); {FETCH_AGAIN}.') from None
  _check_out(workdir, overwrite, '--workdir')
  tokenizer = tokenizer_lib.import_hf(hf_dir, hf_cfg)
  if tokenizer.vocab_size > mc.vocab_size:
    raise UserError(f'the tokenizer in {hf_dir} has {tokenizer.vocab_size} tokens but the model '
                    f'only {mc.vocab_size} embedding rows; the folder mixes two models.')
  tensors = read_safetensors(hf_dir, _expected_shapes(mc, family), family)
  params = from_hf(mc, family, tensors)
  added = 0
  if add_chat_tokens and tokenizer.chat_ids is None:
    tokenizer = tokenizer.with_chat_tokens()
    if tokenizer.vocab_size > mc.vocab_size:
      added = tokenizer.vocab_size - mc.vocab_size
      params = _grow_vocab(params, tokenizer.vocab_size)
      mc = dataclasses.replace(mc, vocab_size=tokenizer.vocab_size)
  params = jax.tree.map(jnp.asarray, params)

  cfg = base_config.get_config().to_dict()
  cfg['model'] = {k: v for k, v in dataclasses.asdict(mc).items()
                  if k in cfg['model'] and not k.startswith('lora')}
  cfg['data'].update(tokenizer='file', tokenizer_path=os.path.abspath(
      os.path.join(workdir, 'tokenizer')))
  info = {'imported_from': os.path.abspath(hf_dir), 'family': family,
          'architecture': (hf_cfg.get('architectures') or [family])[0],
          'params_sha256': runs.params_hash(params),
          'tokenizer': tokenizer.settings(), 'chat_ids': tokenizer.chat_ids,
          'embedding_rows_added': added, 'model': dataclasses.asdict(mc),
          'versions': host.versions(), 'git_commit': host.git_commit()}
  with _written_beside(workdir) as tmp:
    runs.write_plain_run(tmp, cfg, params, tokenizer, 0, info)
  return info
