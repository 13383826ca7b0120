"""The import rules of docs/architecture.md, checked on the source with ``ast`` (nothing is
imported): every ``import`` statement of ``nvae_jax``, at module level or inside a function.

* The library never imports the experiment folder ``configs/``.
* Areas sit on floors and import only areas on lower floors (``FLOORS``); the building blocks on
  one floor do not import each other.
* A model never imports ``nvae_jax.data`` or ``nvae_jax.train``: it receives shapes and arrays.
* Inside the platform wing (``train/``), the model wing (``models/``) and the NVAE family
  (``models/nvae/``), modules sit on their own floors (``INNER_FLOORS``) and import only lower
  ones; a package's ``__init__`` may import its modules, never the reverse; every module of those
  packages has a floor, so a new module must be placed.
* No import cycle between modules.
"""

import ast
import collections
import os

import pytest

ROOT = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), 'nvae_jax')

# Area (a top-level module or subpackage of nvae_jax) -> floor.
FLOORS = {
    'errors': 0, 'policy': 0, 'progress': 0, 'compile_cache': 0, 'compile_options': 0,
    'host_init': 0, 'host_memory': 0, 'collector': 0,
    'compile_priority': 1,  # pauses the collector while it compiles
    'nn': 1, 'distributions': 1, 'flows': 1, 'data': 1,  # the building blocks
    'objectives': 2,
    'config': 3,
    'models': 4,  # the model wing
    'train': 5,  # the platform wing
    'convert': 6,
    'main': 7,
}
# Package -> {module: floor} inside it ('' is the package's __init__).
INNER_FLOORS = {
    'nvae_jax.train': {'optim': 0, 'migrations': 0, 'testing': 0, 'preemption': 0, 'workdir': 0,
                       'event_file': 0,
                       'state': 1, 'checkpoint': 1,
                       'step': 2, 'build': 3, 'evaluate': 4, 'sample': 4, 'loop': 5, '': 6},
    'nvae_jax.models': {'base': 0, 'conv_vae': 1, 'glow': 1, 'nvae': 1, '': 2},
    'nvae_jax.models.nvae': {'plan': 0, 'groups': 1, 'network': 2, 'sampling': 3, 'task': 4,
                             '': 5},
}


def _modules() -> dict[str, str]:
  """Dotted module name -> file, for every .py file of the package."""
  out = {}
  for folder, _, files in os.walk(ROOT):
    for f in files:
      if f.endswith('.py'):
        path = os.path.join(folder, f)
        rel = os.path.relpath(path, os.path.dirname(ROOT))[:-3].replace(os.sep, '.')
        out[rel[:-len('.__init__')] if rel.endswith('.__init__') else rel] = path
  return out


def _imports(modules: dict[str, str]) -> dict[str, set[str]]:
  """Module -> the modules (or packages, or outside names) its import statements name."""
  edges = collections.defaultdict(set)
  for name, path in modules.items():
    package = name if path.endswith('__init__.py') else name.rsplit('.', 1)[0]
    with open(path, encoding='utf-8') as f:
      tree = ast.parse(f.read(), path)
    for node in ast.walk(tree):
      if isinstance(node, ast.Import):
        edges[name].update(a.name for a in node.names)
      elif isinstance(node, ast.ImportFrom):
        base = node.module or ''
        if node.level:
          anchor = package.rsplit('.', node.level - 1)[0] if node.level > 1 else package
          base = f'{anchor}.{base}' if base else anchor
        for a in node.names:  # `from pkg import module` names the module itself
          full = f'{base}.{a.name}'
          edges[name].add(full if full in modules else base)
  return edges


MODULES = _modules()
EDGES = _imports(MODULES)


def _area(module: str) -> str:
  return module.split('.')[1] if '.' in module else ''


def _internal(edges=EDGES):
  for src, targets in sorted(edges.items()):
    for dst in sorted(targets):
      if dst == 'nvae_jax' or dst.startswith('nvae_jax.'):
        yield src, dst


def configs_violations(edges):
  return [f'{src} imports {dst}' for src, targets in sorted(edges.items()) for dst in targets
          if dst == 'configs' or dst.startswith('configs.')]


def floor_violations(edges):
  bad = []
  for src, dst in _internal(edges):
    a, b = _area(src), _area(dst)
    if dst == 'nvae_jax':
      bad.append(f'{src} imports the nvae_jax package itself')
    elif a != b and not FLOORS[b] < FLOORS[a]:
      bad.append(f'{src} (floor {FLOORS[a]}) imports {dst} (floor {FLOORS[b]})')
  return bad


def model_violations(edges):
  return [f'{src} imports {dst}' for src, dst in _internal(edges)
          if _area(src) == 'models' and _area(dst) in ('data', 'train')]


def inner_violations(edges, package, modules=MODULES):
  """(modules of ``package`` without a floor, imports that do not go down inside it)."""
  floors = INNER_FLOORS[package]
  depth = package.count('.') + 1

  def place(module):
    """The floor of ``module`` in ``package`` (None outside), by its first name below it."""
    if module == package:
      return floors['']
    if not module.startswith(package + '.'):
      return None
    return floors.get(module.split('.')[depth], 'unplaced')

  unplaced = sorted(m for m in modules if place(m) == 'unplaced')
  bad = []
  for src, dst in _internal(edges):
    fs, fd = place(src), place(dst)
    same_child = (src.split('.')[:depth + 1] == dst.split('.')[:depth + 1]
                  and package not in (src, dst))
    if fs is None or fd is None or 'unplaced' in (fs, fd) or same_child:
      continue  # outside the package, or inside one of its subpackages (checked there)
    if not fd < fs:
      bad.append(f'{src} (floor {fs}) imports {dst} (floor {fd})')
  return unplaced, bad


def cycles(edges, modules=MODULES):
  graph = {m: {d for d in edges.get(m, ()) if d in modules and d != m} for m in modules}
  state, stack, found = {}, [], []

  def visit(m):
    state[m] = 'open'
    stack.append(m)
    for d in sorted(graph[m]):
      if state.get(d) == 'open':
        found.append(' -> '.join(stack[stack.index(d):] + [d]))
      elif d not in state:
        visit(d)
    stack.pop()
    state[m] = 'done'

  for m in sorted(graph):
    if m not in state:
      visit(m)
  return found


def test_every_area_has_a_floor():
  areas = {_area(m) for m in MODULES if m != 'nvae_jax'}
  assert areas <= set(FLOORS), f'areas without a floor in FLOORS: {sorted(areas - set(FLOORS))}'


def test_the_library_never_imports_configs():
  assert not configs_violations(EDGES)


def test_imports_go_down_between_areas():
  assert not floor_violations(EDGES)


def test_models_never_import_data_or_train():
  assert not model_violations(EDGES)


@pytest.mark.parametrize('package', sorted(INNER_FLOORS))
def test_imports_go_down_inside_the_wings(package):
  unplaced, bad = inner_violations(EDGES, package)
  assert not unplaced, f'modules without a floor in INNER_FLOORS[{package!r}]: {unplaced}'
  assert not bad, bad


def test_no_import_cycles():
  assert not cycles(EDGES)


def test_the_rules_catch_violations():
  """Each rule fails on a made-up violation, so the tests above can fail."""
  assert configs_violations({'nvae_jax.main': {'configs.quickstart'}})
  assert floor_violations({'nvae_jax.config.validation': {'nvae_jax.train.optim'}})
  assert floor_violations({'nvae_jax.nn.conv': {'nvae_jax.flows.coupling'}})  # same floor
  assert not floor_violations({'nvae_jax.models.glow': {'nvae_jax.flows.coupling'}})
  assert model_violations({'nvae_jax.models.glow': {'nvae_jax.data'}})
  assert inner_violations({'nvae_jax.train.evaluate': {'nvae_jax.train.loop'}},
                          'nvae_jax.train')[1]
  assert inner_violations({'nvae_jax.models.nvae.network': {'nvae_jax.models.nvae.task'}},
                          'nvae_jax.models.nvae')[1]
  assert inner_violations({'nvae_jax.models.glow': {'nvae_jax.models.conv_vae'}},
                          'nvae_jax.models')[1]  # families do not import each other
  assert inner_violations({}, 'nvae_jax.train', {'nvae_jax.train.new_module': ''})[0]
  assert cycles({'nvae_jax.models.base': {'nvae_jax.models'},
                 'nvae_jax.models': {'nvae_jax.models.base'}})
  # Relative and `from package import module` imports resolve to the module they name.
  assert 'nvae_jax.models.nvae.plan' in EDGES['nvae_jax.models.nvae.network']
  assert 'nvae_jax.models.nvae.sampling' in EDGES['nvae_jax.models.nvae.task']
