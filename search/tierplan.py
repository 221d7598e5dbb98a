"""AutoSrh's (field, tier) allocation in a plan (search/plan.py's optional "tiers").

A plan written by `dimstream search --method autosrh --tiers L` carries, beside the field-level
dims the policy's gate compares, what the slim arm is built from (search/autosrh.py
`tiered_allocation`): per field the tiers' widths, kept columns and rows, the params, and the
ids' tiers `tier_of`. A tier map holds one entry per table row (10^5 for the synthetic
user_id), so it travels as base64 of its zlib-compressed uint8 bytes, not as a JSON list:
the tier of an id is at most 255 and mostly repeats, a few bytes per hundred rows.

>>> t = {"dims": {"a": [4, 0]}, "kept_columns": {"a": [[0, 1, 2, 5], []]}, "rows": {"a": [2, 3]},
...      "params": 8, "tier_of": {"a": np.array([0, 1, 1, 0, 1])}}
>>> back = decode_tiers(encode_tiers(t))
>>> back["tier_of"]["a"].tolist(), back["rows"]
([0, 1, 1, 0, 1], {'a': [2, 3]})
>>> validate_tiers(encode_tiers(t), {"a": 5}, {"a": 8}, kappa=0.25)
>>> validate_tiers(encode_tiers(t) | {"rows": {"a": [1, 4]}}, {"a": 5}, {"a": 8}, kappa=0.25)
Traceback (most recent call last):
...
ValueError: field a: the tier map puts [2, 3] ids in the tiers, the plan says [1, 4] rows
"""

from __future__ import annotations

import base64
import math
import zlib

import numpy as np

from dimstream.search.budget import QUANTUM

KEYS = ("dims", "kept_columns", "rows", "params", "tier_of")


def encode_tiers(tiers: dict | None) -> dict | None:
    """The JSON form of a `tiered_allocation` (with its tier_of) for a plan; None stays None."""
    if not tiers:
        return None
    out = {k: tiers[k] for k in KEYS if k != "tier_of"}
    out["params"] = int(out["params"])
    out["tier_of"] = {f: _pack(t) for f, t in tiers["tier_of"].items()}
    return out


def decode_tiers(tiers: dict | None) -> dict | None:
    """The inverse of `encode_tiers` (ValueError for a tier map that does not decode)."""
    if not tiers:
        return None
    return {k: tiers[k] for k in KEYS if k != "tier_of"} | {
        "tier_of": {f: _unpack(s) for f, s in tiers["tier_of"].items()}
    }


def _pack(tier_of) -> str:
    t = np.asarray(tier_of)
    if len(t) and (t.min() < 0 or t.max() > 255):
        raise ValueError("a tier map holds tiers 0..255")
    return base64.b64encode(zlib.compress(t.astype(np.uint8).tobytes(), 6)).decode("ascii")


def _unpack(text: str) -> np.ndarray:
    try:
        raw = zlib.decompress(base64.b64decode(text.encode("ascii"), validate=True))
    except (ValueError, zlib.error, AttributeError) as e:
        raise ValueError(f"a tier map that does not decode: {e}") from None
    return np.frombuffer(raw, np.uint8).astype(np.int64)


def validate_tiers(tiers: dict, num_embeddings: dict[str, int], control_dims: dict[str, int], kappa: float) -> None:
    """ValueError unless the plan's tiers can build a slim arm here: every tier width a multiple
    of 4 with as many distinct kept control columns, a tier map of every row of the field whose
    tiers hold the plan's rows, and sum over tables of rows x width <= kappa x control."""
    if not isinstance(tiers, dict) or set(KEYS) - set(tiers):
        raise ValueError(f"tiers must be an object with {', '.join(KEYS)}")
    t = decode_tiers(tiers)
    used = 0
    for f, widths in t["dims"].items():
        if f not in num_embeddings:
            raise ValueError(f"no field {f} in the schema")
        cols, rows = t["kept_columns"].get(f, []), t["rows"].get(f, [])
        if not len(widths) == len(cols) == len(rows):
            raise ValueError(f"field {f}: {len(widths)} tier widths, {len(cols)} kept-column lists, {len(rows)} rows")
        for d, c in zip(widths, cols):
            if d < 0 or d % QUANTUM or len(c) != d or len(set(c)) != d or any(not 0 <= j < control_dims[f] for j in c):
                raise ValueError(f"field {f}: a tier of width {d} keeps columns {c} (control width {control_dims[f]})")
        tier_of = t["tier_of"].get(f)
        if tier_of is None or len(tier_of) != num_embeddings[f]:
            raise ValueError(f"field {f}: the tier map must give every one of its {num_embeddings[f]} rows a tier")
        per_tier = np.bincount(tier_of, minlength=len(rows)).tolist()
        if per_tier != list(rows):
            raise ValueError(f"field {f}: the tier map puts {per_tier} ids in the tiers, the plan says {rows} rows")
        used += sum(n * d for n, d in zip(rows, widths))
    limit = math.floor(kappa * sum(num_embeddings[f] * d for f, d in control_dims.items() if d > 0))
    if used > limit:
        raise ValueError(f"the tiers hold {used:,} embedding parameters > kappa {kappa} x control = {limit:,}")
