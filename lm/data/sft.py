"""Supervised fine-tuning data: the chat template, JSONL examples, packing, the masked loss.

Chat template (token ids, built by id so text can never forge a marker):

  EOS <|system|> system text <|end|> <|user|> prompt <|end|> <|assistant|> response <|end|> ...

EOS comes first because pretraining separates documents with EOS: it is what the model has seen
before the start of a text (lm/eval/sample.py starts raw prompts the same way). The loss counts the
assistant's content tokens and the <|end|> that closes each assistant turn, and nothing else: the
model learns to answer and to stop, never to predict the user's words. A prompt for generation is
the template up to and including the <|assistant|> that opens the reply; decoding stops at <|end|>.

Examples: JSONL lines of {"prompt": ..., "response": ...} (one user turn and its answer, with an
optional "system") or {"messages": [{"role": "system"|"user"|"assistant", "content": ...}, ...]}.

Packing: an example of n tokens gives n - 1 (input, target) pairs. Rows of seq_len pairs are filled
with whole examples in a seeded order (a new order each epoch); each example's positions restart
at 0 and its segment id (1, 2, ... within the row; 0 for padding) keeps attention inside it, so a
packed row computes exactly what each of its examples computes alone. An example longer than
seq_len + 1 tokens is dropped and counted, never cut (a cut could keep a prompt without its answer
or an answer without its prompt).

Batches are dicts of [B, T] arrays: tokens, targets, weights (1.0 where the loss counts), segments,
positions. Global row g of the training stream is row g - R_<e of epoch e's packing, where R_<e
counts the rows of earlier epochs, so a batch is a pure function of (seed, step): exact resume.
"""
from __future__ import annotations

import json
import os

import jax
import jax.numpy as jnp
import numpy as np
import optax

from lm.model import transformer as model_lib
from lm.data import corpus
from lm.config import ModelConfig
from lm.errors import UserError

ROLES = ('system', 'user', 'assistant')


# ---------------------------------------------------------------------------------------------
# The chat template.

def chat_ids(tokenizer) -> dict:
  if tokenizer.chat_ids is None and tokenizer.name == 'hf':
    raise UserError('the imported tokenizer of this run has no chat tokens; import the model again '
                    'with --add_chat_tokens (python run.py import ... --add_chat_tokens).')
  if tokenizer.chat_ids is None:
    raise UserError(f'the {tokenizer.name} tokenizer of this run has no chat tokens (it was built '
                    'before they existed, or with data.chat_tokens=False); pretrain the base '
                    'again with data.chat_tokens=True.')
  return tokenizer.chat_ids


def encode_chat(tokenizer, messages: list[dict], generation_prompt: bool = False
                ) -> tuple[np.ndarray, np.ndarray]:
  """(ids int32 [n], loss mask bool [n]) of a conversation.

  generation_prompt: the messages end before the reply; <|assistant|> is appended to open it.
  """
  chat = chat_ids(tokenizer)
  ids, mask = [tokenizer.eos_id], [False]
  for m in messages:
    body = list(tokenizer.encode(m['content']))
    learn = m['role'] == 'assistant'
    ids += [chat[m['role']]] + body + [chat['end']]
    mask += [False] + [learn] * len(body) + [learn]
  if generation_prompt:
    ids.append(chat['assistant'])
    mask.append(False)
  return np.asarray(ids, np.int32), np.asarray(mask, bool)


def decode_chat(tokenizer, ids) -> list[dict]:
  """The messages of a templated id sequence (inverse of encode_chat)."""
  chat = chat_ids(tokenizer)
  role_of = {chat[r]: r for r in ROLES}
  out, role, body = [], None, []
  for i in [int(i) for i in ids]:
    if i in role_of:
      role, body = role_of[i], []
    elif i == chat['end'] and role is not None:
      out.append({'role': role, 'content': tokenizer.decode(body)})
      role = None
    elif role is not None:
      body.append(i)
  return out


def as_messages(record: dict) -> list[dict]:
  """A prompt/response record or a chat record as a message list."""
  if 'messages' in record:
    return record['messages']
  msgs = [{'role': 'system', 'content': record['system']}] if record.get('system') else []
  return msgs + [{'role': 'user', 'content': record['prompt']},
                 {'role': 'assistant', 'content': record['response']}]


def prompt_messages(record: dict) -> tuple[list[dict], str]:
  """(messages before the last assistant turn, that turn's content): what evaluation asks."""
  msgs = as_messages(record)
  last = max(i for i, m in enumerate(msgs) if m['role'] == 'assistant')
  return msgs[:last], msgs[last]['content']


# ---------------------------------------------------------------------------------------------
# JSONL examples.

def _check_record(rec, where: str) -> dict:
  if not isinstance(rec, dict):
    raise UserError(f'{where} is not a JSON object; each line must be {{"prompt": ..., '
                    '"response": ...}} or {"messages": [...]}.')
  if 'messages' in rec:
    msgs = rec['messages']
    if not isinstance(msgs, list) or not msgs:
      raise UserError(f'{where}: "messages" must be a non-empty list of {{"role", "content"}}.')
    for m in msgs:
      if (not isinstance(m, dict) or m.get('role') not in ROLES
          or not isinstance(m.get('content'), str)):
        raise UserError(f'{where}: every message needs "role" (system, user or assistant) and a '
                        'string "content".')
    answers = [m for m in msgs if m['role'] == 'assistant']
    if not answers:
      raise UserError(f'{where} has no assistant message, so nothing to learn; add one.')
    if any(not m['content'].strip() for m in answers):
      raise UserError(f'{where} has an empty assistant message; give it content or drop the line.')
    return {'messages': msgs}
  missing = [k for k in ('prompt', 'response') if not isinstance(rec.get(k), str)]
  if missing:
    raise UserError(f'{where} lacks the string field "{missing[0]}"; each line needs "prompt" and '
                    '"response" (or "messages").')
  if not rec['response'].strip():
    raise UserError(f'{where} has an empty response; give it an answer or drop the line.')
  return {k: rec[k] for k in ('prompt', 'response', 'system', 'family') if k in rec}


def load_jsonl(path: str) -> list[dict]:
  """Validated examples of a JSONL file; a bad line is named with its file and line number."""
  if not os.path.exists(path):
    raise UserError(f'{path} does not exist; give a JSONL file of {{"prompt", "response"}} or '
                    '{"messages"} lines.')
  out = []
  for n, line in corpus.read_lines(path, 'examples file'):
    if not line.strip():
      continue
    try:
      rec = json.loads(line)
    except json.JSONDecodeError as e:
      raise UserError(f'{path}:{n} is not valid JSON ({e.msg}); fix or remove that line.') from None
    out.append(_check_record(rec, f'{path}:{n}'))
  if not out:
    raise UserError(f'{path} holds no examples; add JSONL lines of {{"prompt", "response"}}.')
  return out


# ---------------------------------------------------------------------------------------------
# Packing.

class Examples:
  """Tokenized examples: ids and loss masks, with those too long for seq_len set aside."""

  def __init__(self, records: list[dict], tokenizer, seq_len: int, name: str = 'examples'):
    self.seq_len = seq_len
    self.ids, self.masks, self.records, self.too_long = [], [], [], 0
    for rec in records:
      ids, mask = encode_chat(tokenizer, as_messages(rec))
      if len(ids) - 1 > seq_len:
        self.too_long += 1
        continue
      self.ids.append(ids)
      self.masks.append(mask)
      self.records.append(rec)
    if not self.ids:
      raise UserError(f'every one of the {len(records)} {name} is longer than train.seq_len='
                      f'{seq_len} tokens; raise seq_len (up to the model\'s max_len) or shorten '
                      'them.')
    self.lengths = np.array([len(i) - 1 for i in self.ids])   # (input, target) pairs each

  def __len__(self):
    return len(self.ids)

  def info(self) -> dict:
    return {'examples': len(self), 'dropped_too_long': self.too_long,
            'pairs': int(self.lengths.sum()),
            'loss_tokens': int(sum(int(m[1:].sum()) for m in self.masks))}

  def pack(self, order) -> dict:
    """Rows [R, seq_len] of the examples in `order`, next-fit."""
    T = self.seq_len
    rows, row, used = [], [], 0
    for i in order:
      n = int(self.lengths[i])
      if used + n > T:
        rows.append(row)
        row, used = [], 0
      row.append(i)
      used += n
    if row:
      rows.append(row)
    R = len(rows)
    out = {'tokens': np.zeros((R, T), np.int32), 'targets': np.zeros((R, T), np.int32),
           'weights': np.zeros((R, T), np.float32), 'segments': np.zeros((R, T), np.int32),
           'positions': np.zeros((R, T), np.int32)}
    for r, members in enumerate(rows):
      at = 0
      for s, i in enumerate(members, 1):
        ids, mask, n = self.ids[i], self.masks[i], int(self.lengths[i])
        out['tokens'][r, at:at + n] = ids[:-1]
        out['targets'][r, at:at + n] = ids[1:]
        out['weights'][r, at:at + n] = mask[1:]
        out['segments'][r, at:at + n] = s
        out['positions'][r, at:at + n] = np.arange(n)
        at += n
    return out


class PackedStream:
  """The training stream: epoch e packs the examples in a permutation seeded by (seed, e)."""

  def __init__(self, examples: Examples, seed: int):
    self.examples, self.seed = examples, seed
    self._epochs: list[dict] = []
    self._starts = [0]        # global row where each epoch starts

  def _epoch(self, e: int) -> dict:
    while len(self._epochs) <= e:
      k = len(self._epochs)
      order = np.random.default_rng([self.seed, k, 0x5f7]).permutation(len(self.examples))
      self._epochs.append(self.examples.pack(order))
      self._starts.append(self._starts[-1] + len(self._epochs[-1]['tokens']))
    return self._epochs[e]

  def rows(self, first: int, count: int) -> dict:
    """Global rows first .. first + count - 1."""
    parts = []
    g = first
    while g < first + count:
      e = 0
      while self._starts[-1] <= g or len(self._epochs) <= e:
        self._epoch(len(self._epochs))
      e = int(np.searchsorted(self._starts, g, side='right')) - 1
      ep = self._epochs[e]
      lo = g - self._starts[e]
      take = min(first + count - g, len(ep['tokens']) - lo)
      parts.append({k: v[lo:lo + take] for k, v in ep.items()})
      g += take
    return {k: np.concatenate([p[k] for p in parts]) for k in parts[0]}

  def batch(self, step: int, batch_size: int, process_index: int = 0, process_count: int = 1):
    """This process's rows of the global batch of `step`."""
    per = batch_size // process_count
    return self.rows(step * batch_size + process_index * per, per)

  def rows_per_epoch(self) -> int:
    return len(self._epoch(0)['tokens'])


# ---------------------------------------------------------------------------------------------
# The loss.

def token_losses(mc: ModelConfig, params, batch, adapters=None, rng=None):
  """Cross-entropy of every (input, target) pair of a packed batch: float32 [B, T]."""
  deterministic = rng is None or (mc.dropout == 0 and mc.lora_dropout == 0)
  logits = model_lib.apply(mc, params, batch['tokens'], adapters=adapters,
                           positions_BT=batch['positions'], segment_ids_BT=batch['segments'],
                           deterministic=deterministic,
                           rngs=None if deterministic else {'dropout': rng})
  return optax.softmax_cross_entropy_with_integer_labels(logits, batch['targets'])


def masked_loss(mc: ModelConfig, params, batch, adapters=None, rng=None):
  """(sum of the counted tokens' losses, their number): the loop divides one by the other."""
  w = batch['weights']
  return jnp.sum(token_losses(mc, params, batch, adapters, rng) * w), jnp.sum(w)


def mixed_loss(mc: ModelConfig, params, batch, fraction: float, adapters=None, rng=None):
  """The loss of a batch whose 'replay' marks the replay rows' tokens (lm/data/replay.py), with
  replay share `fraction` f: (1 - f) times the chat examples' mean loss over their counted tokens
  plus f times the replay rows' mean loss over every one of their tokens, so the share f of the
  rows is also the share of the loss (pooled into one mean, a replay row's many counted tokens
  would take most of the gradient). As (sum, (weight, {'sft_loss', 'replay_loss'})): the loss
  and each part's mean times the batch's weight, which the loop divides back out."""
  w = batch['weights']
  losses = token_losses(mc, params, batch, adapters, rng) * w
  weight = jnp.sum(w)
  r = batch['replay']
  parts = {}
  for name, sel in (('sft_loss', 1 - r), ('replay_loss', r)):
    parts[name] = jnp.sum(losses * sel) / jnp.maximum(jnp.sum(w * sel), 1e-9)
  total = ((1 - fraction) * parts['sft_loss'] + fraction * parts['replay_loss']) * weight
  return total, (weight, {k: v * weight for k, v in parts.items()})


def example_losses(mc: ModelConfig, params, packed: dict, adapters=None) -> np.ndarray:
  """Mean counted-token loss of each example of a packed set, in row-then-segment order."""
  losses = np.asarray(jax.jit(lambda p, a, b: token_losses(mc, p, b, a))(
      params, adapters, {k: jnp.asarray(v) for k, v in packed.items()}))
  out = []
  for r in range(losses.shape[0]):
    for s in range(1, int(packed['segments'][r].max()) + 1):
      sel = (packed['segments'][r] == s)
      w = packed['weights'][r] * sel
      out.append(float((losses[r] * w).sum() / max(w.sum(), 1)))
  return np.asarray(out)
