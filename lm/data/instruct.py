"""A built-in instruction-tuning set: "instruction -> answer" pairs generated locally, no download.

It is made for a small byte-level model (context 128 bytes) pretrained on Python source, fine-tuned
on these pairs and scored by exact match of its greedy answer. The point is to tell following an
instruction apart from memorising a template or an answer, so the set is split two ways:
  * By instance. An instance is held out iff sha256(f'{family}:{key}') puts it in the lowest
    HELDOUT_FRACTION (see `corpus.split_fraction`), so the split is the same in every process and
    for every seed. Keys: add/sub 'a,b'; sort the numbers sorted ascending, joined by ',' (one
    multiset is one instance whatever order it is shown in, since the answer is the same);
    reverse/upper/count the word (count draws its letter per record, so a held-out word is never
    counted in training, with any letter); funcname/module the stripped source line.
  * By phrasing. Each family has several templates; the last HELDOUT_PHRASINGS are never used in
    training.
Splits: 'train' (train instances, train phrasings), 'eval' (held-out instances, train phrasings) and
'eval_phrasing' (the same held-out instances, in the same order and with the same random details,
worded with held-out phrasings), so the two eval splits differ only in wording.

Records are {'prompt', 'response', 'family', 'phrasing'}: single-line ASCII prompts of at most
MAX_PROMPT_CHARS characters and responses of at most MAX_RESPONSE_CHARS, so a prompt, its answer
and a few template bytes fit a 128-byte context. Every answer is computed from the instance.

Determinism: each family and split draws from its own numpy generator seeded by (seed, family,
split), so adding a family or changing train_per_family leaves the other records as they were;
pools are sorted before sampling, and nothing depends on Python's per-process hash(). Only the
interleaving of 'train' (shuffled, since a trainer may read it in order) depends on the families.
'eval' holds eval_per_family distinct instances per family, or the whole held-out pool when it is
smaller (funcname and module on small sources); 'train' repeats instances only when its pool is
smaller than train_per_family, and then evenly.
"""
from __future__ import annotations

import ast
import collections
import functools
import hashlib
import re
import string

import numpy as np

from lm.data import corpus as corpus_lib
from lm.errors import UserError

FAMILIES = ('add', 'sub', 'reverse', 'upper', 'count', 'sort', 'funcname', 'module')
HELDOUT_PHRASINGS = 2  # the last templates of every family, never used for 'train'
HELDOUT_FRACTION = 0.2
MAX_PROMPT_CHARS = 80
MAX_RESPONSE_CHARS = 24
MAX_LINE_CHARS = 60  # def and import lines; every line template adds at most 20 characters
DEFAULT_SOURCE_FILES = 400
MIN_SOURCE_WORDS = 50  # fewer words than this in the sources: use _FALLBACK_WORDS instead

# Fields: {a} {b} integers; {w} a word; {c} a letter; {commas} / {spaces} the numbers to sort,
# joined by ', ' or ' '; {line} a def or import line.
_TEMPLATES = {
    'add': (
        '{a} + {b} =',
        'What is {a} plus {b}?',
        'Add {a} and {b}.',
        'Compute {a} + {b}. Answer with a number.',
        'Sum of {a} and {b}:',
        'Calculate the sum of {a} and {b}.',
        'What do {a} and {b} add up to?',
        'Increase {a} by {b}. Reply with the result only.',
    ),
    'sub': (
        '{a} - {b} =',
        'What is {a} minus {b}?',
        'Subtract {b} from {a}.',
        'Compute {a} - {b}. Answer with a number.',
        'Difference of {a} and {b}:',
        'Calculate {a} minus {b}.',
        'Take {b} away from {a}. What is left?',
        'By how much does {a} exceed {b}?',
    ),
    'reverse': (
        'Reverse the word {w}.',
        "Reverse '{w}'.",
        'Write {w} backwards.',
        'reverse: {w}',
        'What is {w} spelled backwards?',
        "Spell '{w}' in reverse order.",
        'Read {w} from right to left.',
        'Write the letters of {w} from last to first.',
    ),
    'upper': (
        'Uppercase the word {w}.',
        "Convert '{w}' to upper case.",
        'upper: {w}',
        'Write {w} in capital letters.',
        'What is {w} in uppercase?',
        "Capitalize every letter of '{w}'.",
        'Rewrite {w} in all caps.',
        'Give {w} with each letter as a capital.',
    ),
    'count': (
        "How many times does '{c}' occur in '{w}'?",
        'Count the letter {c} in {w}.',
        'count {c} in {w}:',
        "Number of '{c}' in '{w}'? Answer with a number.",
        'How often does the letter {c} appear in {w}?',
        "In the word {w}, how many {c}'s are there?",
        "Tally the occurrences of '{c}' in '{w}'.",
        'The word {w} contains the letter {c} how many times?',
    ),
    'sort': (
        'Sort ascending: {commas}',
        'Sort these numbers from smallest to largest: {spaces}',
        'sort {spaces}',
        'Put {commas} in increasing order.',
        'Arrange in ascending order: {spaces}',
        'Order from low to high: {commas}',
        'List {commas} starting with the smallest.',
        'Rank {spaces} from least to greatest.',
    ),
    'funcname': (
        'Name the function: {line}',
        '{line} Function name?',
        'Which function? {line}',
        'funcname: {line}',
        'Name defined: {line}',
        '{line} What is it called?',
        'What is defined? {line}',
        '{line} Its identifier?',
    ),
    'module': (
        'Name the module: {line}',
        '{line} Module name?',
        'Which module? {line}',
        'module: {line}',
        'Module imported: {line}',
        '{line} Which module is it?',
        'Which library? {line}',
        '{line} Its module?',
    ),
}

# Words for reverse/upper/count when the sources hold too few identifiers of 3-8 letters.
_FALLBACK_WORDS = tuple(sorted(set('''
    able about above after again air all also animal answer apple area army away baby back ball
    bank base bed begin bird black blue boat body book bottom box boy bread bring brother build
    but buy call car care carry cat cause center change child city class clean clear close cloud
    cold color come common cook copy corner country course cover cross cup dark day deep dog door
    down draw dream drink drive dry during early earth east easy eat egg end enough even every eye
    face fact fall family far farm fast father field fight find fire fish floor flower fly follow
    food foot forest form free friend front fruit full game garden girl give glass gold good great
    green ground group grow hand happy hard head hear heart heavy help high hill hold home horse
    hot house idea island job jump just keep key kind king lake land large late laugh learn leave
    letter light line list listen little live long look low machine main make man many map mark
    market men middle milk mind minute money month moon morning mother mountain move music name
    near night north number ocean office open order other page paper park part party pass people
    picture piece place plant play point poor power press pull push queen quick quiet rain read
    ready red river road rock room round rule run safe salt same school sea second seed sell send
    ship shop short show side simple sing sister sit sleep slow small snow soft song sound south
    space speak spring stand star start stone story street strong study summer sun table talk
    teacher ten thing think time today tree true turn under voice walk wall warm watch water week
    west white wind window winter woman wood word work world write year yellow young
'''.split())))

_WORD_RE = re.compile(r'(?<!\w)[a-z]{3,8}(?!\w)')
_DEF_RE = re.compile(r'def\s+([A-Za-z_][A-Za-z0-9_]*)\s*\(.*\).*:')
_IMPORT_RE = re.compile(r'import\s+([A-Za-z_][\w.]*)')
_FROM_RE = re.compile(r'from\s+([A-Za-z_][\w.]*)\s+import\b')
_SAMPLED = ('add', 'sub', 'sort')  # instances drawn at random; the others come from the sources
# A sampled family draws at most this many times per wanted distinct held-out instance.
_DRAWS_PER_EVAL_INSTANCE = 100


def phrasings(family: str) -> list[str]:
  """The templates of a family; the last HELDOUT_PHRASINGS are the held-out ones."""
  _check_family(family)
  return list(_TEMPLATES[family])


def family_answer(family: str, instance) -> str:
  """The exact answer to an instance: (a, b) for add/sub, (word, letter) for count, the shown
  numbers for sort, the word for reverse/upper, the stripped line for funcname/module."""
  _check_family(family)
  if family == 'add':
    return str(instance[0] + instance[1])
  if family == 'sub':
    return str(instance[0] - instance[1])
  if family == 'reverse':
    return instance[::-1]
  if family == 'upper':
    return instance.upper()
  if family == 'count':
    word, letter = instance
    return str(word.count(letter))
  if family == 'sort':
    return ' '.join(str(x) for x in sorted(instance))
  if family == 'funcname':
    return _DEF_RE.fullmatch(instance).group(1)
  m = _FROM_RE.match(instance) or _IMPORT_RE.match(instance)
  return m.group(1)


def summarize(records) -> dict[str, int]:
  """Number of records per family, families in FAMILIES order (then any others)."""
  counts = collections.Counter(r['family'] for r in records)
  order = [f for f in FAMILIES if f in counts] + sorted(set(counts) - set(FAMILIES))
  return {f: counts[f] for f in order}


def build_instruction_set(seed: int = 0, train_per_family: int = 2000, eval_per_family: int = 100,
                          families: tuple[str, ...] = FAMILIES, sources: list[str] | None = None
                          ) -> dict[str, list[dict]]:
  """Returns {'train': [...], 'eval': [...], 'eval_phrasing': [...]} (rules: module docstring).

  `sources` are Python source texts for the words, def lines and import lines; None reads the
  first DEFAULT_SOURCE_FILES files of the standard library.
  """
  if isinstance(families, str):
    families = (families,)
  for f in families:
    _check_family(f)
  families = tuple(dict.fromkeys(families))
  if not families:
    raise UserError(f'families is empty; pass some of {", ".join(FAMILIES)}')
  for name, value in (('seed', seed), ('train_per_family', train_per_family),
                      ('eval_per_family', eval_per_family)):
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < 0:
      raise UserError(f'{name}={value!r} must be a non-negative integer; pass e.g. {name}=0')
  texts = default_sources() if sources is None else tuple(sources)
  out = {'train': [], 'eval': [], 'eval_phrasing': []}
  for family in families:
    n_train_phr = len(_TEMPLATES[family]) - HELDOUT_PHRASINGS
    rng = _rng(seed, family, 'train')
    for inst in _train_instances(family, texts, train_per_family, rng):
      out['train'].append(_record(family, inst, int(rng.integers(n_train_phr))))
    rng = _rng(seed, family, 'eval')
    for inst in _eval_instances(family, texts, eval_per_family, rng):
      # Both phrasings are drawn for every instance, so 'eval' does not depend on whether
      # 'eval_phrasing' is used.
      phr = int(rng.integers(n_train_phr))
      held_phr = n_train_phr + int(rng.integers(HELDOUT_PHRASINGS))
      out['eval'].append(_record(family, inst, phr))
      out['eval_phrasing'].append(_record(family, inst, held_phr))
  order = np.random.default_rng([seed, 0x5F1]).permutation(len(out['train']))
  out['train'] = [out['train'][i] for i in order]
  return out


@functools.lru_cache(maxsize=1)
def default_sources() -> tuple[str, ...]:
  """The texts of the first DEFAULT_SOURCE_FILES standard-library files in sorted path order."""
  texts = []
  for f in corpus_lib.stdlib_files()[:DEFAULT_SOURCE_FILES]:
    try:
      with open(f.path, encoding='utf-8', errors='replace') as fh:
        texts.append(fh.read())
    except OSError as e:
      raise UserError(f'cannot read {f.path} ({e.strerror}); fix its permissions or pass '
                      'sources=[...]') from None
  return tuple(texts)


# ----------------------------------------------------------------------------------------------
# Instances.


def _check_family(family: str) -> None:
  if family not in _TEMPLATES:
    raise UserError(f'unknown instruction family {family!r}; choose from {", ".join(FAMILIES)}')


def _rng(seed: int, family: str, split: str) -> np.random.Generator:
  """A generator of its own per (seed, family, split), so no draw of one changes another."""
  tag = hashlib.sha256(f'{family}:{split}'.encode('utf-8')).digest()
  return np.random.default_rng([int(seed), int.from_bytes(tag[:8], 'big')])


def instance_key(family: str, instance) -> str:
  """The string whose hash decides whether an instance is held out (keys: module docstring)."""
  if family in ('add', 'sub'):
    return f'{instance[0]},{instance[1]}'
  if family == 'sort':
    return ','.join(str(x) for x in sorted(instance))
  if family == 'count':
    return instance[0]
  return instance


def is_heldout(family: str, key: str) -> bool:
  """Whether the instance with this key belongs to the held-out pool (stable across processes)."""
  return corpus_lib.split_fraction(f'{family}:{key}') < HELDOUT_FRACTION


def _number(rng: np.random.Generator) -> int:
  """0..999 with 1, 2 and 3 digits equally likely (uniform draws would be 90% 3-digit)."""
  digits = int(rng.integers(1, 4))
  return int(rng.integers(0 if digits == 1 else 10**(digits - 1), 10**digits))


def _draw(family: str, rng: np.random.Generator):
  """A random instance of a sampled family."""
  if family == 'add':
    return (_number(rng), _number(rng))
  if family == 'sub':
    a, b = _number(rng), _number(rng)
    return (a, b) if a >= b else (b, a)
  return tuple(int(x) for x in rng.integers(0, 100, size=int(rng.integers(3, 6))))


def _realise(family: str, base: str, rng: np.random.Generator):
  """A pool entry made into an instance: count adds its letter, present in the word half the time
  (a letter drawn from all 26 would be absent from a short word most of the time)."""
  if family != 'count':
    return base
  present = sorted(set(base))
  if rng.random() < 0.5:
    return (base, present[int(rng.integers(len(present)))])
  absent = [c for c in string.ascii_lowercase if c not in present]
  return (base, absent[int(rng.integers(len(absent)))])


def _train_instances(family: str, texts: tuple[str, ...], n: int, rng: np.random.Generator):
  if n == 0:
    return []
  if family in _SAMPLED:
    out = []
    while len(out) < n:
      inst = _draw(family, rng)
      if not is_heldout(family, instance_key(family, inst)):
        out.append(inst)
    return out
  pool = _pools(family, texts)[0]
  # Whole permutations, so that a small pool's instances repeat evenly.
  idx = np.concatenate([rng.permutation(len(pool)) for _ in range(-(-n // len(pool)))])[:n]
  return [_realise(family, pool[i], rng) for i in idx]


def _eval_instances(family: str, texts: tuple[str, ...], n: int, rng: np.random.Generator):
  if n == 0:
    return []
  if family in _SAMPLED:
    out, seen = [], set()
    for _ in range(_DRAWS_PER_EVAL_INSTANCE * n):
      inst = _draw(family, rng)
      key = instance_key(family, inst)
      if key not in seen and is_heldout(family, key):
        seen.add(key)
        out.append(inst)
        if len(out) == n:
          return out
    raise UserError(f'could draw only {len(out)} distinct held-out {family!r} instances; lower '
                    'eval_per_family')
  pool = _pools(family, texts)[1]
  idx = rng.permutation(len(pool))[:n]
  return [_realise(family, pool[i], rng) for i in idx]


@functools.lru_cache(maxsize=64)
def _pools(family: str, texts: tuple[str, ...]) -> tuple[list[str], list[str]]:
  """Sorted (train, held-out) pool entries of a family drawn from the sources."""
  found = _source_pools(texts)
  entries = found['lines'][family] if family in ('funcname', 'module') else found['words']
  train = [e for e in entries if not is_heldout(family, e)]
  held = [e for e in entries if is_heldout(family, e)]
  if not train or not held:
    what = {'funcname': 'one-line `def name(...):` lines',
            'module': 'one-line absolute `import x` or `from x import y` statements'}.get(
                family, 'words')
    raise UserError(f'the sources give family {family!r} {len(train)} train and {len(held)} '
                    f'held-out instances from {len(entries)} usable {what} (at most '
                    f'{MAX_LINE_CHARS} ASCII characters), and each side needs one; pass sources '
                    f'with more of them or leave {family!r} out of families')
  return train, held


@functools.lru_cache(maxsize=8)
def _source_pools(texts: tuple[str, ...]) -> dict:
  """Sorted unique words, def lines and import lines of the sources."""
  words, defs, imports = set(), set(), set()
  for text in texts:
    words.update(_WORD_RE.findall(text))
    for line in text.splitlines():
      line = line.strip()
      if len(line) > MAX_LINE_CHARS or not line.isascii():
        continue
      if line.startswith('def') and _is_def_line(line):
        defs.add(line)
      elif line.startswith(('import', 'from')) and _is_import_line(line):
        imports.add(line)
  # Too few words to split and sample: use the built-in list rather than repeat a handful.
  word_list = sorted(words) if len(words) >= MIN_SOURCE_WORDS else list(_FALLBACK_WORDS)
  return {'words': word_list, 'lines': {'funcname': sorted(defs), 'module': sorted(imports)}}


def _is_def_line(line: str) -> bool:
  """A complete one-line function header: `def name(...)...:` that parses with a body added."""
  m = _DEF_RE.fullmatch(line)
  if not m or len(m.group(1)) > MAX_RESPONSE_CHARS:
    return False
  # The regex also takes Python 2 headers and lines whose ':' sits in a comment; ast does not.
  try:
    body = ast.parse(line + ' pass').body
  except SyntaxError:
    return False
  return len(body) == 1 and isinstance(body[0], ast.FunctionDef)


def _is_import_line(line: str) -> bool:
  """One absolute import of one module: `import a.b [as c]` or `from a.b import ...`."""
  try:
    body = ast.parse(line).body
  except SyntaxError:  # Prose in docstrings, `from x import (` continued on the next line, ...
    return False
  if len(body) != 1:
    return False
  node = body[0]
  if isinstance(node, ast.Import):
    ok = len(node.names) == 1
  else:
    ok = isinstance(node, ast.ImportFrom) and node.level == 0 and node.module is not None
  return ok and len(family_answer('module', line)) <= MAX_RESPONSE_CHARS


def _record(family: str, instance, phrasing: int) -> dict:
  if family == 'sort':
    fields = {'commas': ', '.join(map(str, instance)), 'spaces': ' '.join(map(str, instance))}
  elif family in ('add', 'sub'):
    fields = {'a': instance[0], 'b': instance[1]}
  elif family == 'count':
    fields = {'w': instance[0], 'c': instance[1]}
  elif family in ('reverse', 'upper'):
    fields = {'w': instance}
  else:
    fields = {'line': instance}
  prompt = _TEMPLATES[family][phrasing].format(**fields)
  response = family_answer(family, instance)
  if len(prompt) > MAX_PROMPT_CHARS or len(response) > MAX_RESPONSE_CHARS:
    # Unreachable with the templates and filters above; a guard for edits to either.
    raise ValueError(f'{family} record over the length limits: {prompt!r} -> {response!r}')
  return {'prompt': prompt, 'response': response, 'family': family, 'phrasing': phrasing}
