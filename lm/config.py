"""Frozen dataclasses built once from the ml-collections config, with validation.

Modules take these, never the ConfigDict: `ModelConfig.from_config(cfg.model, vocab_size)`.
Every bad value raises `UserError` with one sentence naming the key and the fix.
"""
import dataclasses
from typing import Any

import numpy as np

from lm.errors import UserError

POS_KINDS = ('learned', 'sinusoidal', 'rope', 'alibi', 'none')
NORM_KINDS = ('layernorm', 'rmsnorm')
MLP_KINDS = ('gelu', 'swiglu')
BLOCK_KINDS = ('prenorm', 'postnorm')
DTYPES = ('float32', 'bfloat16')
ATTENTION_IMPLS = ('auto', 'xla', 'cudnn')
# LoRA target names -> (module, matrix) in the params tree.
LORA_TARGETS = {'q': ('attn', 'wq'), 'k': ('attn', 'wk'), 'v': ('attn', 'wv'), 'o': ('attn', 'wo'),
                'up': ('mlp', 'wi'), 'gate': ('mlp', 'wg'), 'down': ('mlp', 'wo')}


_KINDS = {'str': str, 'int': int, 'float': float, 'bool': bool}


def typed(key: str, v, kind: str):
  """v as a field of type `kind` (ints stay ints; floats accept ints), or a UserError naming
  the key. A 'tuple' field also reads a comma-separated string; other kinds pass unchanged."""
  if kind == 'tuple':
    if isinstance(v, str):
      return tuple(x.strip() for x in v.split(',') if x.strip())
    return tuple(v)
  if kind not in _KINDS:
    return v
  number = (int, float, np.integer, np.floating)
  ok = {'str': isinstance(v, str),
        'int': isinstance(v, (int, np.integer)) and not isinstance(v, bool),
        'float': isinstance(v, number) and not isinstance(v, bool),
        'bool': isinstance(v, (bool, np.bool_))}[kind]
  if not ok:
    raise UserError(f'{key}={v!r} must be a {kind}; fix --config.{key}')
  return _KINDS[kind](v)


def read_section(cls, section, name: str, prefix: str = '', defaults: dict | None = None,
                 skip: str = '') -> dict:
  """The fields of dataclass `cls` read from one config section, the one way every section is
  parsed: each field `prefix + key` from `section[key]`, cast to its declared type; a missing
  key takes the field's default (or `defaults[key]`, for keys added after runs existed), else
  is refused; a key no field reads is refused by name. Fields without the prefix, or starting
  with `skip`, belong to another section and are left out."""
  d = dict(section or {})
  fields = {f.name[len(prefix):]: f for f in dataclasses.fields(cls)
            if f.name.startswith(prefix) and not (skip and f.name.startswith(skip))}
  unknown = sorted(set(d) - set(fields))
  _check(not unknown, f"{name}.{unknown[0] if unknown else ''} is not a {name} option; see "
         'configs/ for the keys each section takes.')
  values = {}
  for key, f in fields.items():
    if key in d:
      kind = f.type if isinstance(f.type, str) else getattr(f.type, '__name__', '')
      values[f.name] = typed(f'{name}.{key}', d[key], kind.split('[')[0])
    elif defaults and key in defaults:
      values[f.name] = defaults[key]
    elif f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING:
      raise UserError(f'the config has no {name}.{key}; start from the config files in '
                      'configs/, which set every key.')
  return values


def _check(ok: bool, msg: str):
  if not ok:
    raise UserError(msg)


def _one_of(key: str, value: str, allowed) -> None:
  _check(value in allowed,
         f"{key}={value!r} is not known; use one of {', '.join(allowed)}.")


def default_d_ff(d_model: int, mlp: str) -> int:
  """4*d for GELU; for SwiGLU 8/3*d (same parameter count) rounded up to a multiple of 16."""
  if mlp == 'swiglu':
    return -(-(8 * d_model // 3) // 16) * 16
  return 4 * d_model


@dataclasses.dataclass(frozen=True)
class ModelConfig:
  """Shape and options of the decoder-only transformer (see configs/base.py for meanings)."""
  vocab_size: int
  n_layers: int = 2
  d_model: int = 128
  n_heads: int = 4
  n_kv_heads: int = 4
  d_ff: int = 512
  max_len: int = 256
  pos: str = 'rope'
  rope_base: float = 10000.0
  norm: str = 'rmsnorm'
  norm_eps: float = 1e-5
  mlp: str = 'gelu'
  block: str = 'prenorm'
  use_bias: bool = False
  tie_embeddings: bool = True
  dropout: float = 0.0
  dtype: str = 'float32'
  param_dtype: str = 'float32'
  remat: bool = False
  scan_layers: bool = False
  attention_impl: str = 'auto'
  init_std: float = 0.02
  qk_norm: bool = False   # RMSNorm on each head's queries and keys (Dehghani et al. 2023)
  parametrization: str = 'sp'   # sp | mup (lm/model/parametrization.py)
  mup_base_width: int = 0       # μP: the d_model its hyperparameters were tuned at
  mup_base_head_dim: int = 0    # μP: the head dim attention is normalised at (0: this model's)
  # LoRA adapters (lm/model/lora.py): rank 0 means none. Set by fine-tuning, not by pretraining configs.
  lora_rank: int = 0
  lora_alpha: float = 16.0
  lora_dropout: float = 0.0
  lora_targets: tuple = ()
  # Token ids whose embedding rows (and head columns when untied) train beside the adapters:
  # tokens the base never saw in pretraining, such as the chat markers.
  lora_tokens: tuple = ()

  @property
  def head_dim(self) -> int:
    return self.d_model // self.n_heads

  def lora_fans(self, target: str) -> tuple[int, int]:
    """(fan_in, fan_out) of a LoRA target matrix, whatever its stored shape."""
    D, F, H = self.d_model, self.d_ff, self.head_dim
    return {'q': (D, self.n_heads * H), 'k': (D, self.n_kv_heads * H),
            'v': (D, self.n_kv_heads * H), 'o': (self.n_heads * H, D), 'up': (D, F),
            'gate': (D, F), 'down': (F, D)}[target]

  def __post_init__(self):
    p = 'model.'
    _check(self.vocab_size >= 2, f'{p}vocab_size={self.vocab_size} must be at least 2; '
           'leave it 0 to take it from the tokenizer.')
    for key in ('n_layers', 'd_model', 'n_heads', 'n_kv_heads', 'd_ff', 'max_len'):
      v = getattr(self, key)
      _check(isinstance(v, int) and v >= 1, f'{p}{key}={v} must be a positive integer.')
    _check(self.d_model % self.n_heads == 0,
           f'{p}d_model={self.d_model} is not divisible by {p}n_heads={self.n_heads}; '
           'pick n_heads that divides d_model.')
    _check(self.n_heads % self.n_kv_heads == 0,
           f'{p}n_kv_heads={self.n_kv_heads} does not divide {p}n_heads={self.n_heads}; '
           'use a divisor (1 is multi-query, n_heads is multi-head).')
    _one_of(p + 'pos', self.pos, POS_KINDS)
    _one_of(p + 'norm', self.norm, NORM_KINDS)
    _one_of(p + 'mlp', self.mlp, MLP_KINDS)
    _one_of(p + 'block', self.block, BLOCK_KINDS)
    _one_of(p + 'dtype', self.dtype, DTYPES)
    _one_of(p + 'param_dtype', self.param_dtype, DTYPES)
    _one_of(p + 'attention_impl', self.attention_impl, ATTENTION_IMPLS)
    _check(self.pos != 'rope' or self.head_dim % 2 == 0,
           f'{p}pos=rope needs an even head dimension, but d_model/n_heads = {self.head_dim}; '
           'change d_model or n_heads.')
    _check(self.pos != 'sinusoidal' or self.d_model % 2 == 0,
           f'{p}pos=sinusoidal needs an even d_model, got {self.d_model}.')
    _check(0.0 <= self.dropout < 1.0, f'{p}dropout={self.dropout} must be in [0, 1).')
    _check(self.rope_base > 0, f'{p}rope_base={self.rope_base} must be positive.')
    _check(self.norm_eps > 0, f'{p}norm_eps={self.norm_eps} must be positive.')
    _check(self.init_std > 0, f'{p}init_std={self.init_std} must be positive.')
    self._check_parametrization()
    if self.lora_rank:
      self._check_lora()

  def _check_parametrization(self):
    p = 'model.'
    _one_of(p + 'parametrization', self.parametrization, ('sp', 'mup'))
    for key in ('mup_base_width', 'mup_base_head_dim'):
      v = getattr(self, key)
      _check(isinstance(v, int) and v >= 0, f'{p}{key}={v} must be a non-negative integer.')
      _check(self.parametrization == 'mup' or not v,
             f"{p}{key}={v} has no effect with {p}parametrization='sp'; set "
             f"{p}parametrization='mup' or leave it 0.")
    _check(self.parametrization == 'sp' or self.mup_base_width > 0,
           f"{p}parametrization='mup' needs {p}mup_base_width: the d_model its learning rate "
           f'and init were tuned at (e.g. {self.d_model} for this model itself).')

  def _check_lora(self):
    p = 'lora.'
    _check(isinstance(self.lora_rank, int) and self.lora_rank > 0,
           f'{p}rank={self.lora_rank} must be a positive integer (0 means full fine-tuning).')
    _check(bool(self.lora_targets), f'{p}targets is empty; name at least one of '
           f"{', '.join(LORA_TARGETS)}.")
    for t in self.lora_targets:
      _check(t in LORA_TARGETS, f"{p}targets names {t!r}, which is not a LoRA target; use "
             f"{', '.join(LORA_TARGETS)}.")
      _check(t != 'gate' or self.mlp == 'swiglu', f"{p}targets names 'gate' but model.mlp="
             f"{self.mlp!r} has no gate matrix; drop it or use a SwiGLU model.")
      fan_in, fan_out = self.lora_fans(t)
      _check(self.lora_rank <= min(fan_in, fan_out),
             f'{p}rank={self.lora_rank} is larger than the {fan_in}x{fan_out} {t!r} matrix allows '
             f'(at most {min(fan_in, fan_out)}); lower it.')
    _check(self.lora_alpha > 0, f'{p}alpha={self.lora_alpha} must be positive.')
    _check(0.0 <= self.lora_dropout < 1.0, f'{p}dropout={self.lora_dropout} must be in [0, 1).')
    for t in self.lora_tokens:
      _check(isinstance(t, int) and 0 <= t < self.vocab_size,
             f'{p}train_tokens names token id {t}, outside the vocabulary of {self.vocab_size}.')

  @classmethod
  def from_config(cls, model_cfg: Any, vocab_size: int = 0) -> 'ModelConfig':
    """Builds from `cfg.model`; `vocab_size` (from the tokenizer) fills model.vocab_size=0."""
    d = dict(model_cfg)
    if not d.get('vocab_size'):
      d['vocab_size'] = vocab_size
    elif vocab_size and d['vocab_size'] < vocab_size:
      raise UserError(f"model.vocab_size={d['vocab_size']} is smaller than the tokenizer's "
                      f'{vocab_size} tokens; set it to 0 to follow the tokenizer.')
    if not d.get('n_kv_heads'):
      d['n_kv_heads'] = d['n_heads']
    if not d.get('d_ff'):
      d['d_ff'] = default_d_ff(d['d_model'], d['mlp'])
    return cls(**read_section(cls, d, 'model'))
