"""Field schema: what each Arrow column is and how many embedding rows it hashes into.

>>> s = Schema(fields=[FieldSpec("user", "categorical", 1000), FieldSpec("price", "numeric", 64)])
>>> s.feature_names
['user', 'price']
>>> Schema.from_dict(s.to_dict()) == s
True
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import asdict, dataclass

KINDS = ("categorical", "multi", "numeric")


class SchemaError(ValueError):
    """A schema (or a config declaring one) is invalid."""


@dataclass(frozen=True)
class FieldSpec:
    """One sparse feature.

    name: the feature name (TorchRec key) and, unless `column` is set, the Arrow column.
    kind: "categorical" (one int or string id per row), "multi" (a list of ids per row),
          or "numeric" (a number, bucketised into an id by `numeric_transform`).
    num_embeddings: hash buckets, i.e. embedding rows of this field's table.
    """

    name: str
    kind: str
    num_embeddings: int
    column: str | None = None
    # numeric only: "log2" is the Criteo-winner transform int(log(x)^2) for x > 2 (else int(x))
    numeric_transform: str = "log2"

    def __post_init__(self):
        if self.kind not in KINDS:
            raise SchemaError(f"field {self.name!r}: kind must be one of {KINDS}, got {self.kind!r}")
        if int(self.num_embeddings) < 1:
            raise SchemaError(f"field {self.name!r}: num_embeddings must be >= 1")
        if self.numeric_transform not in ("log2", "identity"):
            raise SchemaError(f"field {self.name!r}: numeric_transform must be log2 or identity")

    @property
    def source_column(self) -> str:
        return self.column or self.name


@dataclass(frozen=True)
class Schema:
    fields: list[FieldSpec]
    label: str = "label"
    event_time: str = "event_time"  # unix seconds (int or float or timestamp)

    def __post_init__(self):
        names = [f.name for f in self.fields]
        if not names:
            raise SchemaError("schema has no fields")
        if len(set(names)) != len(names):
            raise SchemaError(f"duplicate field names in schema: {names}")

    @property
    def feature_names(self) -> list[str]:
        return [f.name for f in self.fields]

    @property
    def multi_valued(self) -> set[str]:
        """Fields with a list of ids per row (pooled by mean)."""
        return {f.name for f in self.fields if f.kind == "multi"}

    @property
    def num_embeddings(self) -> dict[str, int]:
        return {f.name: int(f.num_embeddings) for f in self.fields}

    def field(self, name: str) -> FieldSpec:
        for f in self.fields:
            if f.name == name:
                return f
        raise KeyError(name)

    def to_dict(self) -> dict:
        return {"label": self.label, "event_time": self.event_time, "fields": [asdict(f) for f in self.fields]}

    @classmethod
    def from_dict(cls, d: dict) -> Schema:
        try:
            fields = [FieldSpec(**f) for f in d["fields"]]
        except (KeyError, TypeError) as e:
            raise SchemaError(f"bad schema declaration: {e}") from None
        return cls(fields=fields, label=d.get("label", "label"), event_time=d.get("event_time", "event_time"))

    def fingerprint(self) -> str:
        """Stable id of the schema: plans and checkpoints made for another schema are refused."""
        blob = json.dumps(self.to_dict(), sort_keys=True).encode()
        return hashlib.sha256(blob).hexdigest()[:16]
