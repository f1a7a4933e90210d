"""The field's benchmarks through EleutherAI's lm-evaluation-harness: any run as an lm-eval model.

`Adapter` is an `lm_eval.api.model.TemplateLM` over the project's model: its three request types
are answered by the project's own scoring and sampling,
  loglikelihood(context, continuation)  -> (log p(continuation | context), whether greedy decoding
                                           would produce it), several requests packed into each
                                           row (each attending only to itself), rows padded to a
                                           few bucket lengths so compiled programs are reused;
  loglikelihood_rolling(text)           -> log p(text), over the same disjoint windows of
                                           model.max_len tokens that lm-eval's own models use;
  generate_until(context, until, ...)   -> greedy (or sampled) continuations from the KV-cached
                                           batched decoder (lm/eval/sample.py), cut at the first
                                           stop string.
Tokenization follows lm-eval's TemplateLM (a context's trailing spaces move to the continuation;
the continuation is what tokenizing the whole adds to tokenizing the context; an empty context is
conditioned on EOS), so the per-request numbers equal lm-eval's `hf` model class on the same
weights (tests/test_harness.py, docs/evaluation.md).

`run_harness` runs named tasks (lm-eval's registry, plus task YAML files in eval.harness_include
for local data) and returns {task: {metric: value}}. A fine-tuned run can be asked in its chat
template (eval.harness_chat): lm-eval renders the conversation through `apply_chat_template`, which
writes the chat tokens as their text markers, and tok_encode maps the markers back to their ids.

lm-eval is an optional dependency (requirements-eval.txt); this module is imported only when a
harness task is asked for.
"""
from __future__ import annotations

import functools
import importlib
import math
import os
import re

import jax
import jax.numpy as jnp
import numpy as np

from lm.data.tokenizer import CHAT_ROLES, CHAT_TOKENS
from lm.errors import UserError
from lm.eval import sample as sample_lib
from lm.model import transformer as model_lib
from lm.model.attention import BRANCHES

INSTALL = 'pip install -r requirements-eval.txt'
BUCKET = 64   # rows are padded to a multiple of this many tokens (few compiled shapes)
BRANCHES_PER_CONTEXT = BRANCHES - 1   # continuations sharing one copy of a context


def require():
  """lm_eval, or a one-sentence refusal naming the install command."""
  try:
    lm_eval = importlib.import_module('lm_eval')
    importlib.import_module('lm_eval.api.model')   # where the base class lives
  except ImportError:
    raise UserError(f'harness tasks need lm-eval (EleutherAI lm-evaluation-harness), which is '
                    f'not installed; install it with `{INSTALL}`.') from None
  return lm_eval


def _packed_scores(mc, params, inputs_BT, positions_BT, segments_BT, at_BK, targets_BK):
  """(log p of targets_BK at positions at_BK [B, K], whether each is the argmax [B, K]) in
  float32, for rows that hold several requests (segment ids: lm/model/attention.py
  segment_mask; positions restart per request). Only the K scored positions go through the
  softmax."""
  logits = model_lib.apply(mc, params, inputs_BT, positions_BT=positions_BT,
                           segment_ids_BT=segments_BT)
  picked = jnp.take_along_axis(logits, at_BK[..., None], axis=1).astype(jnp.float32)  # [B, K, V]
  logp = jax.nn.log_softmax(picked, axis=-1)
  return (jnp.take_along_axis(logp, targets_BK[..., None], axis=-1)[..., 0],
          jnp.argmax(picked, axis=-1) == targets_BK)


_packed_scores_jit = jax.jit(_packed_scores, static_argnums=0)


def _bucket(n: int, size: int = BUCKET) -> int:
  return max(size, -(-n // size) * size)


def _pack(lengths: list[int], capacity: int) -> list[list[int]]:
  """Item indices packed into rows of `capacity` tokens, first fit in order of decreasing
  length (an item longer than a row has one to itself)."""
  rows, free = [], []
  for i in sorted(range(len(lengths)), key=lambda i: -lengths[i]):
    k = next((r for r, f in enumerate(free) if f >= lengths[i]), None)
    if k is None:
      rows.append([i])
      free.append(capacity - lengths[i])
    else:
      rows[k].append(i)
      free[k] -= lengths[i]
  return rows


def _groups(pairs, max_len: int, share: bool, limit: int):
  """The requests as groups (context ids, [(request, continuation ids), ...]): requests with the
  same context share it (up to BRANCHES - 1 continuations and `limit` tokens a group), each cut to
  its last max_len + 1 tokens as lm-eval's models do (a cut request keeps a group of its own)."""
  groups, by_ctx = [], {}
  for i, (ctx, cont) in enumerate(pairs):
    ctx, cont = list(ctx), list(cont)
    if not cont or len(ctx) + len(cont) < 2:
      continue
    if len(ctx) + len(cont) > max_len + 1:   # cut from the left; the context keeps >= 1 token
      seq = (ctx + cont)[-(max_len + 1):]
      cut = len(seq) - len(cont)
      if cut < 1:
        ctx, cont = seq[:1], seq[1:]
      else:
        ctx, cont = seq[:cut], seq[cut:]
      groups.append((ctx, [(i, cont)]))
      continue
    key = tuple(ctx) if share else i
    g = by_ctx.get(key)
    size = None if g is None else len(g[0]) + sum(len(c) - 1 for _, c in g[1]) + len(cont) - 1
    if g is None or len(g[1]) >= BRANCHES_PER_CONTEXT or size > limit:
      g = (ctx, [])
      by_ctx[key] = g
      groups.append(g)
    g[1].append((i, cont))
  return groups


def score_pairs(mc, params, pairs: list[tuple[list[int], list[int]]], batch_size: int,
                max_len: int) -> list[tuple[float, bool]]:
  """(sum log p(cont | ctx), all continuation tokens greedy) per (ctx, cont) pair of token ids.

  Requests with the same context (a multiple-choice question's choices) share one copy of it:
  each continuation sees the context and itself (lm/model/attention.py segment_mask), so the
  context is computed once. Groups are packed several to a row, rows of four times the mean group
  (at least the longest, at most max_len; multiples of BUCKET tokens), with as many tokens per
  forward pass as batch_size rows of the longest group. Each sequence is cut to its last
  max_len + 1 tokens, as lm-eval's models do."""
  out = [(0.0, True)] * len(pairs)   # an empty continuation: log 1
  share = mc.pos != 'alibi'   # ALiBi's bias reads distances off the row, not the positions
  groups = _groups(pairs, max_len, share, max_len)
  if not groups:
    return out
  sizes = [len(ctx) + sum(len(c) - 1 for _, c in conts) for ctx, conts in groups]
  longest, mean = _bucket(max(sizes)), _bucket(int(np.mean(sizes)))
  R = min(max(longest, 4 * mean), _bucket(max_len))
  per_call = max(1, 1 << ((batch_size * longest // R).bit_length() - 1))
  rows = _pack(sizes, R)
  K = _bucket(max(sum(len(c) for g in row for _, c in groups[g][1]) for row in rows), 16)
  for start in range(0, len(rows), per_call):
    chunk = rows[start:start + per_call]
    B = per_call if len(chunk) == per_call else 1 << (len(chunk) - 1).bit_length()
    inputs, positions, segments = (np.zeros((B, R), np.int32) for _ in range(3))
    at, targets = np.zeros((B, K), np.int32), np.zeros((B, K), np.int32)
    spans = []
    for r, row in enumerate(chunk):
      x, k = 0, 0
      for j, g in enumerate(row):
        ctx, conts = groups[g]
        n = len(ctx)
        inputs[r, x:x + n], positions[r, x:x + n], segments[r, x:x + n] = ctx, np.arange(n), -(j + 1)
        last = x + n - 1   # predicts every continuation's first token
        x += n
        for b, (i, cont) in enumerate(conts):
          m = len(cont) - 1
          inputs[r, x:x + m], positions[r, x:x + m] = cont[:-1], np.arange(n, n + m)
          segments[r, x:x + m] = (j + 1) * BRANCHES + b + 1
          at[r, k:k + m + 1] = [last] + list(range(x, x + m))
          targets[r, k:k + m + 1] = cont
          spans.append((i, r, k, k + m + 1))
          x, k = x + m, k + m + 1
    picks, greedy = (np.asarray(v) for v in _packed_scores_jit(
        mc, params, *(jnp.asarray(v) for v in (inputs, positions, segments, at, targets))))
    for i, r, lo, hi in spans:
      out[i] = (float(picks[r, lo:hi].astype(np.float64).sum()), bool(greedy[r, lo:hi].all()))
  return out


@functools.cache
def _adapter_class():
  require()
  from lm_eval import utils as lm_utils
  from lm_eval.api.model import TemplateLM

  class Adapter(TemplateLM):
    """A run's model as an lm-eval model (see the module's docstring)."""

    def __init__(self, mc, params, tokenizer, batch_size: int = 32, chat: bool = False,
                 name: str = 'lm', seed: int = 0):
      super().__init__()
      self.mc, self.params, self.tok = mc, params, tokenizer
      self.batch_size, self.chat, self.name, self.seed = int(batch_size), chat, name, seed
      if chat and not getattr(tokenizer, 'chat_ids', None):
        raise UserError('eval.harness_chat asks for the chat template, and this run\'s tokenizer '
                        'has no chat tokens (it was not fine-tuned to chat); leave it False.')
      self._markers = re.compile('(' + '|'.join(re.escape(t) for t in CHAT_TOKENS) + ')')

    # -- what TemplateLM needs
    @property
    def eot_token_id(self) -> int:
      return self.tok.eos_id

    @property
    def max_length(self) -> int:
      return int(self.mc.max_len)

    @property
    def tokenizer_name(self) -> str:
      return f'{self.name}-{self.tok.hash[:12]}'

    def tok_encode(self, string: str, add_special_tokens=None, **kwargs) -> list[int]:
      if not self.chat:
        return list(self.tok.encode(string))
      # A conversation starts with EOS, as the chat template (lm/data/sft.py) writes it.
      ids = [self.tok.eos_id] if string.startswith(CHAT_TOKENS[:2]) else []
      for piece in self._markers.split(string):
        if piece in CHAT_TOKENS:
          ids.append(self.tok.chat_ids[CHAT_ROLES[CHAT_TOKENS.index(piece)]])
        elif piece:
          ids.extend(self.tok.encode(piece))
      return ids

    def tok_decode(self, ids) -> str:
      return self.tok.decode(list(ids))

    def _loglikelihood_tokens(self, requests, disable_tqdm: bool = False, override_bs=None):
      pairs = [(ctx, cont) for _, ctx, cont in requests]
      return score_pairs(self.mc, self.params, pairs, int(override_bs or self.batch_size),
                         self.max_length)

    def loglikelihood_rolling(self, requests, disable_tqdm: bool = False) -> list[float]:
      windows, owner = [], []
      for i, (text,) in enumerate(req.args for req in requests):
        for w in map(lm_utils.make_disjoint_window, lm_utils.get_rolling_token_windows(
            token_list=self.tok_encode(text), prefix_token=self.prefix_token_id,
            max_seq_len=self.max_length, context_len=1)):
          windows.append(w)
          owner.append(i)
      scores = score_pairs(self.mc, self.params, windows, self.batch_size, self.max_length)
      totals = [0.0] * len(requests)
      for i, (lp, _) in zip(owner, scores):
        totals[i] += lp
      return totals

    def generate_until(self, requests, disable_tqdm: bool = False) -> list[str]:
      out = [None] * len(requests)
      groups = {}
      for i, req in enumerate(requests):
        context, kwargs = req.args
        kwargs = dict(kwargs or {})
        until = kwargs.get('until') or [self.tok.decode([self.tok.eos_id])]
        until = [until] if isinstance(until, str) else list(until)
        steps = int(kwargs.get('max_gen_toks', 256))
        temperature = float(kwargs.get('temperature', 0.0)) if kwargs.get('do_sample') else 0.0
        groups.setdefault((steps, temperature), []).append((i, context, until))
      for (steps, temperature), items in groups.items():
        steps = max(1, min(steps, self.max_length - 1))
        keep = self.max_length - steps
        prompts = [self.tok_encode(c)[-keep:] or [self.tok.eos_id] for _, c, _ in items]
        stop = self.tok.chat_ids['end'] if self.chat else self.tok.eos_id
        for start in range(0, len(items), self.batch_size):
          rows = sample_lib.generate_tokens(
              self.mc, self.params, prompts[start:start + self.batch_size], steps,
              temperature, 0, 1.0, self.seed, eos_id=stop, pad_id=self.tok.pad_id)
          for (i, _, until), row in zip(items[start:start + self.batch_size], rows):
            text = self.tok.decode(sample_lib.cut_at_eos(row, stop))
            cut = min([text.find(u) for u in until if u and u in text] or [len(text)])
            out[i] = text[:cut]
      return out

    # -- chat
    def apply_chat_template(self, chat_history, add_generation_prompt: bool = True) -> str:
      text = ''.join(f"<|{m['role']}|>{m['content']}<|end|>" for m in chat_history)
      return text + ('<|assistant|>' if add_generation_prompt else '')

    def chat_template(self, chat_template=False) -> str:
      return 'lm: <|role|>content<|end|>' if self.chat else ''

  return Adapter


def make_adapter(mc, params, tokenizer, batch_size: int = 32, chat: bool = False,
                 name: str = 'lm', seed: int = 0):
  """A run's model as an lm-eval model (lm_eval.api.model.TemplateLM)."""
  return _adapter_class()(mc, params, tokenizer, batch_size, chat, name, seed)


def task_names(text: str) -> list[str]:
  return [t.strip() for t in (text or '').split(',') if t.strip()]


def check_tasks(tasks: list[str], include: str = ''):
  """The TaskManager that knows `tasks` (lm-eval's registry plus the YAML folders in `include`),
  or a one-sentence refusal naming the first unknown task."""
  require()
  from lm_eval.tasks import TaskManager
  paths = [p for p in (include or '').split(',') if p]
  for p in paths:
    if not os.path.exists(p):
      raise UserError(f'eval.harness_include={p} does not exist; name a folder of lm-eval task '
                      'YAML files (docs/evaluation.md shows one).')
  manager = TaskManager(include_path=paths or None)
  unknown = [t for t in tasks if t not in manager.all_tasks]
  if unknown:
    close = [n for n in manager.all_tasks if unknown[0].lower() in n.lower()][:5]
    raise UserError(f'lm-eval knows no task {unknown[0]!r}' + (f' (similar: {", ".join(close)})'
                    if close else '') + '; name tasks from `lm_eval ls tasks`, or put a task YAML '
                    'in a folder given as eval.harness_include.')
  return manager


def run_harness(adapter, tasks: list[str], shots: int = -1, limit: int = 0, include: str = '',
                seed: int = 0) -> dict:
  """{'tasks': {task: {metric: value}}, 'n': {task: examples}, 'versions', 'shots', 'limit'}
  from lm_eval.simple_evaluate on `adapter`. shots -1: each task's own default; limit 0: every
  example; include: a folder (or comma-separated folders) of task YAML files."""
  lm_eval = require()
  manager = check_tasks(tasks, include)
  try:
    res = lm_eval.simple_evaluate(
        model=adapter, tasks=list(tasks), num_fewshot=None if shots < 0 else int(shots),
        limit=int(limit) or None, task_manager=manager, apply_chat_template=adapter.chat,
        random_seed=seed, numpy_random_seed=seed, torch_random_seed=seed,
        fewshot_random_seed=seed, bootstrap_iters=0, log_samples=False, verbosity='ERROR')
  except (ConnectionError, OSError) as e:
    raise UserError(f'lm-eval could not load the data of {", ".join(tasks)} ({e}); a hub task '
                    'needs the network (or a filled Hugging Face cache), a local task its '
                    'data files.') from None
  out = {'tasks': {}, 'n': {}, 'shots': shots, 'limit': limit}
  for task, metrics in res['results'].items():
    clean = {}
    for key, value in metrics.items():
      name, _, filt = key.partition(',')
      if name == 'alias' or name.endswith('_stderr') or not isinstance(value, (int, float)):
        continue
      clean[name if filt in ('', 'none') else f'{name}/{filt}'] = (
          float(value) if math.isfinite(float(value)) else None)
    out['tasks'][task] = clean
  out['n'] = {t: int(v.get('effective', v.get('original', 0)))
              for t, v in (res.get('n-samples') or {}).items()}
  out['versions'] = {t: str(v) for t, v in (res.get('versions') or {}).items()}
  return out
