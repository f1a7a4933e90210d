"""Preference pairs: sampled from a policy and labelled by the gold program, or read from JSONL.

A pair is {"prompt", "chosen", "rejected"}: the prompt's user text and two responses, the first
preferred. Sampled pairs (`sample_pairs`) also carry the gold scores of both responses and whether
the simulated rater's label was flipped:

  * every prompt gets `samples_per_prompt` responses from the policy at the sampling temperature;
  * the responses are scored by the gold program (lm/data/code_task.py); a prompt whose responses
    all score the same gives no pair (a rater could only guess), otherwise two responses with
    different scores are drawn at random and the higher-scoring one is chosen, up to
    `pairs_per_prompt` such pairs per prompt with no response in two of them;
  * with probability `noise` the label is flipped, as human raters disagree with each other
    (InstructGPT reports about 73% agreement between labellers; Ouyang et al. 2022).

Held-out pairs (for the reward model's accuracy) are made the same way on held-out prompts, with
no noise: their labels are the gold program's.
"""
from __future__ import annotations

import json
import os

import numpy as np

from lm import metrics as metrics_lib
from lm.align import common
from lm.data import corpus
from lm.errors import UserError

FIELDS = ('prompt', 'chosen', 'rejected')


def read_pairs(path: str) -> list[dict]:
  """The pairs of a JSONL file, each line checked (file and line named in errors)."""
  if not os.path.exists(path):
    raise UserError(f'the pairs file {path} does not exist; pass a JSONL file of '
                    '{"prompt", "chosen", "rejected"} records.')
  out = []
  for n, line in corpus.read_lines(path, 'pairs file'):
    if not line.strip():
      continue
    where = f'{path} line {n}'
    try:
      rec = json.loads(line)
    except json.JSONDecodeError as e:
      raise UserError(f'{where} is not JSON ({e.msg}); write one JSON object per line.') from None
    if not isinstance(rec, dict):
      raise UserError(f'{where} is not a JSON object; write {{"prompt", "chosen", "rejected"}}.')
    for k in FIELDS:
      if not isinstance(rec.get(k), str):
        raise UserError(f'{where} has no string field {k!r}; every pair needs "prompt", '
                        '"chosen" and "rejected".')
    if not rec['chosen'].strip() or not rec['rejected'].strip():
      raise UserError(f'{where} has an empty response; both responses need some text.')
    if rec['chosen'] == rec['rejected']:
      raise UserError(f'{where} has identical chosen and rejected responses, which says '
                      'nothing about a preference; drop the line.')
    out.append(rec)
  if not out:
    raise UserError(f'the pairs file {path} holds no pairs; add some or sample them '
                    '(leave the pairs key empty).')
  return out


def write_pairs(path: str, pairs: list[dict]) -> None:
  text = ''.join(json.dumps(p) + '\n' for p in pairs)
  metrics_lib.write_text_atomic(path, text)


def sample_pairs(policy: common.Policy, headers: list[str], samples_per_prompt: int, noise: float,
                 max_new_tokens: int, temperature: float, seed: int, batch_size: int,
                 pairs_per_prompt: int = 1) -> tuple[list[dict], dict]:
  """(pairs, statistics) sampled from `policy` on `headers` (module docstring)."""
  tok = policy.tokenizer
  prompts = [common.prompt_ids(tok, h) for h in headers]
  samples = []
  for k in range(samples_per_prompt):
    ids = common.sample_responses(policy, prompts, max_new_tokens, temperature, seed * 1000 + k,
                                  batch_size)
    samples.append([common.response_text(tok, r) for r in ids])
  rng = np.random.default_rng([seed, 0x9A1])
  pairs, ties, scores = [], 0, []
  for i, h in enumerate(headers):
    texts = [s[i] for s in samples]
    gold = [common.code_task.gold(h, t) for t in texts]
    scores += gold
    options = [(a, b) for a in range(len(texts)) for b in range(a + 1, len(texts))
               if gold[a] != gold[b] and texts[a].strip() and texts[b].strip()]
    if not options:
      ties += 1
      continue
    used = set()
    for o in rng.permutation(len(options)):
      a, b = options[int(o)]
      if a in used or b in used or texts[a] == texts[b]:
        continue
      used.update((a, b))
      if gold[a] < gold[b]:
        a, b = b, a
      flipped = bool(rng.random() < noise)
      if flipped:
        a, b = b, a
      pairs.append({'prompt': h, 'chosen': texts[a], 'rejected': texts[b],
                    'gold_chosen': gold[a], 'gold_rejected': gold[b], 'flipped': flipped})
      if len(used) // 2 == pairs_per_prompt:
        break
  stats = {'prompts': len(headers), 'pairs': len(pairs), 'prompts_without_pair': ties,
           'flipped': int(sum(p['flipped'] for p in pairs)), 'noise': noise,
           'sample_gold_mean': float(np.mean(scores)) if scores else None}
  return pairs, stats


def pair_rows(tokenizer, pairs: list[dict], seq_len: int) -> dict:
  """Rows of the chosen responses then the rejected ones: {'chosen': rows, 'rejected': rows}."""
  prompts = [common.prompt_ids(tokenizer, p['prompt']) for p in pairs]
  out = {}
  for side in ('chosen', 'rejected'):
    resp = [common.response_ids(tokenizer, p[side]) for p in pairs]
    out[side] = common.make_rows(prompts, resp, seq_len, tokenizer.pad_id)
  return out


def sample_to_file(path: str, policy: common.Policy, headers: list[str], split: str,
                   section: str, samples_per_prompt: int, noise: float, max_new_tokens: int,
                   temperature: float, seed: int, batch_size: int, pairs_per_prompt: int
                   ) -> tuple[list[dict], dict]:
  """sample_pairs on `headers` (the `split` prompts), written to `path`: (pairs, statistics).
  `section` names the config section whose keys the no-pair error points at."""
  import sys
  print(f'sampling {samples_per_prompt} responses to each of {len(headers)} {split} prompts for '
        'preference pairs ...', file=sys.stderr, flush=True)
  made, stats = sample_pairs(policy, headers, samples_per_prompt, noise, max_new_tokens,
                             temperature, seed, batch_size, pairs_per_prompt)
  if not made:
    raise UserError(f'no {split} prompt gave two responses of different gold reward; raise '
                    f'{section}.samples_per_prompt or {section}.temperature.')
  os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
  write_pairs(path, made)
  return made, stats


def stack(rows: dict, idx, keys=('tokens', 'mask', 'last')) -> dict:
  """A batch of the chosen rows `idx` followed by the rejected rows `idx` (pair_rows' output),
  with a weight of 1 per row."""
  out = {k: np.concatenate([rows['chosen'][k][idx], rows['rejected'][k][idx]]) for k in keys}
  out['weight'] = np.ones(2 * len(idx), np.float32)
  return out


def fitting(tokenizer, pairs: list[dict], seq_len: int) -> tuple[list[dict], int]:
  """The pairs whose prompt and both responses fit seq_len, and how many did not."""
  keep = []
  for p in pairs:
    n = len(common.prompt_ids(tokenizer, p['prompt']))
    m = max(len(common.response_ids(tokenizer, p[s])) for s in ('chosen', 'rejected'))
    if n + m <= seq_len:
      keep.append(p)
  return keep, len(pairs) - len(keep)
