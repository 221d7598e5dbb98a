"""Sources yield Arrow batches with event time and a resumable position (contracts: base.py)."""

from dimstream.stream.sources.base import LiveSource, Source, SourceBatch, SourceOptions, SourceStatus  # noqa: F401
