"""Small builders shared by the tests (real TorchRec, real Arrow; no mocks)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pyarrow as pa

from dimstream.stream.schema import FieldSpec, Schema

REPO = Path(__file__).resolve().parents[1]
ML100K = REPO.parent / "shared" / "data" / "ml-100k"


def tiny_schema() -> Schema:
    return Schema(
        [
            FieldSpec("user", "categorical", 50),
            FieldSpec("item", "categorical", 40),
            FieldSpec("tags", "multi", 20),
            FieldSpec("price", "numeric", 16),
        ]
    )


def tiny_batch(n: int = 64, seed: int = 0, t0: int = 0) -> pa.RecordBatch:
    rng = np.random.default_rng(seed)
    lengths = rng.integers(1, 4, n)
    offsets = np.concatenate([[0], np.cumsum(lengths)]).astype(np.int32)
    return pa.record_batch(
        {
            "user": pa.array(rng.integers(0, 30, n)),
            "item": pa.array(rng.integers(0, 25, n).astype(str)),
            "tags": pa.ListArray.from_arrays(pa.array(offsets), pa.array(rng.integers(0, 9, offsets[-1]))),
            "price": pa.array(rng.lognormal(1, 1, n)),
            "label": pa.array((rng.random(n) < 0.3).astype(np.int8)),
            "event_time": pa.array(t0 + np.sort(rng.integers(0, 3600, n))),
        }
    )


def kafka_run_config(source, state, windows, **kw):
    """The Kafka tests' daemon: one-day windows (`window_seconds` overrides), control only
    unless `arms` says otherwise, FM, seed 0, a free metrics port, no progress bars."""
    from dimstream.models.config import ModelConfig
    from dimstream.ops.config import RunConfig

    return RunConfig(
        source=source,
        window_seconds=kw.pop("window_seconds", 86400),
        windows=windows,
        state_dir=state,
        seed=0,
        metrics_addr="127.0.0.1:0",
        progress=False,
        model=ModelConfig("fm"),
        **({"arms": ("control",)} | kw),
    )
