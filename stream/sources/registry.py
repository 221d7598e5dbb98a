"""`--source` specs to Source objects."""
from __future__ import annotations

from pathlib import Path


def open_source(spec: str, *, schema_config: dict | None = None, seed: int = 0, kafka: dict | None = None, **kw):
    """synthetic | files:DIR | ml-100k:DIR | criteo:FILE | avazu:FILE | kafka://HOST:PORT/TOPIC[?group=G]"""
    if spec == "synthetic":
        from dimstream.stream.synthetic import SyntheticSource
        return SyntheticSource(seed=seed, **kw)
    if spec.startswith("kafka://"):
        from dimstream.stream.sources.kafka import KafkaSource
        # security (SASL, SSL) and other kafka-python options pass through from the TOML [kafka] table
        return KafkaSource.from_url(spec, schema_config=schema_config, security=kafka or None)
    kind, sep, arg = spec.partition(":")
    if not sep or not arg:
        raise ValueError(f"unknown source {spec!r}: use synthetic, files:DIR, ml-100k:DIR, criteo:FILE, "
                         "avazu:FILE or kafka://HOST:PORT/TOPIC")
    path = Path(arg)
    if kind in ("criteo", "avazu") and not path.is_file():
        raise ValueError(f"{path} is not a file")
    if kind in ("files", "ml-100k") and not path.is_dir():
        raise ValueError(f"{path} is not a directory")
    if kind == "files":
        from dimstream.stream.sources.files import FilesSource, schema_from_config
        return FilesSource(path, schema_from_config(schema_config))
    if kind == "ml-100k":
        from dimstream.stream.sources.movielens import MovieLensSource
        return MovieLensSource(path)
    if kind == "criteo":
        from dimstream.stream.sources.criteo import CriteoSource
        return CriteoSource(path)
    if kind == "avazu":
        from dimstream.stream.sources.avazu import AvazuSource
        return AvazuSource(path)
    raise ValueError(f"unknown source kind {kind!r} in {spec!r}")
