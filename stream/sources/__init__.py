"""Sources yield Arrow batches with event time and a resumable position."""
from dimstream.stream.sources.base import Source, SourceBatch  # noqa: F401
