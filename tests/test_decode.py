"""Decoding Arrow batches: values, bucketing, multi-valued lengths, every bad-input case."""

import math

import numpy as np
import pyarrow as pa
import pytest

from dimstream.stream.decode import Decoder, numeric_to_ids
from dimstream.stream.hashing import hash_ids
from tests.helpers import tiny_batch, tiny_schema


def _dec():
    return Decoder(tiny_schema())


def test_values_lengths_and_kjt():
    rb = tiny_batch(64)
    r = _dec().decode(rb)
    b = r.batch
    assert len(b) == 64 and not r.rejected_counts
    assert b.values["user"].tolist() == hash_ids(rb.column("user"), "user", 50).tolist()
    assert np.diff(b.offsets["tags"]).tolist() == [len(x) for x in rb.column("tags").to_pylist()]
    kjt = b.to_kjt()
    assert kjt.keys() == ["user", "item", "tags", "price"]
    assert kjt.lengths().tolist()[64 * 2 : 64 * 3] == np.diff(b.offsets["tags"]).tolist()


def test_numeric_bucketing_is_the_criteo_winner_transform():
    ids = numeric_to_ids(pa.array([10.0, 1.5, 2.0, 100.0, None, float("nan"), -3.0]), "log2").to_numpy()
    assert ids[0] == int(math.log(10) ** 2) == 5
    assert ids[1] == 1 and ids[2] == 2 and ids[3] == int(math.log(100) ** 2) and ids[6] == -3
    assert ids[4] == ids[5]  # missing and NaN share the reserved id


@pytest.mark.parametrize(
    "mutate, reason, rows",
    [
        (lambda rb: rb.drop_columns(["label"]), "missing_column", 20),
        (lambda rb: rb.drop_columns(["item"]), "missing_column", 20),
        (
            lambda rb: rb.set_column(rb.schema.get_field_index("label"), "label", pa.array(["yes"] * 20)),
            "wrong_type",
            20,
        ),
        (lambda rb: rb.set_column(rb.schema.get_field_index("user"), "user", pa.array([1.5] * 20)), "wrong_type", 20),
        (
            lambda rb: rb.set_column(
                rb.schema.get_field_index("label"), "label", pa.array([None, 1] + [0] * 18, pa.int8())
            ),
            "null_label",
            1,
        ),
        (
            lambda rb: rb.set_column(
                rb.schema.get_field_index("label"), "label", pa.array([float("nan"), 1.0] + [0.0] * 18)
            ),
            "nan_label",
            1,
        ),
        (
            lambda rb: rb.set_column(rb.schema.get_field_index("label"), "label", pa.array([2, -1, 1] + [0] * 17)),
            "label_out_of_range",
            2,
        ),
        (lambda rb: rb.slice(0, 0), "empty_batch", 1),
    ],
)
def test_each_bad_input_is_counted_with_its_reason_and_kept(mutate, reason, rows):
    rb = mutate(tiny_batch(20))
    r = _dec().decode(rb)
    assert r.rejected_counts == {reason: rows}
    assert r.rejected[0].reason == reason
    kept = r.rejected[0].rows
    if reason != "empty_batch":
        assert kept.num_rows == rows
    good = rb.num_rows - (rows if reason != "empty_batch" else 0)
    assert len(r.batch) == good


def test_unknown_columns_are_reported_not_fatal():
    rb = tiny_batch(10).append_column("surprise", pa.array(range(10)))
    r = _dec().decode(rb)
    assert len(r.batch) == 10 and r.ignored_columns == ["surprise"]
