"""The search-method registry: a method is one module in search/ plus one `@register` line.

A `SearchMethod` scores the control arm's columns on recent rows and allocates them under a
budget; the daemon, `dimstream search`, the CLI choices and the config validation all read
`METHODS`, so a method registered here (or in a test, or a plug-in) is usable everywhere
without editing any other module.

>>> sorted(names())[:2]
['ham', 'sseds']
"""
from __future__ import annotations

from abc import ABC, abstractmethod
from typing import TYPE_CHECKING, ClassVar

if TYPE_CHECKING:
    from dimstream.search.budget import Budget, SearchResult
    from dimstream.search.fieldcheck import FieldCheck
    from dimstream.stream.batch import SparseBatch


class SearchMethod(ABC):
    """One dimension-search method. Per-method knobs are constructor keywords (with defaults).

    name: the registry key (`--search NAME`).
    min_score: the allocation rule's floor for this method's column scores (search/budget.py
        rule 3): HAM's alpha must be > 0; None for saliencies, which are all >= 0.
    """

    name: ClassVar[str]
    min_score: ClassVar[float | None] = None

    @abstractmethod
    def run(self, control, rows: SparseBatch, budget: Budget, *,
            field_check: FieldCheck | None = None) -> SearchResult:
        """Search on `control` (an Arm) with the recent `rows` (most recent last)."""


METHODS: dict[str, type[SearchMethod]] = {}
_BUILTIN = ("dimstream.search.sseds", "dimstream.search.ham")  # modules that register on import


def register(cls: type[SearchMethod]) -> type[SearchMethod]:
    """Class decorator: make `cls` available as `--search cls.name`."""
    METHODS[cls.name] = cls
    return cls


def _load_builtin() -> None:
    import importlib
    for module in _BUILTIN:
        importlib.import_module(module)


def names() -> list[str]:
    """Every registered method's name."""
    _load_builtin()
    return sorted(METHODS)


def get(name: str, **knobs) -> SearchMethod:
    """An instance of method `name` with its knobs; ValueError naming the choices if unknown."""
    _load_builtin()
    if name not in METHODS:
        raise ValueError(f"unknown search method {name!r}: use one of {', '.join(sorted(METHODS))}")
    return METHODS[name](**knobs)
