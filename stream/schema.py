"""Field schema: what each Arrow column is and how many embedding rows it hashes into.

>>> s = Schema(fields=[FieldSpec("user", "categorical", 1000), FieldSpec("price", "numeric", 64)])
>>> s.feature_names
['user', 'price']
>>> Schema.from_dict(s.to_dict()) == s
True

The stream carries its schema: every Arrow message dimstream writes holds the declaration as
JSON under the Arrow schema metadata key `METADATA_KEY` (see the README's Kafka section for the
contract other producers follow).

>>> Schema.from_metadata(s.to_metadata()) == s
True
>>> print(s.difference(Schema([FieldSpec("user", "categorical", 10)])))
field 'user' num_embeddings 1000 != 10; field 'price' only in this schema
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import asdict, dataclass

KINDS = ("categorical", "multi", "numeric")
ID_TYPES = (None, "int", "str")
VOCABS = ("hash", "managed")
EVICTIONS = ("lfu", "lru")
EVENT_TIME_UNITS = ("s", "ms", "us")
# Arrow schema-metadata key of the declaration; a new version of the layout gets a new key
METADATA_KEY = b"dimstream.schema.v1"


class SchemaError(ValueError):
    """A schema (or a config declaring one) is invalid."""


@dataclass(frozen=True)
class FieldSpec:
    """One sparse feature.

    name: the feature name (TorchRec key) and, unless `column` is set, the Arrow column.
    kind: "categorical" (one int or string id per row), "multi" (a list of ids per row),
          or "numeric" (a number, bucketised into an id by `numeric_transform`).
    num_embeddings: hash buckets, i.e. embedding rows of this field's table.
    id_type: categorical and multi only: how ids are hashed. "int": every id is an integer
          (numeric strings such as "123" are parsed, so "123" and 123 land on the same row;
          other strings are rejected as wrong_type); "str": every id is a string (integers are
          written in decimal, so 123 and "123" land on the same row, "007" stays "007").
          None (the default, today's behaviour, and left out of the fingerprint): integer
          columns hash as integers and string columns as strings, so "123" and 123 land on
          DIFFERENT rows: declare id_type when one source mixes the two (e.g. JSON and Arrow).
    vocab: categorical and multi only. "hash" (the default): ids are hashed into
          `num_embeddings` rows. "managed": every admitted id gets a row of its own out of
          `capacity` rows (one of them the default row that unadmitted ids share); when the
          table is full, `eviction` ("lfu" or "lru") decides which id gives its row up, and an id
          is admitted once it has occurred `admit_after` times (models/vocab.py).
          A managed field's table has `capacity` rows (`Schema.num_embeddings`, what the budget
          counts); its `num_embeddings` is then ignored.
    """

    name: str
    kind: str
    num_embeddings: int
    column: str | None = None
    # numeric only: "log2" is the Criteo-winner transform int(log(x)^2) for x > 2 (else int(x))
    numeric_transform: str = "log2"
    id_type: str | None = None
    vocab: str = "hash"
    capacity: int | None = None
    eviction: str = "lfu"
    admit_after: int = 1

    def __post_init__(self):
        if self.kind not in KINDS:
            raise SchemaError(f"field {self.name!r}: kind must be one of {KINDS}, got {self.kind!r}")
        if int(self.num_embeddings) < 1:
            raise SchemaError(f"field {self.name!r}: num_embeddings must be >= 1")
        if self.numeric_transform not in ("log2", "identity"):
            raise SchemaError(f"field {self.name!r}: numeric_transform must be log2 or identity")
        if self.id_type not in ID_TYPES:
            raise SchemaError(f'field {self.name!r}: id_type must be "int" or "str", got {self.id_type!r}')
        if self.id_type is not None and self.kind == "numeric":
            raise SchemaError(f"field {self.name!r}: id_type applies to categorical and multi fields only")
        self._check_vocab()

    def _check_vocab(self) -> None:
        """The vocab options: each wrong one named with what it may be."""
        where = f"field {self.name!r}"
        if self.vocab not in VOCABS:
            raise SchemaError(f'{where}: vocab must be "hash" or "managed", got {self.vocab!r}')
        if self.eviction not in EVICTIONS:
            raise SchemaError(f'{where}: eviction must be "lfu" or "lru", got {self.eviction!r}')
        if not isinstance(self.admit_after, int) or isinstance(self.admit_after, bool) or self.admit_after < 1:
            raise SchemaError(f"{where}: admit_after must be an integer >= 1, got {self.admit_after!r}")
        if self.vocab == "hash":
            if (self.capacity, self.eviction, self.admit_after) != (None, "lfu", 1):
                raise SchemaError(f'{where}: capacity, eviction and admit_after need vocab = "managed"')
            return
        if self.kind == "numeric":
            raise SchemaError(f"{where}: a numeric field is bucketised, not a vocabulary: vocab must be hash")
        cap = self.capacity
        if not isinstance(cap, int) or isinstance(cap, bool) or cap < 2:
            raise SchemaError(f"{where}: a managed vocab needs capacity >= 2 (ids + the default row), got {cap!r}")

    @property
    def rows(self) -> int:
        """Rows of this field's table: capacity when managed, else num_embeddings."""
        return int(self.capacity) if self.vocab == "managed" else int(self.num_embeddings)

    def to_dict(self) -> dict:
        """The declaration; id_type only when set (so older fingerprints stay the same)."""
        d = asdict(self)
        if d["id_type"] is None:
            del d["id_type"]
        if d["vocab"] == "hash":  # the vocab options only when managed (older fingerprints stay)
            for k in ("vocab", "capacity", "eviction", "admit_after"):
                del d[k]
        return d

    @property
    def source_column(self) -> str:
        return self.column or self.name


@dataclass(frozen=True)
class Schema:
    fields: list[FieldSpec]
    label: str = "label"
    event_time: str = "event_time"  # unix time (int, float, numeric string or timestamp)
    # unit of a numeric event-time column: "s" (default), "ms" or "us"; timestamp columns carry
    # their own unit. Decoded event times are always int64 seconds.
    event_time_unit: str = "s"

    def __post_init__(self):
        names = [f.name for f in self.fields]
        if not names:
            raise SchemaError("schema has no fields")
        if len(set(names)) != len(names):
            raise SchemaError(f"duplicate field names in schema: {names}")
        if self.event_time_unit not in EVENT_TIME_UNITS:
            raise SchemaError(f"event_time_unit must be one of {EVENT_TIME_UNITS}, got {self.event_time_unit!r}")

    @property
    def feature_names(self) -> list[str]:
        return [f.name for f in self.fields]

    @property
    def multi_valued(self) -> set[str]:
        """Fields with a list of ids per row (pooled by mean)."""
        return {f.name for f in self.fields if f.kind == "multi"}

    @property
    def num_embeddings(self) -> dict[str, int]:
        """Rows per field's table (a managed field's capacity)."""
        return {f.name: f.rows for f in self.fields}

    @property
    def managed(self) -> dict[str, FieldSpec]:
        """Fields with a managed vocabulary (vocab = "managed"), by name."""
        return {f.name: f for f in self.fields if f.vocab == "managed"}

    def field(self, name: str) -> FieldSpec:
        for f in self.fields:
            if f.name == name:
                return f
        raise KeyError(name)

    def to_dict(self) -> dict:
        return {
            "label": self.label,
            "event_time": self.event_time,
            "event_time_unit": self.event_time_unit,
            "fields": [f.to_dict() for f in self.fields],
        }

    @classmethod
    def from_dict(cls, d: dict) -> Schema:
        try:
            fields = [FieldSpec(**f) for f in d["fields"]]
        except (KeyError, TypeError) as e:
            raise SchemaError(f"bad schema declaration: {e}") from None
        return cls(
            fields=fields,
            label=d.get("label", "label"),
            event_time=d.get("event_time", "event_time"),
            event_time_unit=d.get("event_time_unit", "s"),
        )

    def fingerprint(self) -> str:
        """Stable id of the schema: plans and checkpoints made for another schema are refused."""
        d = self.to_dict()
        if d["event_time_unit"] == "s":  # the default is left out: fingerprints from before it stay valid
            del d["event_time_unit"]
        blob = json.dumps(d, sort_keys=True).encode()
        return hashlib.sha256(blob).hexdigest()[:16]

    def to_metadata(self) -> dict[bytes, bytes]:
        """Arrow schema metadata carrying this declaration (what the stream carries)."""
        return {METADATA_KEY: json.dumps(self.to_dict(), sort_keys=True).encode()}

    @classmethod
    def from_metadata(cls, metadata: dict | None) -> Schema | None:
        """The declaration an Arrow schema's metadata carries; None when it carries none;
        SchemaError when it carries one that is no valid schema."""
        blob = (metadata or {}).get(METADATA_KEY)
        if blob is None:
            return None
        try:
            d = json.loads(blob)
        except (ValueError, UnicodeDecodeError) as e:
            raise SchemaError(f"{METADATA_KEY.decode()} metadata is not JSON: {e}") from None
        if not isinstance(d, dict):
            raise SchemaError(f"{METADATA_KEY.decode()} metadata is not a JSON object")
        return cls.from_dict(d)

    def difference(self, other: Schema) -> str | None:
        """What differs between two schemas, in one line (None: the same fingerprint)."""
        if self.fingerprint() == other.fingerprint():
            return None
        out = []
        for k in ("label", "event_time", "event_time_unit"):
            if getattr(self, k) != getattr(other, k):
                out.append(f"{k} {getattr(self, k)!r} != {getattr(other, k)!r}")
        theirs = {f.name: f for f in other.fields}
        for f in self.fields:
            g = theirs.get(f.name)
            if g is None:
                out.append(f"field {f.name!r} only in this schema")
                continue
            for k, v in f.to_dict().items():
                if g.to_dict().get(k) != v:
                    out.append(f"field {f.name!r} {k} {v!r} != {g.to_dict().get(k)!r}")
        mine = set(self.feature_names)
        out += [f"field {n!r} only in the other schema" for n in other.feature_names if n not in mine]
        return "; ".join(out) or "field order differs"

    def describe(self) -> str:
        """Fields and kinds in one line (what the log says of an adopted schema)."""
        fields = ", ".join(
            f"{f.name}:{f.kind}[{f.rows}{' managed' if f.vocab == 'managed' else ''}]" for f in self.fields
        )
        return f"label {self.label!r}, event_time {self.event_time!r} ({self.event_time_unit}), fields {fields}"
