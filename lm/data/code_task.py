"""The code-body task: its prompts, its fine-tuning examples and its gold reward.

A prompt is a one-line Python function header from the standard library (`def f(a, b=1):`); the
answer is the function's first statement, written unindented (the header's body). The gold reward
is a program, so every claim about a policy's quality can be checked:

    gold(header, response) = 0.5 if  header + the response indented as its body  parses
                           + 0.25 if it also does something (a statement other than `pass`,
                                  `...` or a bare string)
                           + 0.25 if it also reads one of the function's arguments (self and
                                  cls not counted)

so 1.0 is the best possible, and an empty or unparsable response scores 0. It rewards what a
byte-level model pretrained on the standard library can learn to do better (close brackets and
strings, end a statement, use the names in scope) and it is blind to what the code means, which
is what makes a learned reward model of it hackable in interesting ways.

Examples for supervised fine-tuning come from the same sources: each function whose header fits
MAX_HEADER_CHARS and has an argument, paired with its first statement after any docstring when
that fits MAX_BODY_CHARS and scores 1.0 itself. A header is held out for evaluation iff
sha256('code:' + header) falls in the lowest HELDOUT_FRACTION (stable in every process), and a
header appears once (the first function in source order that has it).
"""
from __future__ import annotations

import ast
import collections
import functools
import textwrap

from lm.data import corpus as corpus_lib
from lm.errors import UserError

FAMILY = 'code'
MAX_HEADER_CHARS = 60
MAX_BODY_CHARS = 40
HELDOUT_FRACTION = 0.2
SOURCE_FILES = 1200     # the first this many standard-library files, in sorted path order


def argument_names(fn: ast.FunctionDef) -> set[str]:
  a = fn.args
  names = [x.arg for x in a.posonlyargs + a.args + a.kwonlyargs]
  names += [x.arg for x in (a.vararg, a.kwarg) if x is not None]
  return {n for n in names if n not in ('self', 'cls')}


def _trivial(stmt: ast.stmt) -> bool:
  return isinstance(stmt, ast.Pass) or (isinstance(stmt, ast.Expr)
                                        and isinstance(stmt.value, ast.Constant))


def gold_parts(header: str, response: str) -> dict:
  """{'parses', 'does_something', 'uses_argument'} (booleans) and 'score' (module docstring)."""
  parts = {'parses': False, 'does_something': False, 'uses_argument': False, 'score': 0.0}
  body = response.strip('\n')
  if not body.strip():
    return parts
  try:
    tree = ast.parse(header + '\n' + textwrap.indent(body, '    '))
  except (SyntaxError, ValueError):   # ValueError: NUL bytes
    return parts
  if len(tree.body) != 1 or not isinstance(tree.body[0], ast.FunctionDef):
    return parts
  fn = tree.body[0]
  parts['parses'] = True
  parts['does_something'] = any(not _trivial(s) for s in fn.body)
  args = argument_names(fn)
  parts['uses_argument'] = parts['does_something'] and any(
      isinstance(n, ast.Name) and isinstance(n.ctx, ast.Load) and n.id in args
      for s in fn.body for n in ast.walk(s))
  parts['score'] = 0.5 + 0.25 * parts['does_something'] + 0.25 * parts['uses_argument']
  return parts


def gold(header: str, response: str) -> float:
  """The gold reward in [0, 1] of a response to a header (module docstring)."""
  return gold_parts(header, response)['score']


def is_heldout(header: str) -> bool:
  return corpus_lib.split_fraction(f'{FAMILY}:{header}') < HELDOUT_FRACTION


def _header_ok(line: str) -> bool:
  if len(line) > MAX_HEADER_CHARS or not line.isascii() or not line.startswith('def '):
    return False
  try:
    tree = ast.parse(line + ' pass')
  except (SyntaxError, ValueError):
    return False
  return (len(tree.body) == 1 and isinstance(tree.body[0], ast.FunctionDef)
          and bool(argument_names(tree.body[0])))


_STATEMENT_NODES = (ast.stmt, ast.excepthandler, ast.match_case)


def _function_defs(tree: ast.Module):
  """The tree's FunctionDef nodes in ast.walk's order (breadth first), visiting statements only:
  a def sits only in statement lists, so expressions, the bulk of the nodes, are never entered."""
  todo = collections.deque([tree])
  while todo:
    node = todo.popleft()
    if isinstance(node, ast.FunctionDef):
      yield node
    todo.extend(c for c in ast.iter_child_nodes(node) if isinstance(c, _STATEMENT_NODES))


def extract(texts) -> list[tuple[str, str]]:
  """(header, first statement) pairs of the sources, in source order, headers unique."""
  out, seen = [], set()
  for text in texts:
    try:
      tree = ast.parse(text)
    except (SyntaxError, ValueError):
      continue
    lines = text.splitlines()
    for fn in _function_defs(tree):
      if not fn.body:
        continue
      header = lines[fn.lineno - 1].strip() if fn.lineno <= len(lines) else ''
      body = fn.body[1:] if _trivial(fn.body[0]) and len(fn.body) > 1 else fn.body
      first = body[0]
      if header in seen or first.lineno <= fn.lineno or fn.end_lineno is None:
        continue
      stmt = textwrap.dedent('\n'.join(lines[first.lineno - 1:first.end_lineno])).strip('\n')
      # The cheap tests first: most functions fail on length before anything is parsed again.
      if len(stmt) > MAX_BODY_CHARS or not stmt.isascii() or '#' in stmt:
        continue
      if not _header_ok(header) or gold(header, stmt) < 1.0:
        continue
      seen.add(header)
      out.append((header, stmt))
  return out


def examples(source_files: int | None = None) -> dict[str, list[tuple[str, str]]]:
  """{'train': [(header, statement)], 'eval': [...]}: the held-out split by header hash, from the
  first `source_files` standard-library files (default SOURCE_FILES)."""
  return _examples(SOURCE_FILES if source_files is None else int(source_files))


@functools.lru_cache(maxsize=4)
def _examples(source_files: int) -> dict[str, list[tuple[str, str]]]:
  files = corpus_lib.stdlib_files()[:source_files]
  texts = []
  for f in files:
    with open(f.path, encoding='utf-8', errors='replace') as fh:
      texts.append(fh.read())
  pairs = extract(texts)
  split = {'train': [p for p in pairs if not is_heldout(p[0])],
           'eval': [p for p in pairs if is_heldout(p[0])]}
  if not split['train'] or not split['eval']:
    raise UserError(f'the first {source_files} standard-library files give {len(pairs)} usable '
                    'functions, too few to split; raise the number of source files.')
  return split


def record(header: str, statement: str = '') -> dict:
  """A prompt/response record of the task (the response is the source's own statement)."""
  return {'prompt': header, 'response': statement, 'family': FAMILY}


def records(train_limit: int = 0, eval_limit: int = 0, source_files: int | None = None
            ) -> dict[str, list[dict]]:
  """Fine-tuning records: {'train': [...], 'eval': [...]}, each split at most its limit (0: all)."""
  ex = examples(source_files)
  cut = lambda xs, n: xs[:n] if n else xs
  return {'train': [record(*p) for p in cut(ex['train'], train_limit)],
          'eval': [record(*p) for p in cut(ex['eval'], eval_limit)]}
