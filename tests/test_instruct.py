"""Tests of the built-in instruction-tuning set (lm/data/instruct.py).

Answers, instance keys and the held-out hash are recomputed here from the prompts (regexes,
Python string ops, ast), not with the module's own answer code.
"""
import ast
import collections
import hashlib
import json
import os
import re
import string
import subprocess
import sys

import pytest

from lm.data import instruct
from lm.errors import UserError

NAMES = '''alpha bravo charlie delta echo foxtrot golf hotel india juliet kilo lima mike november
oscar papa quebec romeo sierra tango uniform victor whiskey xray yankee zulu apple berry cherry
grape lemon mango melon olive peach pear plum prune quince raisin banana cocoa date fig guava kiwi
lychee nutmeg onion'''.split()


def snippet(i: int, name: str) -> str:
  """A small module with def lines, import lines and words; plus lines the pools must skip."""
  return (f'"""The {name} helpers."""\n'
          f'import mod_{name}\n'
          f'from pkg.{name} import thing as t{i}\n'
          f'from . import sibling_{name}\n'  # relative: skipped
          f'import os, mod_{name}\n'  # two modules: skipped
          f'import mod_{name}; mod_{name}.run()\n'  # two statements: skipped
          f'from pkg_{name} import (\n    a, b)\n'  # not complete on one line: skipped
          f'\n\ndef get_{name}(value, *args):\n'
          f'  """Return the {name} of value."""\n'
          f'  return value\n\n\n'
          f'def inline_{name}(x): return x\n'  # body on the line: skipped
          f'async def fetch_{name}(x):\n  pass\n'  # not `def NAME`: skipped
          f'def long_{name}(first_argument, second_argument, third_argument=None):\n  pass\n'
          f'class C{i}:\n'
          f'    def set_{name}(self, x=None) -> None:\n'
          f'        pass\n')


SOURCES = [snippet(i, n) for i, n in enumerate(NAMES)]

FIELDS = {'a': r'\d+', 'b': r'\d+', 'w': r'[a-z]{3,8}', 'c': r'[a-z]',
          'commas': r'\d+(?:, \d+){2,4}', 'spaces': r'\d+(?: \d+){2,4}', 'line': r'.+'}
SPLITS = ('train', 'eval', 'eval_phrasing')


def template_regex(template: str) -> re.Pattern:
  parts = []
  for literal, field, _, _ in string.Formatter().parse(template):
    parts.append(re.escape(literal))
    if field is not None:
      parts.append(f'(?P<{field}>{FIELDS[field]})')
  return re.compile(''.join(parts))


def parse(record) -> dict:
  """The fields of a record's prompt, read back through the template it names."""
  template = instruct.phrasings(record['family'])[record['phrasing']]
  m = template_regex(template).fullmatch(record['prompt'])
  assert m, (record, template)
  return m.groupdict()


def numbers(fields) -> list[int]:
  text = fields.get('commas') or fields.get('spaces')
  return [int(x) for x in re.findall(r'\d+', text)]


def key_of(record) -> str:
  """The instance key the module docstring defines, rebuilt from the prompt."""
  f, fam = parse(record), record['family']
  if fam in ('add', 'sub'):
    return f"{int(f['a'])},{int(f['b'])}"
  if fam == 'sort':
    return ','.join(str(x) for x in sorted(numbers(f)))
  return f['w'] if 'w' in f else f['line']


def heldout_by_hash(family: str, key: str) -> bool:
  h = hashlib.sha256(f'{family}:{key}'.encode('utf-8')).digest()
  return int.from_bytes(h[:8], 'big') / 2.0**64 < 0.2


def expected_answer(record) -> str:
  f, fam = parse(record), record['family']
  if fam in ('add', 'sub'):
    a, b = int(f['a']), int(f['b'])
    assert 0 <= a <= 999 and 0 <= b <= 999
    if fam == 'sub':
      assert b <= a
    return str(a + b if fam == 'add' else a - b)
  if fam == 'sort':
    nums = numbers(f)
    assert 3 <= len(nums) <= 5 and all(0 <= x <= 99 for x in nums)
    return ' '.join(str(x) for x in sorted(nums))
  if fam == 'reverse':
    return ''.join(reversed(f['w']))
  if fam == 'upper':
    return f['w'].upper()
  if fam == 'count':
    return str(sum(ch == f['c'] for ch in f['w']))
  line = f['line']
  assert line == line.strip() and len(line) <= 60 and line.isascii()
  if fam == 'funcname':
    node, = ast.parse(line + '\n  pass').body
    assert type(node) is ast.FunctionDef
    return node.name
  node, = ast.parse(line).body
  if isinstance(node, ast.Import):
    assert len(node.names) == 1
    return node.names[0].name
  assert isinstance(node, ast.ImportFrom) and node.level == 0
  return node.module


def check_set(d, families=instruct.FAMILIES):
  """Everything that must hold for any generated set: answers, limits, phrasings and the split."""
  assert set(d) == set(SPLITS)
  n_train_phr = {f: len(instruct.phrasings(f)) - instruct.HELDOUT_PHRASINGS for f in families}
  keys = {s: collections.defaultdict(list) for s in SPLITS}
  for split in SPLITS:
    assert set(instruct.summarize(d[split])) == set(families)
    for r in d[split]:
      assert set(r) == {'prompt', 'response', 'family', 'phrasing'}
      assert len(r['prompt']) <= 80 and len(r['response']) <= 24
      assert '\n' not in r['prompt'] and r['prompt'].isascii()
      assert r['response'] == expected_answer(r), r
      heldout_phrasing = r['phrasing'] >= n_train_phr[r['family']]
      assert heldout_phrasing == (split == 'eval_phrasing'), r
      key = key_of(r)
      assert heldout_by_hash(r['family'], key) == (split != 'train'), r
      keys[split][r['family']].append(key)
  for fam in families:
    train = set(keys['train'][fam])
    assert train
    assert not train & set(keys['eval'][fam]) and not train & set(keys['eval_phrasing'][fam])
    assert len(set(keys['eval'][fam])) == len(keys['eval'][fam]) > 0, fam  # distinct instances
  # Held-out wordings never match a train prompt, not even one labelled with another phrasing.
  for r in d['train']:
    for template in instruct.phrasings(r['family'])[n_train_phr[r['family']]:]:
      assert not template_regex(template).fullmatch(r['prompt']), r


@pytest.fixture(scope='module')
def small():
  return instruct.build_instruction_set(seed=0, train_per_family=300, eval_per_family=40,
                                        sources=SOURCES)


def pool_by_hand(family: str, sources) -> set[str]:
  """The instance keys a source-drawn family can use, found here with regexes and ast."""
  if family in ('reverse', 'upper', 'count'):
    return {w for src in sources for w in re.findall(r'(?<![A-Za-z0-9_])[a-z]{3,8}(?![A-Za-z0-9_])',
                                                     src)}
  out = set()
  for line in {ln.strip() for src in sources for ln in src.splitlines()}:
    if len(line) > 60:
      continue
    try:
      body = ast.parse(line + ' pass' if family == 'funcname' else line).body
    except SyntaxError:
      continue
    if len(body) != 1:
      continue
    node = body[0]
    if family == 'funcname':
      ok = type(node) is ast.FunctionDef
    else:
      ok = ((isinstance(node, ast.Import) and len(node.names) == 1) or
            (isinstance(node, ast.ImportFrom) and node.level == 0))
    if ok:
      out.add(line)
  return out


def test_small_sources_set_is_right(small):
  check_set(small)
  counts = {s: instruct.summarize(small[s]) for s in SPLITS}
  assert counts['train'] == {f: 300 for f in instruct.FAMILIES}
  assert counts['eval'] == counts['eval_phrasing']
  for fam in ('add', 'sub', 'sort'):
    assert counts['eval'][fam] == 40
  # The sources hold fewer than 40 held-out instances per family: eval takes the whole pool.
  for fam in ('reverse', 'upper', 'count', 'funcname', 'module'):
    pool = pool_by_hand(fam, SOURCES)
    held = {k for k in pool if heldout_by_hash(fam, k)}
    assert 0 < len(held) < 40, fam
    assert sorted(key_of(r) for r in small['eval'] if r['family'] == fam) == sorted(held)
    assert {key_of(r) for r in small['train'] if r['family'] == fam} == pool - held
  prompts = ' '.join(r['prompt'] for s in SPLITS for r in small[s])
  for skipped in ('from . import', 'import os, ', 'import (', 'inline_', 'async def', 'long_', ';'):
    assert skipped not in prompts


def test_small_line_pools_are_used_whole_and_evenly():
  lines = [f'def {n}(x):' for n in NAMES[:12]]
  held = [ln for ln in lines if heldout_by_hash('funcname', ln)]
  assert 0 < len(held) < len(lines)  # Else this source does not test the split.
  d = instruct.build_instruction_set(train_per_family=50, eval_per_family=100,
                                     families=('funcname',), sources=['\n'.join(lines)])
  check_set(d, families=('funcname',))
  assert sorted(key_of(r) for r in d['eval']) == sorted(held)
  uses = collections.Counter(key_of(r) for r in d['train'])
  assert sorted(uses) == sorted(set(lines) - set(held))
  assert max(uses.values()) - min(uses.values()) <= 1


def test_default_stdlib_sources():
  d = instruct.build_instruction_set(seed=3, train_per_family=40, eval_per_family=15)
  check_set(d)
  assert all(n == 15 for s in ('eval', 'eval_phrasing') for n in instruct.summarize(d[s]).values())
  assert all(n == 40 for n in instruct.summarize(d['train']).values())


def test_determinism_and_seeds(small):
  again = instruct.build_instruction_set(seed=0, train_per_family=300, eval_per_family=40,
                                         sources=SOURCES)
  assert again == small
  other = instruct.build_instruction_set(seed=1, train_per_family=300, eval_per_family=40,
                                         sources=SOURCES)
  for fam in instruct.FAMILIES:
    mine = [r for r in small['train'] if r['family'] == fam]
    theirs = [r for r in other['train'] if r['family'] == fam]
    assert mine != theirs, fam


def test_same_output_in_other_processes(tmp_path):
  """Python's hash() is salted per process; the set must not depend on it."""
  args = dict(seed=5, train_per_family=30, eval_per_family=10, sources=SOURCES)
  (tmp_path / 'args.json').write_text(json.dumps(args))
  code = ('import hashlib, json, sys; from lm.data import instruct; '
          'd = instruct.build_instruction_set(**json.load(open(sys.argv[1]))); '
          'print(hashlib.sha256(json.dumps(d, sort_keys=True).encode()).hexdigest())')
  root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
  procs = [subprocess.Popen([sys.executable, '-c', code, str(tmp_path / 'args.json')], cwd=root,
                            env={**os.environ, 'PYTHONHASHSEED': hs}, stdout=subprocess.PIPE,
                            text=True) for hs in ('1', '2')]
  digests = [p.communicate(timeout=60)[0].strip() for p in procs]
  here = instruct.build_instruction_set(**args)
  assert digests == [hashlib.sha256(json.dumps(here, sort_keys=True).encode()).hexdigest()] * 2


def test_families_and_counts_do_not_disturb_each_other(small):
  alone = instruct.build_instruction_set(seed=0, train_per_family=300, eval_per_family=40,
                                         families=('sort',), sources=SOURCES)
  for split in SPLITS:
    mine = [r for r in small[split] if r['family'] == 'sort']
    assert sorted(map(json.dumps, alone[split])) == sorted(map(json.dumps, mine))
  fewer = instruct.build_instruction_set(seed=0, train_per_family=7, eval_per_family=40,
                                         sources=SOURCES)
  assert fewer['eval'] == small['eval'] and fewer['eval_phrasing'] == small['eval_phrasing']


def test_eval_phrasing_rewords_the_eval_instances(small):
  assert len(small['eval']) == len(small['eval_phrasing'])
  for a, b in zip(small['eval'], small['eval_phrasing']):
    assert (a['family'], a['response']) == (b['family'], b['response'])
    if a['family'] == 'sort':
      assert numbers(parse(a)) == numbers(parse(b))  # Same numbers in the same shown order.
    else:
      assert parse(a) == parse(b)


def test_train_uses_every_train_phrasing_and_count_letters_are_balanced(small):
  for fam in instruct.FAMILIES:
    used = {r['phrasing'] for r in small['train'] if r['family'] == fam}
    assert used == set(range(len(instruct.phrasings(fam)) - instruct.HELDOUT_PHRASINGS))
  counts = [int(r['response']) for r in small['train'] if r['family'] == 'count']
  assert 0.4 < sum(c > 0 for c in counts) / len(counts) < 0.6


def test_phrasings_are_real_rewordings():
  for fam in instruct.FAMILIES:
    templates = instruct.phrasings(fam)
    assert len(templates) >= 6 and len(set(templates)) == len(templates)

    def words(t):
      return frozenset(re.findall(r'[a-z]+', re.sub(r'\{\w+\}', ' ', t.lower())))
    train = [words(t) for t in templates[:-instruct.HELDOUT_PHRASINGS]]
    for t in templates[-instruct.HELDOUT_PHRASINGS:]:
      assert words(t) and words(t) not in train, t


def test_fallback_words_when_sources_have_few():
  d = instruct.build_instruction_set(train_per_family=100, eval_per_family=20,
                                     families=('reverse', 'count'), sources=['def f(x):\n  pass\n'])
  check_set(d, families=('reverse', 'count'))
  assert len({key_of(r) for r in d['train']}) >= 50


def test_bad_input():
  with pytest.raises(UserError, match=r"'divide'.*add, sub, reverse"):
    instruct.build_instruction_set(families=('add', 'divide'))
  with pytest.raises(UserError, match='funcname'):
    instruct.build_instruction_set(families=('funcname',), sources=['import os\nx = 1\n'])
  # One usable def line leaves one side of the split empty.
  line = next(f'def {n}(x):' for n in NAMES if not heldout_by_hash('funcname', f'def {n}(x):'))
  with pytest.raises(UserError, match=r"'funcname' 1 train and 0 held-out"):
    instruct.build_instruction_set(families=('funcname',), sources=[line])
  with pytest.raises(UserError, match='module'):
    instruct.build_instruction_set(families=('module',), sources=['def f(x):\n  return x\n'])
  with pytest.raises(UserError, match='train_per_family'):
    instruct.build_instruction_set(train_per_family=-1, sources=SOURCES)
  with pytest.raises(UserError, match='blah'):
    instruct.phrasings('blah')
