"""Standard parametrisation (SP) and the Maximal Update Parametrisation (μP).

Under SP every width wants its own learning rate and init: wider models take larger steps in
their hidden layers, whose activations grow with width. μP (Yang et al. 2021, "Tensor Programs
V", Table 8, in the form with an output multiplier) rescales the model so that the best
hyperparameters found at one width, `model.mup_base_width`, hold at every width. With
m = d_model / mup_base_width:

  hidden matrices (attention q, k, v, o; MLP in, gate, out): init std / sqrt(m), Adam rate / m;
  embeddings, norms, biases, the output head: init and rate unchanged;
  logits multiplied by 1 / m;
  attention logits q.k scaled by sqrt(H_b) / H instead of 1 / sqrt(H), H the head dim and H_b
    `model.mup_base_head_dim` (0: H itself). This is μP's 1/H scaling normalised to SP at the
    base head dim; it matters when width grows through the head dim (a fixed head count).
    When width grows through the head count (a fixed head dim, as the sweeps do), H = H_b.

At m = 1 (and H = H_b) μP is SP exactly, so hyperparameters tuned under SP at the base width
carry over. The stored weights are the trained tree itself; `to_standard` folds the multipliers
into them for the Hugging Face layouts, which know only SP.
"""
import dataclasses
import math

import jax
import numpy as np

from lm.config import ModelConfig

PARAMETRIZATIONS = ('sp', 'mup')

# The hidden matrices: (module, name) at the end of a parameter's path (any layer, scanned or
# not). Their fan-in grows with width, so μP scales their init and Adam rate.
HIDDEN_MATRICES = frozenset({('attn', 'wq'), ('attn', 'wk'), ('attn', 'wv'), ('attn', 'wo'),
                             ('mlp', 'wi'), ('mlp', 'wg'), ('mlp', 'wo')})


def is_mup(mc: ModelConfig) -> bool:
  return mc.parametrization == 'mup'


def width_mult(mc: ModelConfig) -> float:
  """m = d_model / mup_base_width under μP; 1 under SP."""
  return mc.d_model / mc.mup_base_width if is_mup(mc) else 1.0


def hidden_init_std(mc: ModelConfig) -> float:
  """The init std of the hidden matrices (before the residual projections' depth factor)."""
  return mc.init_std / math.sqrt(width_mult(mc))


def attention_scale(mc: ModelConfig) -> float | None:
  """The factor on q.k: sqrt(H_b)/H under μP; None (the kernel's own 1/sqrt(H)) under SP and
  wherever μP's equals it (H = H_b)."""
  H = mc.head_dim
  if not is_mup(mc) or (mc.mup_base_head_dim or H) == H:
    return None
  return math.sqrt(mc.mup_base_head_dim) / H


def logit_multiplier(mc: ModelConfig) -> float:
  """The factor on the output logits: 1/m under μP, 1 under SP."""
  return 1.0 / width_mult(mc)


def path_names(path) -> tuple:
  return tuple(str(getattr(k, 'key', k)) for k in path)


def is_hidden(path) -> bool:
  return path_names(path)[-2:] in HIDDEN_MATRICES


def lr_scales(mc: ModelConfig, params):
  """Per-leaf factors on the learning rate: 1/m for the hidden matrices under μP, 1 for every
  other leaf (and for every leaf under SP). `params` may be wrapped (a reward model's trunk):
  leaves are matched by the end of their path."""
  inv = 1.0 / width_mult(mc)
  return jax.tree_util.tree_map_with_path(lambda path, _: inv if is_hidden(path) else 1.0,
                                          params)


def to_standard(mc: ModelConfig, params) -> tuple[ModelConfig, dict]:
  """(config, params) of the SP model that computes the same logits: the attention factor
  folded into the queries (RoPE is linear, so scaling q before it scales q.k) and 1/m into the
  output head. A μP model with tied embeddings away from its base width gets an untied head (the
  table also feeds the input, so 1/m cannot go into it). numpy float32 arrays; an SP model is returned as it is."""
  if not is_mup(mc):
    return mc, params
  p = jax.tree.map(lambda x: np.asarray(x, np.float32), jax.device_get(params))
  q = (attention_scale(mc) or 1 / math.sqrt(mc.head_dim)) * math.sqrt(mc.head_dim)

  def fold(path, x):
    names = path_names(path)
    if names[-2:] == ('attn', 'wq') or names[-2:] == ('attn', 'wq_bias'):
      return x * q
    return x
  p = jax.tree_util.tree_map_with_path(fold, p)
  tied = mc.tie_embeddings and logit_multiplier(mc) == 1.0
  if not tied:
    head = p['embed'].T if mc.tie_embeddings else p['head']
    p['head'] = np.ascontiguousarray(head * logit_multiplier(mc), np.float32)
  sp = dataclasses.replace(mc, parametrization='sp', mup_base_width=0, mup_base_head_dim=0,
                           tie_embeddings=tied)
  return sp, p
