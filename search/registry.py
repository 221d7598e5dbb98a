"""The search-method registry: a method is one module in search/ plus one `@register` line.

A `SearchMethod` scores the control arm's columns on recent rows and allocates them under a
budget (search/budget.py `make_result` does the allocation and builds the result); the daemon,
`dimstream search`, the CLI choices and the config validation all read `METHODS`, so a method
registered here (or in a test, or a plug-in) is usable everywhere without editing any other
module.

Knobs are constructor keywords with defaults. One is conventional: `rows`, how many of the
most recent rows to search on; the daemon (--search-rows) and `dimstream search` (--rows)
offer it, and `build` passes it only to a method whose constructor names it.

>>> {"sseds", "ham", "autosrh"} <= set(names())
True
>>> build("sseds", rows=100).rows, "rows" in knobs("ham"), default_name()
(100, False, 'sseds')
"""

from __future__ import annotations

import inspect
from abc import ABC, abstractmethod
from typing import TYPE_CHECKING, ClassVar

if TYPE_CHECKING:
    from dimstream.search.budget import Budget, SearchResult
    from dimstream.search.fieldcheck import FieldCheck
    from dimstream.stream.batch import SparseBatch


class SearchMethod(ABC):
    """One dimension-search method. Per-method knobs are constructor keywords (with defaults).

    name: the registry key (`--search NAME`).
    default: True for the one method `dimstream search` runs without --method.
    min_score: the allocation rule's floor for this method's column scores (search/budget.py
        rule 3): HAM's alpha must be > 0; None for saliencies, which are all >= 0. The daemon's
        moving-average allocation (search/policy.py) applies the same floor.
    min_rows: the fewest rows `run` takes (methods that hold rows out for their masks: 2, one
        to train on and one held out); `unfit` says why rows cannot be searched on.
    """

    name: ClassVar[str]
    min_score: ClassVar[float | None] = None
    min_rows: ClassVar[int] = 1
    default: ClassVar[bool] = False  # the method `dimstream search` runs when none is named

    @classmethod
    def knobs(cls) -> set[str]:
        """The keywords the constructor takes (a method forwarding **knobs lists those too)."""
        params = inspect.signature(cls.__init__).parameters.values()
        return {p.name for p in params if p.name != "self" and p.kind is not p.VAR_KEYWORD}

    def unfit(self, rows: SparseBatch) -> str | None:
        """Why `run` cannot search on `rows` (most recent last), or None. By default: fewer than
        `min_rows` of them; a method whose score is undefined on some rows says so too. The
        daemon owes a due search on unfit rows to the next window that is fit (a day of a small
        table may hold 1 row); `dimstream search` exits 2 with the reason."""
        if len(rows) < self.min_rows:
            return f"{len(rows)} rows, {self.name} needs at least {self.min_rows}"
        return None

    @abstractmethod
    def run(self, control, rows: SparseBatch, budget: Budget, *, field_check: FieldCheck | None = None) -> SearchResult:
        """Search on `control` (an Arm) with the recent `rows` (most recent last)."""


METHODS: dict[str, type[SearchMethod]] = {}
# modules that register on import
_BUILTIN = ("dimstream.search.sseds", "dimstream.search.ham", "dimstream.search.autosrh", "dimstream.search.adass")


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


def lookup(name: str) -> type[SearchMethod]:
    """The class registered as `name`; ValueError naming the choices if unknown."""
    _load_builtin()
    if name not in METHODS:
        raise ValueError(f"unknown search method {name!r}: use one of {', '.join(sorted(METHODS))}")
    return METHODS[name]


def default_name() -> str:
    """The method marked `default`."""
    _load_builtin()
    return next(n for n, cls in sorted(METHODS.items()) if cls.default)


def knobs(name: str) -> set[str]:
    """The knobs method `name` takes."""
    return lookup(name).knobs()


def get(name: str, **knobs) -> SearchMethod:
    """An instance of method `name` with exactly these knobs (TypeError for one it lacks)."""
    return lookup(name)(**knobs)


def build(name: str, **offered) -> SearchMethod:
    """An instance of method `name` given those of the `offered` knobs it takes (e.g. rows);
    the others are ignored, so a caller can offer its settings to every method alike."""
    cls = lookup(name)
    return cls(**{k: v for k, v in offered.items() if k in cls.knobs()})
