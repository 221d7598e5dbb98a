"""Sources yield Arrow batches with event time and a resumable position."""
from stream.sources.base import Source, SourceBatch  # noqa: F401
