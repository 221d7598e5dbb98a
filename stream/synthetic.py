"""A synthetic click stream whose truth is known: the embedded default of `dimstream run`.

Field i carries signal through a latent factor of rank r_i (r_i = 0: pure noise). Labels come
from a hidden logistic model: a base CTR of a few percent, first-order effects, and pairwise
interactions <P_i u_i, P_j u_j> between signal fields, where u_i has rank r_i, so a field of
higher rank needs more embedding columns. A mild drift moves the base rate and the
interaction strength across windows. Every row's true click probability is known, so each
window's Bayes-optimal AUC can be reported.

Deterministic for a seed: window w is generated from the RNG seeded by (seed, w), so reading can
restart at any row without replaying earlier windows.

Id churn (`churn={field: share}`, categorical fields): each window from the second on, that
share of the field's popularity slots retires its id and a new id takes the slot, with a
latent factor of its own (another slot's factor, drawn deterministically): old ids go quiet,
new ones must be learned. Slot k in its g-th generation emits id k + cardinality * g, so every
id ever emitted is distinct and the truth stays known (`truth()`, `p_true`).

>>> churned = SyntheticSource(seed=1, rows_per_window=500, churn={"user_id": 0.5})
>>> a = set(churned.window_table(0).column("user_id").to_pylist())
>>> b = set(churned.window_table(3).column("user_id").to_pylist())
>>> len(a - b) > 0 and len(b - a) > 0 and max(b) >= 100_000
True

>>> src = SyntheticSource(seed=1, rows_per_window=1000)
>>> sb = next(iter(src.read(None)))
>>> sb.batch.num_rows, sb.position, sb.next_position
(1000, {'row': 0}, {'row': 1000})
"""

from __future__ import annotations

import time
import zlib
from collections.abc import Iterator
from dataclasses import dataclass

import numpy as np
import pyarrow as pa

from dimstream.stream.schema import FieldSpec, Schema
from dimstream.stream.sources.base import Source, SourceBatch, SourceOptions, row_position

T0 = 1767225600  # 2026-01-01T00:00:00Z, event time of the first row
TRUTH_COLUMN = "p_true"


@dataclass(frozen=True)
class SyntheticField:
    name: str
    cardinality: int  # distinct ids (for numeric: ignored)
    rank: int  # latent rank carrying signal; 0 = pure noise
    kind: str = "categorical"
    zipf: float = 1.5  # steep enough that the ids carrying most traffic are learnable in hours
    string_ids: bool = False


# 18 signal fields with ranks 1..16, 5 pure-noise fields (rank 0), 3 numeric (one noise),
# cardinalities 2 .. 100,000, one multi-valued field.
DEFAULT_FIELDS = (
    # high-cardinality ids carry low-rank signal: their tails are seen too rarely to learn more
    SyntheticField("user_id", 100_000, 3),
    SyntheticField("item_id", 50_000, 4),
    SyntheticField("ad_campaign", 20_000, 2),
    SyntheticField("advertiser", 8_000, 6),
    SyntheticField("site", 5_000, 5, string_ids=True),
    SyntheticField("device_model", 3_000, 8),
    SyntheticField("app", 2_000, 10),
    SyntheticField("city", 1_000, 6),
    SyntheticField("brand", 500, 14),
    SyntheticField("category", 300, 16),
    SyntheticField("tags", 200, 12, kind="multi"),
    SyntheticField("slot_size", 30, 2),
    SyntheticField("hour_of_day", 24, 2, zipf=0.0),
    SyntheticField("os", 20, 2),
    SyntheticField("ad_position", 10, 4),
    SyntheticField("age_group", 8, 3, zipf=0.3),
    SyntheticField("weekday", 7, 1, zipf=0.0),
    SyntheticField("gender", 2, 1, zipf=0.0),
    SyntheticField("noise_session", 100_000, 0),
    SyntheticField("noise_request", 20_000, 0),
    SyntheticField("noise_cookie", 5_000, 0),
    SyntheticField("noise_color", 50, 0),
    SyntheticField("noise_flag", 2, 0, zipf=0.0),
    SyntheticField("num_price", 0, 1, kind="numeric"),
    SyntheticField("num_history", 0, 1, kind="numeric"),
    SyntheticField("num_random", 0, 0, kind="numeric"),
)
NUMERIC_BUCKETS = 64
# expected occurrences per 50k rows below which an id's factor shrinks: signal lives on ids
# seen often enough to learn in a few windows, so a model can get close to the Bayes AUC
# (tests/test_synthetic.py::test_deepfm_progressive_auc_is_within_003_of_bayes_over_windows_13_to_24);
# a much lower threshold leaves most of the signal on rare ids no model learns in time
RARE_COUNT = 5000
# norm of a field's first-order weights relative to its latent factor: small, so that a field's
# signal lives mostly in its rank-r_i interactions and its importance grows with r_i
# (tests/test_synthetic.py::test_a_fields_true_importance_follows_its_rank); with unit
# first-order weights rank-1 fields of few ids dominated and no search could find the ranks
FIRST_ORDER = 0.25


def _rows_for(f: SyntheticField) -> int:
    """Hash buckets: twice the cardinality (few collisions), at most 200,000."""
    if f.kind == "numeric":
        return NUMERIC_BUCKETS
    return int(min(max(2 * f.cardinality, 4), 200_000))


def default_schema(fields=DEFAULT_FIELDS) -> Schema:
    return Schema([FieldSpec(f.name, f.kind, _rows_for(f)) for f in fields])


class _HiddenModel:
    """A hidden field-aware FM: v_i = P_i u_i[id] in R^K, with u_i of rank r_i.

    P_i (K x r_i, orthonormal columns) places field i's latent factors in an r_i-dim subspace
    of a shared K-dim space, so the logit b + sum_i w_i^T u_i + sum_{i<j} <v_i, v_j> needs r_i
    embedding columns for field i: exactly what a mixed-dimension FM with per-field projections
    (SSEDS eq. 13) can represent. Rank-0 fields contribute nothing (pure noise)."""

    def __init__(self, fields, seed: int, base_ctr: float, logit_std: float):
        # logit = b + sum_i FIRST_ORDER * w_i^T u_i + sum_{i<j} <P_i u_i, P_j u_j> / sqrt(#signal fields)
        rng = np.random.default_rng([seed, 7919])
        self.fields = fields
        self.K = max(f.rank for f in fields)
        self.latent, self.proj, self.raw, self.shrink = {}, {}, {}, {}
        for f in fields:
            if f.rank > 0 and f.kind != "numeric":
                u = rng.standard_normal((max(f.cardinality, 1), f.rank)).astype(np.float32)
                # rare ids stay near the field's mean: an id seen fewer than ~RARE_COUNT times a
                # window has its factor shrunk, so the signal lives where there is data to learn it
                self.latent[f.name] = u * self._shrink(f)[:, None]
                self.raw[f.name], self.shrink[f.name] = u, self._shrink(f)
                q, _ = np.linalg.qr(rng.standard_normal((self.K, f.rank)))
                self.proj[f.name] = q.astype(np.float32)
        # first-order weights of norm ~FIRST_ORDER: a field's first-order variance grows with
        # its rank instead of being ~1 for every field (which let rank-1 fields dominate)
        self.first = {
            f.name: FIRST_ORDER * rng.standard_normal(f.rank).astype(np.float32) for f in fields if f.rank > 0
        }
        self.base_logit = float(np.log(base_ctr / (1 - base_ctr)))
        self.scale = 1.0
        self.logit_std = logit_std

    @staticmethod
    def _shrink(f) -> np.ndarray:
        w = np.arange(1, f.cardinality + 1, dtype=np.float64) ** -f.zipf
        expected = 50_000 * w / w.sum()
        return np.minimum(1.0, expected / RARE_COUNT).astype(np.float32)

    def logit(self, ids: dict, numeric: dict, window: int, factors: dict | None = None) -> np.ndarray:
        """`factors[field]`: per row, the slot whose factor the row's (churned) id has."""
        factors = factors or {}
        n = len(next(iter(ids.values())))
        z = np.zeros(n, np.float32)
        total = np.zeros((n, self.K), np.float32)
        squares = np.zeros(n, np.float32)
        for f in self.fields:
            if f.rank == 0:
                continue
            if f.kind == "numeric":
                z += self.first[f.name][0] * (np.log1p(numeric[f.name]) - 2.0)
                continue
            if f.kind == "multi":
                flat, offs = ids[f.name]
                u = np.add.reduceat(self.latent[f.name][flat], offs[:-1], axis=0) / np.diff(offs)[:, None]
            elif f.name in factors:  # a churned id: its own factor, its slot's popularity shrink
                u = self.raw[f.name][factors[f.name]] * self.shrink[f.name][ids[f.name]][:, None]
            else:
                u = self.latent[f.name][ids[f.name]]
            z += u @ self.first[f.name]
            v = u @ self.proj[f.name].T
            total += v
            squares += np.einsum("ij,ij->i", v, v)
        pairwise = 0.5 * (np.einsum("ij,ij->i", total, total) - squares)  # sum_{i<j} <v_i, v_j>
        drift = 1.0 + 0.1 * np.sin(2 * np.pi * window / 24)
        return z + drift * pairwise / np.sqrt(len(self.latent))


class SyntheticSource(Source):
    """The embedded default source (see module docstring)."""

    name = "synthetic"

    def __init__(
        self,
        seed: int = 0,
        rows_per_window: int = 50_000,
        window_seconds: int = 3600,
        batch_rows: int = 10_000,
        base_ctr: float = 0.05,
        fields=DEFAULT_FIELDS,
        max_windows: int | None = None,
        churn: dict[str, float] | None = None,
    ):
        self.seed = seed
        self.churn = self._check_churn(dict(churn or {}), fields)
        self.rows_per_window = int(rows_per_window)
        self.window_seconds = int(window_seconds)
        self.default_window_seconds = self.window_seconds
        self.batch_rows = int(batch_rows)
        self.fields = tuple(fields)
        self.schema = default_schema(self.fields)
        self.max_windows = max_windows
        self._hidden = _HiddenModel(self.fields, seed, base_ctr, logit_std=1.4)
        self._cdf = {f.name: self._zipf_cdf(f) for f in self.fields if f.kind != "numeric"}
        self._calibrate()
        self._cache: tuple[int, pa.Table] | None = None
        self.generate_seconds = 0.0  # time spent generating rows (benchmarks subtract it)

    @classmethod
    def from_spec(cls, arg: str, options: SourceOptions) -> SyntheticSource:
        """`--source synthetic`: the run's seed, rows per window and window length (1 h unless set)."""
        if arg:
            raise ValueError(f"synthetic takes no argument (got {arg!r})")
        return cls(
            seed=options.seed, rows_per_window=options.rows_per_window, window_seconds=options.window_seconds or 3600
        )

    @property
    def field_rank(self) -> dict[str, int]:
        return {f.name: f.rank for f in self.fields}

    def truth(self) -> dict:
        """The rank of every field's signal (0: noise), which a search should recover, and the
        share of each churned field's ids replaced per window."""
        return {"field_rank": self.field_rank} | ({"churn": dict(self.churn)} if self.churn else {})

    @staticmethod
    def _check_churn(churn: dict, fields) -> dict:
        kinds = {f.name: f.kind for f in fields}
        for name, share in churn.items():
            if kinds.get(name) != "categorical":
                raise ValueError(f"churn applies to categorical fields; {name!r} is {kinds.get(name, 'not a field')}")
            if not 0.0 <= float(share) <= 1.0:
                raise ValueError(f"churn share of {name!r} must be in [0, 1], got {share!r}")
        return {k: float(v) for k, v in churn.items()}

    def generation(self, name: str, window: int) -> np.ndarray:
        """Per popularity slot of churned field `name`, how many times its id was replaced up to
        `window` (window 0: none). The loop runs over windows, vectorised over slots."""
        f = next(x for x in self.fields if x.name == name)
        gen = np.zeros(f.cardinality, np.int64)
        for w in range(1, window + 1):
            gen += (
                np.random.default_rng([self.seed, zlib.crc32(name.encode()), w]).random(f.cardinality)
                < self.churn[name]
            )
        return gen

    def _apply_churn(self, ids: dict, window: int) -> tuple[dict, dict]:
        """(ids the rows emit, the slot whose latent factor each churned row's id has)."""
        emitted, factors = dict(ids), {}
        for f in self.fields:
            if f.name in self.churn:
                slots = ids[f.name]
                g = self.generation(f.name, window)[slots]
                emitted[f.name] = slots + f.cardinality * g
                factors[f.name] = (slots + g * 7919) % f.cardinality  # a prime stride: another slot's factor
        return emitted, factors

    @staticmethod
    def _zipf_cdf(f: SyntheticField) -> np.ndarray:
        w = np.arange(1, f.cardinality + 1, dtype=np.float64) ** -f.zipf
        return np.cumsum(w / w.sum())

    def _calibrate(self):
        """Scale the hidden logits to the target spread and set the intercept for the base CTR."""
        ids, numeric, _ = self._draw(np.random.default_rng([self.seed, 104729]), 20_000)
        z = self._hidden.logit(ids, numeric, 0)
        self._hidden.scale = self._hidden.logit_std / float(z.std() + 1e-9)
        zs = z * self._hidden.scale
        # intercept so that the mean probability equals the base CTR (bisection, vectorised)
        lo, hi = -12.0, 4.0
        target = 1 / (1 + np.exp(-self._hidden.base_logit))
        for _ in range(50):
            mid = (lo + hi) / 2
            if (1 / (1 + np.exp(-(zs + mid)))).mean() > target:
                hi = mid
            else:
                lo = mid
        self._intercept = (lo + hi) / 2

    def _draw(self, rng, n: int):
        ids, numeric, multi_flat = {}, {}, {}
        for f in self.fields:
            if f.kind == "numeric":
                numeric[f.name] = rng.lognormal(mean=2.0, sigma=1.5, size=n)
            elif f.kind == "multi":
                lengths = rng.integers(1, 5, size=n)
                flat = np.searchsorted(self._cdf[f.name], rng.random(lengths.sum()))
                offs = np.zeros(n + 1, np.int64)
                np.cumsum(lengths, out=offs[1:])
                ids[f.name] = (np.minimum(flat, f.cardinality - 1), offs)
            else:
                ids[f.name] = np.minimum(np.searchsorted(self._cdf[f.name], rng.random(n)), f.cardinality - 1)
        return ids, numeric, multi_flat

    def window_table(self, window: int) -> pa.Table:
        """All rows of window `window` (cached: batches of a window are slices of it)."""
        if self._cache is not None and self._cache[0] == window:
            return self._cache[1]
        t0 = time.perf_counter()
        rng = np.random.default_rng([self.seed, window])
        n = self.rows_per_window
        ids, numeric, _ = self._draw(rng, n)
        emitted, factors = self._apply_churn(ids, window) if self.churn else (ids, None)
        z = self._hidden.logit(ids, numeric, window, factors) * self._hidden.scale + self._intercept
        z += 0.15 * np.sin(2 * np.pi * window / 24)  # drift of the base rate
        p = 1 / (1 + np.exp(-z))
        label = (rng.random(n) < p).astype(np.int8)
        t = T0 + window * self.window_seconds + np.sort(rng.integers(0, self.window_seconds, n))
        cols = {}
        for f in self.fields:
            if f.kind == "numeric":
                x = numeric[f.name]
                cols[f.name] = pa.array(np.where(rng.random(n) < 0.02, np.nan, x), mask=None)
            elif f.kind == "multi":
                flat, offs = ids[f.name]
                cols[f.name] = pa.ListArray.from_arrays(pa.array(offs.astype(np.int32)), pa.array(flat))
            elif f.string_ids:
                cols[f.name] = pa.array(emitted[f.name]).cast(pa.string())
            else:
                cols[f.name] = pa.array(emitted[f.name])
        cols["label"] = pa.array(label)
        cols["event_time"] = pa.array(t.astype(np.int64))
        cols[TRUTH_COLUMN] = pa.array(p.astype(np.float32))
        table = pa.table(cols)
        self._cache = (window, table)
        self.generate_seconds += time.perf_counter() - t0
        return table

    def read(self, position: dict | None) -> Iterator[SourceBatch]:
        row = int(position["row"]) if position else 0
        while self.max_windows is None or row < self.max_windows * self.rows_per_window:
            w, off = divmod(row, self.rows_per_window)
            stop = min(off + self.batch_rows, self.rows_per_window)
            batch = self.window_table(w).slice(off, stop - off).combine_chunks().to_batches()[0]
            nxt = w * self.rows_per_window + stop
            yield SourceBatch(batch, row_position(row), row_position(nxt))
            row = nxt

    def close(self) -> None:
        self._cache = None
