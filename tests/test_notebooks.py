"""The notebooks: each ``notebooks/<name>.py`` (jupytext percent format, the file to edit) is paired
with ``<name>.ipynb`` (same cells, outputs stripped), and runs top to bottom on a fresh kernel with
the small-steps setting, so a notebook that breaks fails CI.

A notebook's own cells assert what it shows (log-dets against dense Jacobians, finite losses and
ELBOs); this test checks that every cell ran without error and that the figure was written.
"""

import glob
import os

import pytest

nbformat = pytest.importorskip('nbformat')
jupytext = pytest.importorskip('jupytext')
nbclient = pytest.importorskip('nbclient')

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
NOTEBOOKS = sorted(os.path.splitext(os.path.basename(p))[0]
                   for p in glob.glob(os.path.join(ROOT, 'notebooks', '*.py')))
# Small enough for CI (2 CPU cores), large enough that every code path runs.
QUICK_STEPS = '30'


def _code_cells(nb):
  return [(c.cell_type, c.source.strip()) for c in nb.cells]


def test_expected_notebooks_exist():
  assert NOTEBOOKS == ['calibrated_decoders', 'invertible_convolutions', 'nvae_tour']


@pytest.mark.parametrize('name', NOTEBOOKS)
def test_ipynb_is_the_pairing_of_the_py_file(name):
  source = jupytext.read(os.path.join(ROOT, 'notebooks', f'{name}.py'))
  stored = nbformat.read(os.path.join(ROOT, 'notebooks', f'{name}.ipynb'), as_version=4)
  assert _code_cells(stored) == _code_cells(source), (
      f'notebooks/{name}.ipynb is out of date: run `jupytext --sync notebooks/{name}.py`')
  outputs = [c for c in stored.cells if c.cell_type == 'code' and (c.outputs or
                                                                   c.execution_count)]
  assert not outputs, f'notebooks/{name}.ipynb: strip the outputs before committing'


@pytest.mark.slow
@pytest.mark.parametrize('name', NOTEBOOKS)
def test_notebook_runs_top_to_bottom(name, tmp_path, monkeypatch):
  monkeypatch.setenv('NVAE_JAX_NOTEBOOK_STEPS', QUICK_STEPS)
  monkeypatch.setenv('NVAE_JAX_NOTEBOOK_FIGURES', str(tmp_path / 'figures'))
  monkeypatch.setenv('NVAE_JAX_NOTEBOOK_WORKDIR', str(tmp_path / 'work'))
  # The kernel imports this checkout, on one CPU device (not the suite's 8 fake ones)
  monkeypatch.setenv('PYTHONPATH', os.pathsep.join(
      [ROOT] + [p for p in os.environ.get('PYTHONPATH', '').split(os.pathsep) if p]))
  # XLA's backend optimisations cost more compile time than 30 steps ever run.
  monkeypatch.setenv('XLA_FLAGS', '--xla_backend_optimization_level=0')
  monkeypatch.setenv('MPLBACKEND', 'agg')
  nb = nbformat.read(os.path.join(ROOT, 'notebooks', f'{name}.ipynb'), as_version=4)
  client = nbclient.NotebookClient(
      nb, timeout=600, kernel_name='python3',
      resources={'metadata': {'path': os.path.join(ROOT, 'notebooks')}})
  client.execute()
  code = [c for c in nb.cells if c.cell_type == 'code']
  assert all(c.execution_count for c in code), 'a cell did not run'
  errors = [o for c in code for o in c.outputs if o.output_type == 'error']
  assert not errors
  figure = tmp_path / 'figures' / f'{name}.png'
  assert figure.exists() and figure.stat().st_size > 10_000
