"""`--source` specs to Source objects: a mapping from a kind to the class that opens it.

A spec is `KIND` (synthetic), `KIND:ARG` (files:DIR, ml-100k:DIR, criteo:FILE, avazu:FILE,
clothing:PATH) or `KIND://...` (kafka://HOST:PORT/TOPIC[?group=G]: the class gets the whole
URL). `SOURCES` maps each kind to "module:Class", imported only when that kind is opened (so
kafka-python is not imported for a file run); the class's `from_spec(arg, options)` builds the
source. A new source is one file plus one entry here, or, for a plug-in, one `register_source`
call.

>>> src = open_source("synthetic", SourceOptions(seed=3, rows_per_window=1000))
>>> type(src).__name__, src.rows_per_window, src.window_seconds
('SyntheticSource', 1000, 3600)
>>> open_source("parquet:/x")
Traceback (most recent call last):
...
ValueError: unknown source kind 'parquet' in 'parquet:/x': the kinds are avazu, clothing, criteo, files,
kafka, ml-100k, synthetic
"""

from __future__ import annotations

import importlib
import re
from pathlib import Path

from dimstream.stream.sources.base import Source, SourceOptions

__all__ = ["SOURCES", "SourceOptions", "open_source", "parse_spec", "path_arg", "register_source", "source_class"]

# kind -> "module:Class" (imported lazily), or a Source subclass registered by a plug-in
SOURCES: dict[str, str | type[Source]] = {
    "synthetic": "dimstream.stream.synthetic:SyntheticSource",
    "files": "dimstream.stream.sources.files:FilesSource",
    "ml-100k": "dimstream.stream.sources.movielens:MovieLensSource",
    "criteo": "dimstream.stream.sources.criteo:CriteoSource",
    "avazu": "dimstream.stream.sources.avazu:AvazuSource",
    "clothing": "dimstream.stream.sources.clothing:ClothingSource",
    "kafka": "dimstream.stream.sources.kafka:KafkaSource",
}
_KIND = re.compile(r"[a-z0-9][a-z0-9_.+-]*")  # no ":" or "/": those end a kind in a spec
_TARGET = re.compile(r"[A-Za-z_][\w.]*:[A-Za-z_]\w*")


def parse_spec(spec: str) -> tuple[str, str]:
    """(kind, arg) of a spec.

    >>> parse_spec("files:/data/x"), parse_spec("synthetic"), parse_spec("kafka://h:9092/t")
    (('files', '/data/x'), ('synthetic', ''), ('kafka', 'kafka://h:9092/t'))
    """
    kind, sep, rest = spec.partition(":")
    return (kind, spec) if sep and rest.startswith("//") else (kind, rest)


def register_source(kind: str, target: str | type[Source], *, replace: bool = False) -> None:
    """Make `open_source` open `kind` specs with `target`: "module:Class" (imported when first
    opened) or a Source subclass. Registering another target for a known kind needs `replace`."""
    if not _KIND.fullmatch(kind):
        raise ValueError(f"bad source kind {kind!r}: lower-case letters, digits and _.+- only")
    if isinstance(target, str):
        if not _TARGET.fullmatch(target):
            raise ValueError(f"bad source target {target!r}: use 'module:Class'")
    elif not (isinstance(target, type) and issubclass(target, Source)):
        raise TypeError(f"source {kind!r}: {target!r} is neither 'module:Class' nor a Source subclass")
    if SOURCES.get(kind, target) != target and not replace:
        raise ValueError(f"source kind {kind!r} is already registered ({SOURCES[kind]}); pass replace=True")
    SOURCES[kind] = target


def source_class(kind: str, spec: str = "") -> type[Source]:
    """The class registered for `kind` (imported now if it was registered by name)."""
    if kind not in SOURCES:
        where = f" in {spec!r}" if spec else ""
        raise ValueError(f"unknown source kind {kind!r}{where}: the kinds are {', '.join(sorted(SOURCES))}")
    target = SOURCES[kind]
    if isinstance(target, str):
        module, _, name = target.partition(":")
        target = getattr(importlib.import_module(module), name, None)
        if not (isinstance(target, type) and issubclass(target, Source)):
            raise TypeError(f"source {kind!r}: {SOURCES[kind]} is not a Source subclass")
    return target


def open_source(spec: str, options: SourceOptions | None = None) -> Source:
    """The source `spec` names; ValueError (one line) for an unknown kind or a bad argument."""
    kind, arg = parse_spec(spec)
    return source_class(kind, spec).from_spec(arg, options or SourceOptions())


def path_arg(arg: str, usage: str, *, directory: bool) -> Path:
    """The existing file (or directory) a spec's argument names, else ValueError."""
    if not arg:
        raise ValueError(f"{usage} needs a {'directory' if directory else 'file'}")
    path = Path(arg)
    if directory and not path.is_dir():
        raise ValueError(f"{path} is not a directory")
    if not directory and not path.is_file():
        raise ValueError(f"{path} is not a file")
    return path
