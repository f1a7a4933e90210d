"""Evaluation of any run: loss, perplexity and bits per byte on text, and task suites.

`python run.py eval --workdir=RUN [--config=configs/eval.py --config.eval.KEY=...]` evaluates the
model of any run folder the other subcommands write (pretrained, fine-tuned, LoRA, DPO, PPO,
merged, imported) and writes RUN/eval.json plus a table on stdout.

Text. `val` is the validation split of the corpus the run was pretrained on (followed through a
fine-tuned run's base runs; the default corpus for a run with no text corpus), read as documents
and tokenized with the run's own tokenizer; each named corpus (eval.corpora: files, folders,
globs, .jsonl, as data.path takes them) is read whole. Every document is followed by EOS and the
stream starts with EOS, so every token, EOS included, is predicted once: loss is the mean
next-token cross-entropy in nats over those tokens, perplexity exp(loss), and bits per byte
loss / ln 2 * tokens / bytes, bytes being the UTF-8 bytes of the documents evaluated (counted from
the text, so the same formula serves bytes and SentencePiece tokenizers). eval.max_tokens caps the
tokens per corpus: whole documents are taken in order until the cap (a longer first document is
cut at the cap, and its bytes counted from the decoded tokens). Windows are eval.seq_len tokens
(0: the run's pretraining train.seq_len, within model.max_len), each token predicted with the
context of its window. Bytes of a named corpus that are not UTF-8 are read as U+FFFD and scored
as such; their count is kept (replaced_chars) and noted under the table.

Tasks (lm/eval/tasks.py): each scored by greedy decoding (exact match, partial credit, the sub-skills
prediction) and the log-probability of the correct answer; format 'auto' means the chat template
for fine-tuned runs and few-shot text otherwise.

An eval with nothing to do (no validation split, no corpora, no task that fits) is refused, and an
existing eval.json is left as it was.
"""
from __future__ import annotations

import dataclasses
import math
import os
import time

import jax.numpy as jnp
import numpy as np

from lm.data import sources
from lm.data import tokens as data_lib
from lm import metrics as metrics_lib
from lm import runs
from lm.eval import harness as harness_lib   # imports lm-eval only when a task is asked for
from lm.eval import sample as sample_lib
from lm.eval import tasks as tasks_lib
from lm.config import read_section
from lm.errors import UserError

DEFAULT_MAX_TOKENS = 131072


# ---------------------------------------------------------------------------------------------
# Text.

def token_stream(tokenizer, docs: list[str], max_tokens: int = 0) -> tuple[np.ndarray, int, int]:
  """(ids: EOS, then each document followed by EOS; text bytes; documents) with at most
  max_tokens predicted tokens (0: no cap)."""
  ids, n_bytes, n_docs = [tokenizer.eos_id], 0, 0
  for doc in docs:
    d = list(tokenizer.encode(doc)) + [tokenizer.eos_id]
    left = max_tokens - (len(ids) - 1) if max_tokens else len(d)
    if left <= 0:
      break
    if len(d) > left:                      # cut: the bytes of what is kept, EOS not reached
      d = d[:left]
      n_bytes += len(tokenizer.decode(d).encode('utf-8'))
    else:
      n_bytes += len(doc.encode('utf-8'))
    ids += d
    n_docs += 1
  return np.asarray(ids, np.int32), n_bytes, n_docs


def _window_nats(mc, params, stream: np.ndarray, seq_len: int, batch_size: int) -> float:
  """Sum of -log p(t | earlier tokens of its window) over stream[1:]."""
  n = len(stream) - 1
  starts = list(range(0, n, seq_len))
  total = 0.0
  for i in range(0, len(starts), batch_size):
    rows = np.zeros((batch_size, seq_len + 1), np.int32)
    mask = np.zeros((batch_size, seq_len), bool)
    for r, s in enumerate(starts[i:i + batch_size]):
      w = stream[s:s + seq_len + 1]
      rows[r, :len(w)] = w
      mask[r, :len(w) - 1] = True
    lp = np.asarray(sample_lib.score_tokens(mc, params, jnp.asarray(rows)), np.float64)
    total -= float(np.where(mask, lp, 0.0).sum())
  return total


def text_metrics(mc, params, tokenizer, docs: list[str], seq_len: int, batch_size: int = 16,
                 max_tokens: int = DEFAULT_MAX_TOKENS) -> dict:
  """loss (nats/token), ppl, bpb, and what they were measured on (module docstring)."""
  stream, n_bytes, n_docs = token_stream(tokenizer, docs, max_tokens)
  tokens = len(stream) - 1
  if tokens < 1:
    raise UserError('a corpus to evaluate holds no text; name files with text in them.')
  loss = _window_nats(mc, params, stream, seq_len, batch_size) / tokens
  return {'loss': loss, 'ppl': math.exp(min(loss, 50.0)),
          'bpb': loss / math.log(2) * tokens / n_bytes if n_bytes else None,
          'tokens': tokens, 'bytes': n_bytes, 'documents': n_docs, 'seq_len': seq_len}


def _config(workdir: str) -> dict:
  return runs.read_config(
      workdir, f'{workdir} is not a run folder (it has no config.json); point --workdir at a '
      'folder that run.py train, finetune, dpo, ppo, merge or import wrote.')


def pretraining_config(workdir: str) -> dict:
  """The config of the run at the root of workdir's chain of base runs (its pretraining); the
  default config when there is none."""
  _config(workdir)
  root = runs.root_config(workdir)
  if root is not None:
    return root
  from configs import base as base_cfg
  return base_cfg.get_config().to_dict()


def val_documents(data: dict) -> tuple[str, list[str]]:
  """(description, documents) of the validation split a data section describes (the default corpus
  for a synthetic one): the byte-level token files of that corpus, cut at its end-of-text tokens,
  so the documents are exactly the ones the split rules put there."""
  if data.get('corpus') == 'synthetic':
    from configs import base as base_cfg
    data = base_cfg.get_config().data.to_dict()
  dc = data_lib.DataConfig.from_config(dict(data, tokenizer='bytes', tokenizer_path=''))
  if dc.sources:
    raise UserError('the pretraining data is a mixture (data.sources); name the corpus to score '
                    'with --config.eval.corpora instead')
  ds = data_lib.prepare(dc)
  tok = ds.tokenizer
  val = np.asarray(ds.val)
  ends = np.flatnonzero(val == tok.eos_id)
  docs, start = [], 0
  for end in ends.tolist():
    if end > start:
      docs.append(tok.decode(val[start:end]))
    start = end + 1
  what = f'{dc.source_kind} validation split' + (f' of {dc.path}' if dc.path else '') + (
      f' of {dc.hf_dataset}' if dc.hf_dataset else '')
  return what, docs


def corpus_documents(path: str, text_field: str = 'text') -> tuple[list[str], int]:
  """(every document of a file, folder, glob or .jsonl (as data.path reads them), the number of
  characters that were not UTF-8 and were replaced with U+FFFD: they are scored as such, and
  eval.json and the table say how many)."""
  try:
    files = sources.corpus_files(path)
    units = sources.file_units(files, text_field, 16 << 20, None)
  except UserError as e:
    raise UserError(str(e).replace('fix --config.data.path', 'fix --config.eval.corpora')
                    .replace('--config.data.text_field', '--config.eval.text_field')
                    .replace('data.path', 'the eval corpus')) from None
  docs, bad, stats = [], sources.Bad(), {}
  for unit in units:
    for chunk in sources.read_unit(unit, text_field, 16 << 20, bad, stats):
      docs += [d.text for d in chunk if d.text]
  if bad.count:
    raise UserError(f'the eval corpus {path!r} has {bad.count} records that cannot be read; the '
                    f'first: {bad.examples[0]}; fix them or --config.eval.text_field.')
  if not docs:
    raise UserError(f'the eval corpus {path!r} holds no text; fix --config.eval.corpora.')
  return docs, stats.get('replaced_chars', 0)


# ---------------------------------------------------------------------------------------------
# Tasks inside the training loop.

def loop_tasks(tc, mc, tokenizer, seed: int = 0):
  """evaluate(params, step) -> {'task/<name>/<metric>': value, 'harness/<task>/<metric>': value}
  for train.eval_tasks (few-shot) and train.eval_harness (lm-evaluation-harness tasks), or None
  when neither is configured. Prompts that do not fit, and harness tasks without lm-eval or
  unknown to it, are refused before training."""
  names = tasks_lib.resolve(tc.eval_tasks)
  harness_tasks = harness_lib.task_names(tc.eval_harness)
  if not names and not harness_tasks:
    return None
  built = [tasks_lib.build(n, tc.eval_task_examples, seed) for n in names]
  for t in built:
    tasks_lib.check_fits(t, tokenizer, mc, 'fewshot', tc.eval_shots, seed)
  if harness_tasks:
    harness_lib.require()
    harness_lib.check_tasks(harness_tasks, tc.eval_harness_include)

  def evaluate(params, step: int) -> dict:
    if tc.eval_tasks_every and step % tc.eval_tasks_every and step != tc.steps:
      return {}
    row = {}
    for t in built:
      r = tasks_lib.run_task(mc, params, tokenizer, t, 'fewshot', tc.eval_shots, seed=seed)
      for k in ('exact', 'partial', 'exact_indep', 'logprob'):
        row[f'task/{t.name}/{k}'] = r[k]
    if harness_tasks:
      adapter = harness_lib.make_adapter(mc, params, tokenizer, seed=seed)
      got = harness_lib.run_harness(adapter, harness_tasks, limit=tc.eval_harness_limit,
                                    include=tc.eval_harness_include, seed=seed)
      for task, metrics in got['tasks'].items():
        row.update({f'harness/{task}/{k}': v for k, v in metrics.items() if v is not None})
    return row
  return evaluate


# ---------------------------------------------------------------------------------------------
# `run.py eval`.

@dataclasses.dataclass(frozen=True)
class EvalConfig:
  """The `eval` section (keys and meanings: configs/eval.py)."""
  val: bool = True
  corpora: str = ''
  text_field: str = 'text'
  max_tokens: int = 131072
  seq_len: int = 0
  tasks: str = 'auto'
  format: str = 'auto'
  shots: int = -1
  examples: int = 200
  batch_size: int = 64
  seed: int = 0
  harness: str = ''          # lm-evaluation-harness tasks, comma-separated (lm/eval/harness.py)
  harness_shots: int = -1    # demonstrations per prompt; -1: each task's own default
  harness_limit: int = 0     # examples per task; 0: all
  harness_include: str = ''  # folders of task YAML files (local data), comma-separated
  harness_chat: bool = False  # ask a fine-tuned run in its chat template

  @classmethod
  def from_config(cls, section) -> 'EvalConfig':
    return cls(**read_section(cls, section, 'eval'))


def evaluate_run(workdir: str, section) -> dict:
  """Evaluates the run in workdir as the `eval` config section asks; writes workdir/eval.json."""
  t0 = time.time()
  ec = EvalConfig.from_config(section)
  harness_tasks = harness_lib.task_names(ec.harness)
  if harness_tasks:
    harness_lib.require()   # refused before any work when it is not installed
  cfg = _config(workdir)
  names = tasks_lib.resolve(ec.tasks) if ec.tasks != 'auto' else None
  corpora = [c.strip() for c in ec.corpora.split(',') if c.strip()] if ec.corpora else []
  for key in ('max_tokens', 'examples', 'batch_size'):
    if getattr(ec, key) < (0 if key == 'max_tokens' else 1):
      raise UserError(f'eval.{key}={getattr(ec, key)} must be positive; fix --config.eval.{key}.')
  if ec.format not in ('auto',) + tasks_lib.FORMATS:
    raise UserError(f"eval.format={ec.format!r} is not known; use auto, fewshot or chat.")
  nothing = (f'so there is nothing to evaluate and {os.path.join(workdir, "eval.json")} is left '
             'as it was; set --config.eval.val=True, name --config.eval.corpora or list '
             '--config.eval.tasks')
  if not ec.val and not corpora and names == () and not harness_tasks:
    raise UserError(f'eval.val is False, eval.corpora and eval.tasks are empty, {nothing}.')
  docs = {name: corpus_documents(name, ec.text_field) for name in corpora}   # before the model
  mc, params, tokenizer, ident = runs.load_model(workdir)
  finetuned = runs.chats(cfg)
  fmt = ec.format if ec.format != 'auto' else ('chat' if finetuned else 'fewshot')
  if names is None:
    names = ('instruct',) if finetuned else tasks_lib.SUITES['arith'] + ('instruct',)
  shots = ec.shots if ec.shots >= 0 else (0 if fmt == 'chat' else 3)
  built, skipped = [], {}
  for n in names:                                    # too many shots: refused before any work
    t = tasks_lib.build(n, int(ec.examples), int(ec.seed))
    try:
      tasks_lib.check_fits(t, tokenizer, mc, fmt, shots, int(ec.seed))
      built.append(t)
    except UserError as e:
      if ec.tasks != 'auto':
        raise
      skipped[n] = str(e)                            # auto: a task that does not fit is left out
  if not ec.val and not corpora and not built and not harness_tasks:
    raise UserError(f'eval.val is False, eval.corpora is empty and no task fits this model '
                    f'({"; ".join(f"{n}: {w}" for n, w in skipped.items())}), {nothing}.')
  pre = pretraining_config(workdir)
  seq_len = int(ec.seq_len) or int(pre.get('train', {}).get('seq_len', mc.max_len))
  seq_len = min(seq_len, mc.max_len)
  out = {'run': ident, 'format': fmt, 'shots': shots, 'text': {}, 'tasks': {},
         'skipped_tasks': skipped}
  out['run'].pop('model', None)
  if ec.val:
    what, val_docs = val_documents(pre.get('data', {}))
    out['text']['val'] = dict(text_metrics(mc, params, tokenizer, val_docs, seq_len,
                                           int(ec.batch_size), int(ec.max_tokens)), source=what)
  for name, (d, replaced) in docs.items():
    out['text'][name] = text_metrics(mc, params, tokenizer, d, seq_len, int(ec.batch_size),
                                     int(ec.max_tokens))
    if replaced:
      out['text'][name]['replaced_chars'] = replaced
  for t in built:
    out['tasks'][t.name] = tasks_lib.run_task(mc, params, tokenizer, t, fmt, shots,
                                              int(ec.batch_size), int(ec.seed),
                                              keep_answers=True)
  if harness_tasks:
    adapter = harness_lib.make_adapter(mc, params, tokenizer, int(ec.batch_size),
                                       bool(ec.harness_chat), os.path.basename(workdir),
                                       int(ec.seed))
    out['harness'] = harness_lib.run_harness(adapter, harness_tasks, int(ec.harness_shots),
                                             int(ec.harness_limit), ec.harness_include,
                                             int(ec.seed))
  out['wall_s'] = time.time() - t0
  metrics_lib.write_json_atomic(os.path.join(workdir, 'eval.json'), out)
  return out


def table(result: dict) -> str:
  """The stdout table of an eval.json."""
  lines = ['text                              tokens      loss     ppl     bpb']
  for name, m in result['text'].items():
    bpb = f"{m['bpb']:7.3f}" if m['bpb'] is not None else '    n/a'
    lines.append(f"{name[-32:]:32s} {m['tokens']:8d} {m['loss']:9.4f} {m['ppl']:7.2f} {bpb}")
  lines.append(f"tasks ({result['format']}, {result['shots']} shots)      n   exact  partial  "
               'indep  logprob')
  for name, m in result['tasks'].items():
    rows = [(name, m)] + [(f'  {g}', v) for g, v in m.get('groups', {}).items()]
    for label, v in rows:
      lines.append(f"{label:28s} {v['n']:5d} {v['exact']:7.1%} {v['partial']:8.1%} "
                   f"{v['exact_indep']:6.1%} {v['logprob']:8.2f}")
  harness = result.get('harness')
  if harness:
    lines.append(f"lm-eval tasks (shots {harness['shots'] if harness['shots'] >= 0 else 'default'})")
    for task, metrics in harness['tasks'].items():
      shown = ', '.join(f'{k} {v:.4g}' for k, v in metrics.items() if v is not None)
      lines.append(f"{task:28s} {harness['n'].get(task, 0):5d}  {shown}")
  for name, why in result.get('skipped_tasks', {}).items():
    lines.append(f'{name}: left out ({why})')
  for name, m in result['text'].items():
    if m.get('replaced_chars'):
      lines.append(f"note: {name} is not all UTF-8 text: {m['replaced_chars']} invalid byte "
                   'sequences were read as U+FFFD and scored as such (is it a binary file?)')
  lines.append(f"wall time {result['wall_s']:.1f} s")
  return '\n'.join(lines)
