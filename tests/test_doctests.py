"""Every docstring example of the package runs and gives what it shows (doctest over every
module of `dimstream`, imported by its package name)."""

import doctest
import importlib
import pkgutil

import pytest

SUBPACKAGES = ("dimstream.stream", "dimstream.models", "dimstream.search", "dimstream.ops")


def _modules() -> list[str]:
    # walked per sub-package: `dimstream` itself is a namespace package (no __init__.py at the
    # repository root), whose __path__ an editable install leaves empty
    names = []
    for sub in SUBPACKAGES:
        pkg = importlib.import_module(sub)
        names += [sub] + [m.name for m in pkgutil.walk_packages(pkg.__path__, sub + ".")]
    return sorted(names)


def test_the_package_has_modules_with_examples():
    finder = doctest.DocTestFinder()
    with_examples = [n for n in _modules() if any(t.examples for t in finder.find(importlib.import_module(n)))]
    assert len(_modules()) >= 40 and len(with_examples) >= 10, with_examples


@pytest.mark.parametrize("name", _modules())
def test_docstring_examples(name):
    module = importlib.import_module(name)
    result = doctest.testmod(module, optionflags=doctest.ELLIPSIS | doctest.NORMALIZE_WHITESPACE, verbose=False)
    assert result.failed == 0, f"{name}: {result.failed} of {result.attempted} examples failed (run doctest -v)"
