"""Managed vocabularies (models/vocab.py) in real arms under DistributedModelParallel (world 1):
distinct rows for live ids, LFU and LRU eviction, exact checkpoint/resume, re-allocation."""

import tomllib

import numpy as np
import pyarrow as pa
import pytest
import torch

from dimstream.models.arm import Arm, ArmSpec
from dimstream.models.config import ModelConfig
from dimstream.models.distributed import progressive_val_score
from dimstream.models.realloc import reallocate
from dimstream.models.vocab import vocabs_of
from dimstream.stream.decode import Decoder, raw_ids
from dimstream.stream.schema import FieldSpec, Schema, SchemaError

CFG = ModelConfig("deepfm", mlp=(8,), interaction_dim=8, batch_size=64, seed=0)


def _schema(capacity=16, eviction="lfu", admit_after=1) -> Schema:
    return Schema(
        [
            FieldSpec(
                "user", "categorical", 1, vocab="managed", capacity=capacity, eviction=eviction, admit_after=admit_after
            ),
            FieldSpec("item", "categorical", 32),
        ]
    )


def _arm(schema: Schema, dims=None, name="control") -> Arm:
    dims = dims or {"user": 8, "item": 8}
    return Arm(ArmSpec(name, dims), schema.num_embeddings, schema.multi_valued, CFG, managed=schema.managed)


def _batch(schema: Schema, users, seed=0):
    rng = np.random.default_rng(seed)
    n = len(users)
    rb = pa.record_batch(
        {
            "user": pa.array(np.asarray(users, np.int64)),
            "item": pa.array(rng.integers(0, 20, n)),
            "label": pa.array((rng.random(n) < 0.4).astype(np.int8)),
            "event_time": pa.array(np.arange(n)),
        }
    )
    return Decoder(schema).decode(rb).batch


def _raw(users) -> list[int]:
    return raw_ids(pa.array(np.asarray(users, np.int64)), "user").tolist()


def _churn(schema, windows=6, rows=96, seed=0):
    """Each window draws users from a range that moves by 8 ids: old ids go quiet, new ones come."""
    rng = np.random.default_rng(seed)
    return [_batch(schema, rng.integers(8 * w + 1, 8 * w + 25, rows), seed + w) for w in range(windows)]


def _vocab(arm):
    return vocabs_of(arm)["user"]


@pytest.mark.parametrize(
    "kw, msg",
    [
        ({"vocab": "bloom"}, 'vocab must be "hash" or "managed"'),
        ({"vocab": "managed"}, "capacity >= 2"),
        ({"vocab": "managed", "capacity": 8, "eviction": "fifo"}, 'eviction must be "lfu" or "lru"'),
        ({"vocab": "managed", "capacity": 8, "admit_after": 0}, "admit_after must be an integer >= 1"),
        ({"capacity": 8}, 'need vocab = "managed"'),
    ],
)
def test_a_bad_vocab_option_is_a_clear_error(kw, msg):
    with pytest.raises(SchemaError, match=msg):
        FieldSpec("user", "categorical", 10, **kw)
    with pytest.raises(SchemaError, match="numeric field is bucketised"):
        FieldSpec("price", "numeric", 10, vocab="managed", capacity=8)


def test_managed_options_round_trip_and_hash_fingerprints_do_not_change():
    s = _schema(capacity=16, eviction="lru", admit_after=2)
    assert Schema.from_dict(s.to_dict()) == s and s.num_embeddings == {"user": 16, "item": 32}
    plain = Schema([FieldSpec("item", "categorical", 32)])
    assert "vocab" not in plain.to_dict()["fields"][0]  # hashed fields declare as before
    user = 'name = "user", kind = "categorical", num_embeddings = 1, vocab = "managed", capacity = 16'
    item = 'name = "item", kind = "categorical", num_embeddings = 32'
    toml = f'[schema]\nfields = [{{ {user}, eviction = "lru", admit_after = 2 }}, {{ {item} }}]'
    assert Schema.from_dict(tomllib.loads(toml)["schema"]) == s  # the README's [schema] form


def test_an_arm_built_without_the_managed_fields_refuses_their_raw_ids():
    schema = _schema()
    arm = Arm(ArmSpec("control", {"user": 8, "item": 8}), schema.num_embeddings, set(), CFG)  # managed forgotten
    with pytest.raises(ValueError, match="field 'user': ids outside its 16 rows"):
        arm.train_step(_batch(schema, [1, 2, 3]))


def test_managed_ids_build_for_more_than_one_rank_and_a_world_of_one_gathers_nothing(monkeypatch):
    """More ranks are no longer refused: each step admits from every rank's ids (two ranks
    against one process: tests/test_vocab_ranks.py). A world of one pays no collective: the
    step's ids are its own, the very tensor."""
    from dimstream.models.distributed import ensure_process_group, world_size
    from dimstream.models.vocab import build_vocabs, gather_step_ids

    ensure_process_group()
    assert world_size() == 1
    ids = torch.tensor([3, 5, 3])
    assert gather_step_ids(ids) is ids
    monkeypatch.setenv("WORLD_SIZE", "2")
    assert list(build_vocabs(_schema().managed, ["user", "item"])) == ["user"]


def test_churn_keeps_admitted_ids_distinct_and_padding_is_never_admitted():
    schema = _schema(capacity=16)
    arm = _arm(schema)
    seen = set()
    for b in _churn(schema):
        seen |= set(b.values["user"].tolist())
        progressive_val_score([arm], b, batch_size=40)  # 96 rows: the last step is padded
        m = _vocab(arm).mapping()
        rows = list(m.values())
        assert len(rows) == len(set(rows)), "two live ids share a row"
        assert all(0 <= r < 15 for r in rows)  # row 15 is the default row, never a live id's
        assert set(m) <= seen and 0 not in m  # only real ids live; padding (id 0) never admitted
    assert len(m) == 15  # the churn filled the table
    stats = arm.vocab_stats()["user"]
    assert stats["evictions"] > 0 and stats["admissions"] - stats["evictions"] == stats["rows_in_use"] == 15
    # in eval a live id reads its own row, an unknown one the default row
    from torchrec.sparse.jagged_tensor import KeyedJaggedTensor

    arm.model.eval()
    live = next(iter(m))
    kjt = KeyedJaggedTensor(keys=["user"], values=torch.tensor([live, 12345]), lengths=torch.ones(2, dtype=torch.int64))
    got = arm.model.module.embedding.remap(kjt).values().tolist()
    assert got == [m[live], 15] and _vocab(arm).mapping() == m  # eval admits nothing
    arm.model.train()
    with torch.no_grad():  # a search scoring rows in training mode: no admission either
        arm.model(_batch(schema, list(range(500, 530))).to_kjt(arm.feature_names))
    assert _vocab(arm).mapping() == m


def test_an_evicted_row_is_drawn_afresh_for_its_new_id():
    schema = _schema(capacity=4)
    arm = _arm(schema)
    weight = arm.model.module.embedding.deep.state_dict()["embedding_bags.emb_user.weight"]
    arm.train_step(_batch(schema, [1, 1, 1, 2, 2, 3]))
    row3 = _vocab(arm).mapping()[_raw([3])[0]]
    trained = weight.local_shards()[0].tensor[row3].clone()
    arm.train_step(_batch(schema, [4, 4]))  # 4 (twice) beats 3 (once): it takes 3's row
    m = _vocab(arm).mapping()
    assert m[_raw([4])[0]] == row3
    assert not torch.allclose(weight.local_shards()[0].tensor[row3], trained)


def test_lfu_evicts_the_least_frequent_and_a_rare_newcomer_waits():
    schema = _schema(capacity=4, eviction="lfu")
    arm = _arm(schema)
    arm.train_step(_batch(schema, [1, 1, 1, 2, 2, 3]))
    assert set(_vocab(arm).mapping()) == set(_raw([1, 2, 3]))
    arm.train_step(_batch(schema, [4, 4]))  # 4 seen twice, 3 once in all: 3 goes
    assert set(_vocab(arm).mapping()) == set(_raw([1, 2, 4]))
    arm.train_step(_batch(schema, [5]))  # once < every live id's count: 5 reads the default row
    assert set(_vocab(arm).mapping()) == set(_raw([1, 2, 4]))
    from prometheus_client import CollectorRegistry

    from dimstream.ops.metrics import Metrics

    metrics = Metrics(CollectorRegistry())
    metrics.observe_vocab([arm])  # what the daemon's window close scrapes
    get = lambda name: metrics.registry.get_sample_value(name, {"arm": "control", "field": "user"})  # noqa: E731
    assert get("dimstream_vocab_admissions_total") == 4 and get("dimstream_vocab_evictions_total") == 1
    assert get("dimstream_vocab_rows_in_use") == 3 and get("dimstream_vocab_capacity_rows") == 4
    assert get("dimstream_vocab_default_row_lookup_ratio") == pytest.approx(1 / 9)  # 5's one lookup of 9
    metrics.observe_vocab([arm])  # the next window: nothing new
    assert get("dimstream_vocab_window_admissions") == 0 and get("dimstream_vocab_admissions_total") == 4


def test_lru_evicts_the_least_recently_seen():
    schema = _schema(capacity=4, eviction="lru")
    arm = _arm(schema)
    for users in ([1, 2, 3], [1, 2], [4]):  # 3 is the longest unseen when 4 comes
        arm.train_step(_batch(schema, users))
    assert set(_vocab(arm).mapping()) == set(_raw([1, 2, 4]))
    for users in ([1], [5]):  # now 2 is: 5 takes its row
        arm.train_step(_batch(schema, users))
    assert set(_vocab(arm).mapping()) == set(_raw([1, 4, 5]))


def test_a_larger_batch_after_a_small_first_one_admits_all_its_ids():
    schema = _schema(capacity=64)
    arm = _arm(schema)
    arm.train_step(_batch(schema, [1, 2]))  # TorchRec sizes its history from this batch
    arm.train_step(_batch(schema, list(range(10, 40))))
    assert set(_vocab(arm).mapping()) == set(_raw([1, 2] + list(range(10, 40))))


def test_admit_after_waits_for_n_occurrences_over_batches():
    schema = _schema(capacity=8, admit_after=3)
    arm = _arm(schema)
    arm.train_step(_batch(schema, [1, 1, 2]))
    assert _vocab(arm).mapping() == {}
    arm.train_step(_batch(schema, [1, 2, 2]))  # 1: 3 times in all, 2: 3 times
    assert set(_vocab(arm).mapping()) == set(_raw([1, 2]))
    arm.train_step(_batch(schema, [3, 3]))
    assert set(_vocab(arm).mapping()) == set(_raw([1, 2]))


def test_checkpoint_resume_restores_the_mapping_exactly(tmp_path):
    from dimstream.ops import checkpoint

    schema = _schema(capacity=12, eviction="lru")
    windows = _churn(schema, windows=4)
    arm = _arm(schema)
    for b in windows[:2]:
        progressive_val_score([arm], b, batch_size=32)
    meta = {"schema": schema.to_dict(), "model": CFG.to_dict(), "arms": [vars(arm.spec)]}
    ckpt = checkpoint.save(tmp_path, 2, meta, [arm])
    for b in windows[2:]:
        progressive_val_score([arm], b, batch_size=32)
    resumed = checkpoint.load_arms(ckpt).arms["control"]
    assert _vocab(resumed).mapping() != _vocab(arm).mapping()  # the checkpoint is the past
    for b in windows[2:]:
        progressive_val_score([resumed], b, batch_size=32)
    assert _vocab(resumed).mapping() == _vocab(arm).mapping()
    a, r = _vocab(arm).state_dict(), _vocab(resumed).state_dict()
    assert all(torch.equal(a[k], r[k]) for k in a)  # counts / last access and the iteration too
    test = windows[-1]
    np.testing.assert_allclose(resumed.predict(test), arm.predict(test), atol=1e-6)


def test_reallocation_on_a_managed_field_keeps_each_ids_kept_columns():
    schema = _schema(capacity=12)
    build = lambda spec: Arm(spec, schema.num_embeddings, schema.multi_valued, CFG, managed=schema.managed)  # noqa: E731
    control = _arm(schema)
    slim = build(ArmSpec("slim", {"user": 8, "item": 8}))
    for b in _churn(schema, windows=3):
        progressive_val_score([control, slim], b, batch_size=32)
    assert _vocab(slim).mapping() == _vocab(control).mapping()  # same batches, same admissions
    kept = [1, 3, 4, 6]
    spec = ArmSpec("slim", {"user": 4, "item": 8}, {"user": kept, "item": list(range(8))})
    new = reallocate(slim, control, spec, build)
    assert _vocab(new).mapping() == _vocab(slim).mapping()
    key = "embedding.deep.embedding_bags.emb_user.weight"
    old_w = slim.model.state_dict()[key].local_shards()[0].tensor
    new_w = new.model.state_dict()[key].local_shards()[0].tensor
    rows = torch.tensor(list(_vocab(slim).mapping().values()))
    torch.testing.assert_close(new_w[rows], old_w[rows][:, kept])
    b = _churn(schema, windows=4)[-1]  # the new arm trains on and keeps its ids apart
    progressive_val_score([new], b, batch_size=32)
    rows = list(_vocab(new).mapping().values())
    assert len(rows) == len(set(rows))


def test_the_daemon_trains_a_managed_field_from_a_files_source(tmp_path):
    """`vocab = "managed"` in a run's [schema]: the daemon's arms manage the field's ids (no
    guard error), train every row, and the checkpointed mapping holds the ids admitted."""

    from dimstream.ops.config import RunConfig
    from dimstream.ops.daemon import Runner
    from tests.helpers import managed_files

    data, schema = managed_files(tmp_path, 400, 64)
    cfg = RunConfig(
        source=f"files:{data}",
        schema=schema,
        arms=("control",),
        windows=2,
        state_dir=tmp_path / "state",
        metrics_addr="127.0.0.1:0",
        progress=False,
        seed=0,
    )
    runner = Runner.from_config(cfg)
    summary = runner.run()
    assert summary["totals"]["rows"] == 800
    vocab = vocabs_of(runner.arm("control"))["user"]
    assert 0 < vocab.rows_in_use() <= 30  # tiny_batch draws users from 30 ids: one row each
