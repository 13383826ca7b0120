"""pyproject's filterwarnings: a DeprecationWarning raised from the project's code fails."""

import warnings

import pytest


def _warn_from(module_name: str) -> None:
  code = compile("import warnings\nwarnings.warn('old API', DeprecationWarning)", '<probe>', 'exec')
  exec(code, {'__name__': module_name})  # pylint: disable=exec-used


def test_deprecation_warning_from_nvae_jax_is_an_error():
  with pytest.raises(DeprecationWarning, match='old API'):
    _warn_from('nvae_jax.some_module')


def test_deprecation_warning_from_elsewhere_is_only_a_warning():
  with warnings.catch_warnings(record=True) as caught:
    warnings.simplefilter('default')
    _warn_from('some_dependency')
  assert [str(w.message) for w in caught] == ['old API']
