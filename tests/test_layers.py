"""The library's import structure: no cycles, and each layer imports only from layers below it.

Every `import` of an lm module counts, those written inside functions too (a function-local
import is a cycle in disguise unless it guards a heavy optional library). A module new to lm/
must be given a layer here."""
import ast
import os

import pytest

ROOT = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), 'lm')

# Lowest first. A module may import from its own layer and the layers before it.
LAYERS = (
    ('base', ('lm', 'lm.errors', 'lm.config', 'lm.host', 'lm.metrics', 'lm.lock', 'lm.tracking')),
    ('model', ('lm.model', 'lm.model.lora', 'lm.model.sharding', 'lm.model.attention',
               'lm.model.transformer', 'lm.model.flops', 'lm.model.parametrization')),
    ('data', ('lm.data', 'lm.data.corpus', 'lm.data.tokenizer', 'lm.data.arith',
              'lm.data.instruct', 'lm.data.sft', 'lm.data.tokens', 'lm.data.code_task',
              'lm.data.sources', 'lm.data.build', 'lm.data.mixture', 'lm.data.replay')),
    ('training', ('lm.training', 'lm.training.optim', 'lm.training.checkpoint',
                  'lm.training.loop')),
    ('runs', ('lm.runs',)),
    ('eval', ('lm.eval', 'lm.eval.sample', 'lm.eval.tasks', 'lm.eval.harness', 'lm.eval.evaluate')),
    ('stages', ('lm.stages', 'lm.stages.pretrain', 'lm.stages.finetune', 'lm.align',
                'lm.align.common', 'lm.align.pairs', 'lm.align.reward', 'lm.align.dpo',
                'lm.align.ppo', 'lm.align.grpo')),
    ('scaling', ('lm.scaling', 'lm.scaling.numerics', 'lm.scaling.chinchilla', 'lm.scaling.kaplan',
                 'lm.scaling.fit', 'lm.scaling.plot', 'lm.scaling.report', 'lm.scaling.packed',
                 'lm.scaling.parallel', 'lm.scaling.plan', 'lm.scaling.results',
                 'lm.scaling.runner', 'lm.scaling.sweep', 'lm.scaling.cluster',
                 'lm.scaling.budget', 'lm.scaling.tasks')),
    ('interop', ('lm.interop', 'lm.interop.hf')),
    ('app', ('lm.cli', 'lm.pipeline', 'lm.chat', 'lm.worker', 'lm.serve', 'lm.serve.engine',
             'lm.serve.api')),
)
LAYER = {m: i for i, (_, mods) in enumerate(LAYERS) for m in mods}


def modules() -> dict[str, str]:
  out = {}
  for folder, _, files in os.walk(ROOT):
    for f in files:
      if f.endswith('.py'):
        path = os.path.join(folder, f)
        rel = os.path.relpath(path, os.path.dirname(ROOT))[:-3].replace(os.sep, '.')
        out[rel[:-len('.__init__')] if rel.endswith('.__init__') else rel] = path
  return out


def imports(mods: dict[str, str]) -> dict[str, set[str]]:
  """Module -> the lm modules it imports anywhere in its source."""
  graph = {}
  for name, path in mods.items():
    with open(path) as f:
      tree = ast.parse(f.read())
    package = name if path.endswith('__init__.py') else name.rpartition('.')[0]
    found = set()
    for node in ast.walk(tree):
      if isinstance(node, ast.Import):
        targets = [a.name for a in node.names]
      elif isinstance(node, ast.ImportFrom):
        base = node.module or ''
        if node.level:
          parts = package.split('.')
          base = '.'.join(parts[:len(parts) - node.level + 1] + ([base] if base else []))
        targets = [f'{base}.{a.name}' for a in node.names] + [base]
      else:
        continue
      for t in targets:
        while t and t not in mods:
          t = t.rpartition('.')[0]
        if t and t != name:
          found.add(t)
    graph[name] = found
  return graph


GRAPH = imports(modules())


def test_every_module_has_a_layer():
  missing = sorted(set(GRAPH) - set(LAYER))
  assert not missing, f'give these modules a layer in tests/test_layers.py: {missing}'
  assert len(GRAPH) >= 40   # the walk found the package


def test_no_module_imports_from_a_layer_above_it():
  upward = [f'{m} ({LAYERS[LAYER[m]][0]}) imports {t} ({LAYERS[LAYER[t]][0]})'
            for m, targets in GRAPH.items() for t in sorted(targets)
            if m in LAYER and t in LAYER and LAYER[t] > LAYER[m]]
  assert not upward, '\n'.join(upward)


def test_no_import_cycle():
  """Depth-first search for a back edge over all imports, function-local ones included."""
  state, stack = {}, []

  def visit(m):
    state[m] = 'open'
    stack.append(m)
    for t in sorted(GRAPH[m]):
      if state.get(t) == 'open':
        pytest.fail('import cycle: ' + ' -> '.join(stack[stack.index(t):] + [t]))
      if t not in state:
        visit(t)
    stack.pop()
    state[m] = 'done'
  for m in sorted(GRAPH):
    if m not in state:
      visit(m)


def test_the_guard_sees_function_local_imports(tmp_path):
  """The walk counts an import inside a function, so a cycle cannot hide there."""
  pkg = tmp_path / 'lm'
  pkg.mkdir()
  (pkg / '__init__.py').write_text('')
  (pkg / 'a.py').write_text('from lm import b\n')
  (pkg / 'b.py').write_text('def f():\n  from lm import a\n  from . import c\n')
  (pkg / 'c.py').write_text('')
  graph = imports({'lm': str(pkg / '__init__.py'), 'lm.a': str(pkg / 'a.py'),
                   'lm.b': str(pkg / 'b.py'), 'lm.c': str(pkg / 'c.py')})
  assert graph['lm.a'] == {'lm.b', 'lm'} and graph['lm.b'] == {'lm.a', 'lm.c', 'lm'}


def test_function_local_imports_are_the_exception():
  """Imports of lm modules sit at the top of their module; inside a function only where start-up
  cost matters (the sweep worker process), at most 10% of them."""
  local = total = 0
  for path in modules().values():
    with open(path) as f:
      tree = ast.parse(f.read())
    top = {id(n) for n in tree.body}
    for node in ast.walk(tree):
      if isinstance(node, ast.ImportFrom) and node.level == 0:
        names = [node.module or '']
      elif isinstance(node, ast.Import):
        names = [a.name for a in node.names]
      else:
        continue
      if any(n == 'lm' or n.startswith('lm.') for n in names):
        total += 1
        local += id(node) not in top
  assert total > 150 and local <= 0.10 * total, f'{local} of {total} lm imports are in functions'
