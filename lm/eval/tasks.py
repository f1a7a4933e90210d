"""Task suites: generated problems, prompts (few-shot text or the chat template), greedy answers and
their metrics.

Tasks (`TASKS`; `SUITES` names groups of them):
  arith1 .. arith4   a+b for two operands of exactly n digits (1 digit: 0-9), written as
                     "a+b=c" lines, the way `arith_documents` writes them into a training corpus.
  instruct           the built-in instruction set (lm/data/instruct.py), held-out instances, all eight
                     families, reported per family as well.

Held-out arithmetic. A problem a+b is held out iff `corpus.split_fraction('arith:a+b')` falls below
ARITH_HELDOUT, so the split is the same in every process. Evaluation draws only held-out problems;
`arith_documents` (the text mixed into a corpus with data.arith_fraction) and the few-shot
demonstrations draw only the others, so a scored problem was never seen in training text.

Formats. `fewshot` (for pretrained models): k demonstrations `question answer sep` from the task's
training pool, then the question; the greedy continuation is cut at the first newline. For
arithmetic a demonstration is "12+34=46\\n"; for instructions "Q: ...\\nA: ...\\n\\n". `chat`
(for fine-tuned models): k demonstrations as earlier user/assistant turns of the chat template
(lm/data/sft.py), then the question as a user turn; the reply ends at <|end|>.

Metrics per task (and per instruct family):
  exact    exact match of the stripped answer.
  partial  per-character credit: characters equal at the same position, over the longer of answer
           and prediction, aligned from the right for numeric answers (so per-digit accuracy by
           place value) and from the left otherwise; 1 exactly when `exact` is.
  logprob  mean log-probability (nats) of the correct answer and its terminator (the newline, or
           <|end|>) given the prompt, through `sample.continuation_logprobs`.
  exact_indep  the sub-skills check: exact match predicted by treating each answer position (and
           getting the length right) as an independent skill, the mean over problems of the product
           of the per-position accuracies and the length accuracy. Close to `exact` means errors
           are spread independently over positions; far above it means they come together.
"""
from __future__ import annotations

import dataclasses
import functools

import numpy as np

from lm.data import instruct
from lm.eval import sample as sample_lib
from lm.data import sft
from lm.data.arith import ARITH_DIGITS, arith_problems
from lm.errors import UserError

TASKS = tuple(f'arith{d}' for d in ARITH_DIGITS) + ('instruct',)
SUITES = {'arith': tuple(f'arith{d}' for d in ARITH_DIGITS)}
FORMATS = ('fewshot', 'chat')


# ---------------------------------------------------------------------------------------------
# Examples of a task.

@dataclasses.dataclass(frozen=True)
class Example:
  prompt: str      # the user message (chat format)
  question: str    # the few-shot text before the answer
  answer: str
  group: str       # the instruct family, or the task name


@dataclasses.dataclass(frozen=True)
class Task:
  name: str
  eval: tuple[Example, ...]
  demos: tuple[Example, ...]    # the training-side pool demonstrations are drawn from
  sep: str                      # after a few-shot demonstration's answer


def resolve(names) -> tuple[str, ...]:
  """Task names from a comma-separated string or a sequence, suites expanded, order kept."""
  if isinstance(names, str):
    names = [n.strip() for n in names.split(',')]
  out = []
  for n in names:
    if not n:
      continue
    if n in SUITES:
      out += SUITES[n]
    elif n in TASKS:
      out.append(n)
    else:
      raise UserError(f'{n!r} is not a task; the tasks are {", ".join(TASKS)} (and the suite '
                      f'{", ".join(SUITES)}).')
  return tuple(dict.fromkeys(out))


@functools.lru_cache(maxsize=16)
def build(name: str, n: int, seed: int = 0) -> Task:
  """The task's n held-out examples (fewer when its held-out side is smaller) and its demos."""
  resolve([name])
  if n < 1:
    raise UserError(f'the number of examples per task ({n}) must be at least 1.')
  if name.startswith('arith'):
    d = int(name[5:])
    ex = lambda a, b: Example(f'{a}+{b}=', f'{a}+{b}=', str(a + b), name)
    return Task(name, tuple(ex(a, b) for a, b in arith_problems(d, n, True, seed)),
                tuple(ex(a, b) for a, b in arith_problems(d, 64, False, seed)), '\n')
  per_family = max(1, -(-n // len(instruct.FAMILIES)))
  recs = instruct.build_instruction_set(seed, train_per_family=16, eval_per_family=per_family)
  ex = lambda r: Example(r['prompt'], f"Q: {r['prompt']}\nA: ", r['response'], r['family'])
  return Task(name, tuple(ex(r) for r in recs['eval']), tuple(ex(r) for r in recs['train']),
              '\n\n')


def demonstrations(task: Task, index: int, k: int, seed: int = 0) -> list[Example]:
  """k distinct demonstrations for the task's example `index` (seeded by both)."""
  if k > len(task.demos):
    raise UserError(f'{k} demonstrations asked of {task.name}, whose training pool holds '
                    f'{len(task.demos)}; lower the number of shots.')
  pick = np.random.default_rng([seed, index, 0xDE70]).choice(len(task.demos), k, replace=False)
  return [task.demos[i] for i in pick]


def fewshot_prompt(task: Task, index: int, k: int, seed: int = 0) -> str:
  """k demonstrations `question answer sep`, then example `index`'s question."""
  demos = demonstrations(task, index, k, seed)
  return ''.join(d.question + d.answer + task.sep for d in demos) + task.eval[index].question


def chat_messages(task: Task, index: int, k: int, seed: int = 0) -> list[dict]:
  """k demonstrations as user/assistant turns, then example `index` as the user turn."""
  msgs = []
  for d in demonstrations(task, index, k, seed):
    msgs += [{'role': 'user', 'content': d.prompt}, {'role': 'assistant', 'content': d.answer}]
  return msgs + [{'role': 'user', 'content': task.eval[index].prompt}]


# ---------------------------------------------------------------------------------------------
# Metrics.

def exact_match(pred: str, gold: str) -> bool:
  return pred.strip() == gold.strip()


def _aligned(pred: str, gold: str) -> tuple[str, str]:
  """Both stripped and, for a numeric gold answer, reversed (so position 0 is the units digit)."""
  pred, gold = pred.strip(), gold.strip()
  if gold.isdigit():
    return pred[::-1], gold[::-1]
  return pred, gold


def position_hits(pred: str, gold: str) -> list[bool]:
  """Per answer position (right-aligned for numbers): is the predicted character the gold one?"""
  p, g = _aligned(pred, gold)
  return [i < len(p) and p[i] == c for i, c in enumerate(g)]


def partial_credit(pred: str, gold: str) -> float:
  """Characters equal at the same (aligned) position over the longer of the two; 1 for two empty
  strings."""
  p, g = _aligned(pred, gold)
  longest = max(len(p), len(g))
  if longest == 0:
    return 1.0
  return sum(a == b for a, b in zip(p, g)) / longest


def independent_exact(preds: list[str], golds: list[str]) -> float:
  """Exact match predicted from independent sub-skills (module docstring)."""
  if not golds:
    return float('nan')
  hits = [position_hits(p, g) for p, g in zip(preds, golds)]
  width = max(len(h) for h in hits)
  acc = []
  for i in range(width):
    col = [h[i] for h in hits if i < len(h)]
    acc.append(float(np.mean(col)))
  length = float(np.mean([len(p.strip()) == len(g.strip()) for p, g in zip(preds, golds)]))
  return float(np.mean([np.prod(acc[:len(h)]) for h in hits])) * length


def score(preds: list[str], golds: list[str], logprobs=None) -> dict:
  """exact, partial, exact_indep (and logprob when given) over paired answers."""
  out = {'n': len(golds),
         'exact': float(np.mean([exact_match(p, g) for p, g in zip(preds, golds)])),
         'partial': float(np.mean([partial_credit(p, g) for p, g in zip(preds, golds)])),
         'exact_indep': independent_exact(preds, golds)}
  if logprobs is not None:
    out['logprob'] = float(np.mean(logprobs))
  return out


# ---------------------------------------------------------------------------------------------
# Running a task on a model.

def _encode_examples(task: Task, tokenizer, fmt: str, k: int, seed: int):
  """(prompt ids, answer-with-terminator ids) per example."""
  prompts, answers = [], []
  for i, ex in enumerate(task.eval):
    if fmt == 'chat':
      ids = sft.encode_chat(tokenizer, chat_messages(task, i, k, seed), generation_prompt=True)[0]
      ans = list(tokenizer.encode(ex.answer)) + [tokenizer.chat_ids['end']]
    else:
      ids = [tokenizer.eos_id] + list(tokenizer.encode(fewshot_prompt(task, i, k, seed)))
      ans = list(tokenizer.encode(ex.answer + '\n'))
    prompts.append(np.asarray(ids, np.int32))
    answers.append(ans)
  return prompts, answers


def check_fits(task: Task, tokenizer, mc, fmt: str, k: int, seed: int = 0) -> int:
  """The tokens to decode; a UserError when the longest prompt and answer do not fit max_len."""
  return _tokens_to_decode(task, mc, k, *_encode_examples(task, tokenizer, fmt, k, seed))


def _tokens_to_decode(task: Task, mc, k: int, prompts, answers) -> int:
  new = max(len(a) for a in answers) + 2
  longest = max(len(p) for p in prompts)
  if longest + new - 1 > mc.max_len:
    raise UserError(f'{k} shots make {task.name} prompts of up to {longest} tokens, which with '
                    f'the answer ({new} tokens) do not fit model.max_len={mc.max_len}; lower the '
                    'number of shots.')
  return new


def run_task(mc, params, tokenizer, task: Task, fmt: str = 'fewshot', k: int = 3,
             batch_size: int = 64, seed: int = 0, keep_answers: bool = False) -> dict:
  """Greedy answers, scored (module docstring); per instruct family under 'groups'."""
  if fmt not in FORMATS:
    raise UserError(f'task format {fmt!r} is not known; use one of {", ".join(FORMATS)}.')
  prompts, answers = _encode_examples(task, tokenizer, fmt, k, seed)
  new = _tokens_to_decode(task, mc, k, prompts, answers)
  stop = tokenizer.chat_ids['end'] if fmt == 'chat' else tokenizer.eos_id
  preds, logps = [], []
  for i in range(0, len(prompts), batch_size):
    chunk, ans = prompts[i:i + batch_size], answers[i:i + batch_size]
    pad = batch_size - len(chunk) if len(prompts) > batch_size else 0
    rows = chunk + [chunk[0]] * pad            # full-size chunks reuse the compiled shapes
    out = sample_lib.generate_tokens(mc, params, rows, new, temperature=0.0, eos_id=stop,
                                     pad_id=tokenizer.pad_id)
    for row in out[:len(chunk)]:
      text = tokenizer.decode(sample_lib.cut_at_eos(row, stop))
      preds.append(text.split('\n', 1)[0] if fmt == 'fewshot' else text)
    lp = sample_lib.continuation_logprobs(mc, params, rows, ans + [ans[0]] * pad)
    logps += list(lp[:len(chunk)])
  golds = [ex.answer for ex in task.eval]
  result = dict(score(preds, golds, logps), format=fmt, shots=k)
  groups = sorted({ex.group for ex in task.eval})
  if len(groups) > 1:
    result['groups'] = {}
    for g in groups:
      idx = [i for i, ex in enumerate(task.eval) if ex.group == g]
      result['groups'][g] = score([preds[i] for i in idx], [golds[i] for i in idx],
                                  [logps[i] for i in idx])
    # Sub-skills are positions within one kind of answer: pooled, each family on its own.
    result['exact_indep'] = float(sum(v['n'] * v['exact_indep'] for v in result['groups'].values())
                                  / len(golds))
  if keep_answers:
    result['answers'] = [{'prompt': ex.prompt, 'gold': ex.answer, 'pred': p}
                         for ex, p in zip(task.eval, preds)]
  return result
