"""AutoSrh's frequency tiers in the slim arm (models/tiers.py): one table per (field, tier) in one
EmbeddingBagCollection, the id -> (tier, row) remap buffers, re-allocation id by id, the
checkpoint, `--search autosrh --tiers 2` in the daemon on stream-long counts, and in the cron job
`dimstream search`."""

import json
import subprocess
import sys

import numpy as np
import pytest
import torch

from dimstream.models.arm import Arm, ArmSpec
from dimstream.models.config import ModelConfig
from dimstream.models.embedding import AllocationError
from dimstream.models.realloc import reallocate
from dimstream.models.tiers import split_kjt, tier_feature
from dimstream.search import Budget, split_holdout
from dimstream.search.autosrh import autosrh_search, feature_blocks, row_counts
from dimstream.search.counts import StreamCounts
from dimstream.search.masks import ctr_model, pooled_embeddings
from dimstream.stream.decode import Decoder
from tests.helpers import REPO, autosrh_run_config, tiny_batch, tiny_schema

DIMS = {"user": 8, "item": 8, "tags": 8, "price": 8}
SCHEMA = tiny_schema()
ROWS = SCHEMA.num_embeddings
CFG = ModelConfig("deepfm", mlp=(16,), interaction_dim=8, batch_size=32)


def build(spec):
    return Arm(spec, ROWS, {"tags"}, CFG)


@pytest.fixture(scope="module")
def trained():
    control = build(ArmSpec("control", dict(DIMS)))
    batch = Decoder(SCHEMA).decode(tiny_batch(512, 3)).batch
    for s in range(0, 512, 32):
        control.train_step(batch.slice(s, s + 32))
    return control, batch


def _spec(tier_of, tiers, name="slim"):
    """A slim spec whose user and tags are tiered (tier columns `tiers`), item and price not."""
    rows = {f: np.bincount(tier_of[f], minlength=len(tiers[f])).tolist() for f in tiers}
    kept = {f: [sorted(c) for c in t] for f, t in tiers.items()}
    spec = ArmSpec.from_tiers(name, ["user", "tags"], {"kept_columns": kept, "rows": rows, "tier_of": tier_of})
    plain = {"item": [1, 3, 4, 6], "price": [0, 1, 2, 3]}
    ids = {f: plain[f] if f in plain else spec.column_ids[f] for f in DIMS}  # the schema's field order
    dims = {f: len(c) for f, c in ids.items()}
    return ArmSpec(name, dims, ids, spec.tiers, spec.tier_rows, spec.tier_of)


def _tier_of(seed):
    g = np.random.default_rng(seed)
    return {"user": g.integers(0, 2, ROWS["user"]), "tags": g.integers(0, 3, ROWS["tags"])}


TIERS = {"user": [list(range(8)), [2, 3, 5, 7]], "tags": [[0, 1, 2, 3, 4, 5, 6, 7], [4, 5, 6, 7], []]}


def _tables(arm):
    return {k.rsplit(".", 2)[-2]: v for k, v in arm.model.state_dict().items() if hasattr(v, "local_shards")}


def _whole(t):
    return t.local_shards()[0].tensor


def test_the_remap_sends_every_id_to_its_row_in_its_tiers_table(trained):
    control, batch = trained
    tier_of = _tier_of(0)
    slim = reallocate(control, control, _spec(tier_of, TIERS), build)
    emb = ctr_model(slim).embedding
    part = batch.slice(0, 64)
    kjt = part.to_kjt(slim.feature_names)
    split = split_kjt(kjt, slim.feature_names, emb.tier_maps).to_dict()
    assert set(split) == {"user__tier0", "user__tier1", "tags__tier0", "tags__tier1", "item", "price"}
    for f, n_tiers in (("user", 2), ("tags", 3)):
        ids = part.values[f]
        row_of = np.repeat(np.arange(len(part)), np.diff(part.offsets[f]))
        lengths = 0
        for t in range(n_tiers):
            mine = tier_of[f][ids] == t
            members = np.flatnonzero(tier_of[f] == t)  # the table's rows, in id order
            if tier_feature(f, t) not in split:  # tags' tier 2 keeps no column: no table
                assert t == 2 and f == "tags" and mine.any()
                continue
            jt = split[tier_feature(f, t)]
            np.testing.assert_array_equal(members[jt.values().numpy()], ids[mine])  # local row -> its id
            np.testing.assert_array_equal(jt.lengths().numpy(), np.bincount(row_of[mine], minlength=len(part)))
            lengths = lengths + jt.lengths().numpy()
        assert np.all(lengths <= np.diff(part.offsets[f]))
    torch.testing.assert_close(split["item"].values(), kjt["item"].values())


def test_tier_tables_hold_the_counts_split_within_the_budget(trained):
    """AutoSrh with 2 tiers on the control: the slim arm built from its (field, tier) allocation
    has one table per kept (field, tier), of that tier's rows (the counts split by
    `feature_blocks`) and its width (a multiple of 4), and sum rows x width <= kappa x control."""
    control, batch = trained
    train, val = split_holdout(batch, 0.25)
    counts = row_counts(batch, ROWS)
    r = autosrh_search(control, train, val, Budget("params", 0.25), steps=20, batch_size=64, tiers=2, counts=counts)
    t = r.details["tiers"]
    spec = ArmSpec.from_tiers("slim", list(DIMS), t)
    slim = reallocate(control, control, spec, build)
    tables = _tables(slim)
    for f in spec.tiers:
        np.testing.assert_array_equal(t["tier_of"][f], feature_blocks(counts[f], 2))
        sizes = np.bincount(t["tier_of"][f], minlength=2)
        for tier, width in enumerate(t["dims"][f]):
            assert width % 4 == 0
            name = f"emb_{tier_feature(f, tier)}"
            assert (name in tables) == (width > 0)
            if width:
                assert tuple(tables[name].size()) == (sizes[tier], width)
        np.testing.assert_array_equal(ctr_model(slim).embedding.tier_maps.tier_of(f).numpy(), t["tier_of"][f])
    assert slim.embedding_params == t["params"] <= 0.25 * control.embedding_params
    assert slim.embedding_params == sum(v.size(0) * v.size(1) for k, v in tables.items() if k.startswith("emb_"))


def test_a_slim_arm_cut_from_the_control_pools_the_controls_kept_columns_of_each_ids_tier(trained):
    """Warm start: every id's row in its tier's table is the control's row at the tier's kept
    columns, zero-padded to the field's width; a mean-pooled field is the mean over its ids of
    those rows, whichever tiers they lie in."""
    control, batch = trained
    tier_of = _tier_of(1)
    slim = reallocate(control, control, _spec(tier_of, TIERS), build)
    part = batch.slice(0, 96)
    with torch.no_grad():
        ce, _ = pooled_embeddings(control, part.to_kjt(control.feature_names))
        se, _ = pooled_embeddings(slim, part.to_kjt(slim.feature_names))
    c, s = dict(zip(ctr_model(control).feature_names, ce)), dict(zip(ctr_model(slim).feature_names, se))
    user_mask = torch.zeros(2, 8)
    for t, cols in enumerate(TIERS["user"]):
        user_mask[t, cols] = 1.0
    torch.testing.assert_close(s["user"], c["user"] * user_mask[tier_of["user"][part.values["user"]]])
    table = _whole(_tables(control)["emb_tags"])
    tag_mask = torch.zeros(3, 8)
    for t, cols in enumerate(TIERS["tags"]):
        tag_mask[t, cols] = 1.0
    ids = torch.from_numpy(part.values["tags"]).long()
    per_id = table[ids] * tag_mask[torch.from_numpy(tier_of["tags"])[ids]]
    lengths = np.diff(part.offsets["tags"])
    row_of = torch.from_numpy(np.repeat(np.arange(len(part)), lengths))
    want = torch.zeros(len(part), 8).index_add(0, row_of, per_id) / torch.from_numpy(lengths)[:, None]
    torch.testing.assert_close(s["tags"], want)
    torch.testing.assert_close(s["item"], c["item"][:, [1, 3, 4, 6]])


def test_an_id_that_moves_tier_keeps_the_columns_both_tiers_share_with_their_optimizer_state(trained):
    control, batch = trained
    first, second = _tier_of(2), _tier_of(3)
    slim = reallocate(control, control, _spec(first, TIERS), build)
    for s in range(0, 256, 32):  # the slim arm trains on its own
        slim.train_step(batch.slice(s, s + 32))
    moved = reallocate(slim, control, _spec(second, TIERS), build)
    old, new, ctl = _tables(slim), _tables(moved), _tables(control)
    old_state, new_state = (a.model.fused_optimizer.state_dict()["state"] for a in (slim, moved))
    ctl_state = control.model.fused_optimizer.state_dict()["state"]

    def state(st, table):
        (v,) = st[next(k for k in st if k.endswith(f".{table}.weight"))].values()
        return _whole(v)

    for f in ("user", "tags"):
        ctl_w, ctl_s = _whole(ctl[f"emb_{f}"]), state(ctl_state, f"emb_{f}")
        for t, cols in enumerate(TIERS[f]):
            if not cols:
                continue
            members = np.flatnonzero(second[f] == t)
            got_w, got_s = _whole(new[f"emb_{tier_feature(f, t)}"]), state(new_state, f"emb_{tier_feature(f, t)}")
            for row, i in enumerate(members):
                t0 = first[f][i]
                cols0 = TIERS[f][t0]
                for j, c in enumerate(cols):
                    if c in cols0:  # kept: the old tier table's trained value and state
                        r0 = int((first[f][:i] == t0).sum())
                        src_w = _whole(old[f"emb_{tier_feature(f, t0)}"])[r0, cols0.index(c)]
                        src_s = state(old_state, f"emb_{tier_feature(f, t0)}")[r0, cols0.index(c)]
                    else:  # granted: the control's
                        src_w, src_s = ctl_w[i, c], ctl_s[i, c]
                    assert got_w[row, j] == src_w and got_s[row, j] == src_s, (f, t, i, c)
    trained_ids = np.unique(batch.slice(0, 256).values["user"])
    assert any((first["user"][i] != second["user"][i]) for i in trained_ids)  # some trained id moved


def test_the_checkpoint_restores_the_tier_map_and_the_predictions_exactly_and_serving_agrees(trained, tmp_path):
    from dimstream.ops import checkpoint

    control, batch = trained
    slim = reallocate(control, control, _spec(_tier_of(4), TIERS), build)
    for s in range(0, 128, 32):
        slim.train_step(batch.slice(s, s + 32))
    meta = {"schema": SCHEMA.to_dict(), "model": CFG.to_dict(), "arms": [slim.spec.to_dict()]}
    ckpt = checkpoint.save(tmp_path, 0, meta, [slim])
    arm = checkpoint.load_arms(ckpt).arms["slim"]
    assert arm.spec.tiers == TIERS and not arm.spec.tier_of  # the map comes from the state
    for f in ("user", "tags"):
        live, back = (ctr_model(a).embedding.tier_maps for a in (slim, arm))
        assert torch.equal(back.tier_of(f), live.tier_of(f)) and not torch.equal(back.tier_of(f), _default(back, f))
    test = batch.slice(128, 512)
    np.testing.assert_array_equal(arm.predict(test), slim.predict(test))
    # served as field tables (models/tiers.py `field_tables`): the same probabilities
    from dimstream.models.serving import ServingModel
    from dimstream.ops.export import export_model

    out = export_model(arm, meta | {"history_length": 1}, tmp_path / "served")
    np.testing.assert_allclose(ServingModel.load(out)(test).numpy(), slim.predict(test), rtol=1e-5, atol=1e-6)


def _default(maps, f):
    rows = torch.tensor(maps.shapes[f].rows)
    return torch.repeat_interleave(torch.arange(len(rows)), rows)


def test_a_managed_field_cannot_be_tiered_and_tiers_need_autosrh():
    from dimstream.models.embedding import MixedEmbedding
    from dimstream.models.tiers import TierShape
    from dimstream.ops.config import ConfigError, RunConfig

    shape = TierShape(((0, 1, 2, 3), ()), (30, 20))
    with pytest.raises(AllocationError, match="managed"):
        MixedEmbedding({"user": 4}, {"user": 50}, set(), managed={"user": object()}, tiers={"user": shape})
    with pytest.raises(AllocationError, match="rows"):
        MixedEmbedding({"user": 4}, {"user": 60}, set(), tiers={"user": shape})
    with pytest.raises(ConfigError, match="tiers"):
        RunConfig(search="sseds", tiers=2)
    assert RunConfig(search="autosrh", tiers=2).tiers == 2 and RunConfig().tiers == 1
    from dimstream.ops.cli import _run_config, build_parser

    args = build_parser().parse_args(["run", "--search", "autosrh", "--tiers", "3"])
    assert _run_config(args).tiers == 3


def test_the_daemon_runs_autosrh_with_two_tiers_and_resumes_the_tiered_slim_arm(tmp_path):
    """--search autosrh --tiers 2 on the synthetic stream (Zipf ids): every window re-shapes the
    slim arm to the (field, tier) allocation within kappa x control, the frequent tier of
    user_id and item_id wider than their tail; the tiered arm resumes from its checkpoint with
    its tier map and predicts exactly as before."""
    from dimstream.ops import checkpoint
    from dimstream.ops.daemon import Runner
    from dimstream.stream.synthetic import SyntheticSource

    def run(windows):
        runner = Runner.from_config(
            autosrh_run_config(tmp_path, rows_per_window=4000, windows=windows, search_rows=3000, tiers=2)
        )
        return runner, runner.run()

    runner, summary = run(2)
    control, slim = runner.arm("control"), runner.arm("slim")
    for w in summary["windows"]:
        realloc = w["reallocation"]
        assert realloc["method"] == "autosrh" and realloc["embedding_params"] <= 0.25 * control.embedding_params
        for f in ("user_id", "item_id"):
            assert realloc["tier_dims"][f][0] > realloc["tier_dims"][f][1], (f, realloc["tier_dims"][f])
        assert all(d % 4 == 0 for ds in realloc["tier_dims"].values() for d in ds)
    assert slim.spec.tiers and slim.embedding_params == summary["windows"][-1]["reallocation"]["embedding_params"]
    src = SyntheticSource(seed=7, rows_per_window=500)
    test = Decoder(src.schema).decode(src.window_table(0)).batch
    back = checkpoint.load_arms(checkpoint.latest(tmp_path)).arms["slim"]
    for f in slim.spec.tiers:
        live, got = (ctr_model(a).embedding.tier_maps for a in (slim, back))
        assert torch.equal(live.tier_of(f), got.tier_of(f))
    np.testing.assert_array_equal(back.predict(test), slim.predict(test))
    runner, summary = run(3)  # the daemon resumes the tiered arm and goes on re-allocating it
    assert len(summary["windows"]) == 3 and summary["windows"][-1]["reallocation"]["tier_dims"]


def test_the_daemon_tiers_come_from_the_stream_counts(tmp_path):
    """--tiers 2 counts every window's rows (search/counts.py): after the last window's search
    the slim arm's tier map is `feature_blocks` of the stream-long counts, which are the whole
    stream's, not that window's."""
    from dimstream.ops.daemon import Runner
    from dimstream.stream.synthetic import SyntheticSource

    runner = Runner.from_config(
        autosrh_run_config(tmp_path, rows_per_window=2500, windows=2, search_rows=2000, tiers=2)
    )
    summary = runner.run()
    counts = runner.search.counts
    src = SyntheticSource(seed=0, rows_per_window=2500)
    last_window = Decoder(src.schema).decode(src.window_table(1)).batch
    assert counts.windows == 2 and int(counts.counts()["user_id"].sum()) == 2 * 2500
    slim = runner.arm("slim")
    assert summary["windows"][-1]["reallocation"]["method"] == "autosrh"
    assert [w["search"]["tier_counts_windows"] for w in summary["windows"]] == [1, 2]
    for f in ("user_id", "item_id"):
        want = feature_blocks(counts.counts()[f], 2)
        np.testing.assert_array_equal(ctr_model(slim).embedding.tier_maps.tier_of(f).numpy(), want)
        last = row_counts(last_window, runner.schema.num_embeddings)[f]  # what the window alone would give
        assert not np.array_equal(feature_blocks(last, 2), want)
        dims = summary["windows"][-1]["reallocation"]["tier_dims"][f]
        assert dims[0] > dims[1], (f, dims)


CLI = [sys.executable, "-m", "dimstream.ops.cli"]


def _cli(args, check=True):
    r = subprocess.run(CLI + args, cwd=REPO, capture_output=True, text=True, timeout=600)
    if check:
        assert r.returncode == 0, r.stderr[-3000:]
    return r


def test_the_cron_job_searches_tiers_on_the_stream_counts_and_the_daemon_builds_tier_tables(tmp_path):
    """`dimstream search --search autosrh --tiers 2` on a daemon's state dir: the plan carries the
    (field, tier) allocation and the ids' tiers from the checkpointed stream counts; the daemon
    applying it gives the slim arm one table per (field, tier), the frequent tier of user_id and
    item_id wider than the tail, within kappa x control."""
    from dimstream.ops import checkpoint
    from dimstream.search.plan import read_plan, validate_plan
    from dimstream.search.tierplan import decode_tiers

    run = ["run", "--arms", "control,slim", "--search", "autosrh", "--tiers", "2", "--search-every", "0"]
    run += ["--rows-per-window", "3000", "--metrics-addr", "127.0.0.1:0", "--no-progress", "--model", "fm"]
    run += ["--state-dir", str(tmp_path)]
    _cli(run + ["--windows", "1"])
    out = _cli(["search", "--state-dir", str(tmp_path), "--search", "autosrh", "--tiers", "2", "--rows", "2000"]).stdout
    assert "autosrh on ckpt-000000" in out and "2 tiers counted on the stream" in out, out
    restored = checkpoint.load_arms(checkpoint.latest(tmp_path), ["control"])
    control, schema = restored.arms["control"], restored.schema
    counts = StreamCounts.from_state(restored.extra["counts"]).counts()
    assert int(counts["user_id"].sum()) == 3000
    plan = read_plan(tmp_path / "plans" / "pending.json")
    validate_plan(plan, schema.fingerprint(), schema.num_embeddings, control.dims, 0.25)
    tiers = decode_tiers(plan.tiers)
    for f in ("user_id", "item_id"):
        np.testing.assert_array_equal(tiers["tier_of"][f], feature_blocks(counts[f], 2))
        assert tiers["dims"][f][0] > tiers["dims"][f][1], (f, tiers["dims"][f])
    assert tiers["params"] <= 0.25 * control.embedding_params
    assert all(d % 4 == 0 for ds in tiers["dims"].values() for d in ds)
    _cli(run + ["--windows", "2"])
    w = json.loads((tmp_path / "summary.json").read_text())["windows"]
    realloc = w[1]["reallocation"]
    assert realloc["source"] == "plan" and realloc["method"] == "autosrh"
    assert realloc["embedding_params"] == tiers["params"]
    kept = {f: ds for f, ds in tiers["dims"].items() if any(ds)}
    assert realloc["tier_dims"] == kept
    slim = checkpoint.load_arms(checkpoint.latest(tmp_path), ["slim"]).arms["slim"]
    tables = _tables(slim)
    for f, ds in kept.items():
        np.testing.assert_array_equal(ctr_model(slim).embedding.tier_maps.tier_of(f).numpy(), tiers["tier_of"][f])
        for t, d in enumerate(ds):
            name = f"emb_{tier_feature(f, t)}"
            assert (name in tables) == (d > 0)
            if d:
                assert tuple(tables[name].size()) == (tiers["rows"][f][t], d)


@pytest.mark.parametrize(
    "extra, message",
    [
        (["--search", "sseds", "--tiers", "2"], "tiers must be >= 1, and > 1 only with search autosrh"),
        (["--search", "autosrh", "--tiers", "0"], "tiers must be >= 1"),
        (["--search", "autosrh", "--noise-floor", "1"], "noise_floor is a knob of search sseds"),
        (["--search", "sseds", "--noise-floor", "-1"], "noise_floor must be >= 0"),
        (["--search", "sseds", "--field-check-z", "-1"], "field_check_z must be >= 0"),
    ],
)
def test_the_cron_job_refuses_what_the_daemon_refuses_in_one_line_with_exit_2(tmp_path, capsys, extra, message):
    from dimstream.ops.cli import main

    assert main(["search", "--state-dir", str(tmp_path), *extra]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and message in err[0], err
    assert not (tmp_path / "plans").exists()  # refused before anything was read or written


def test_the_cron_job_re_decides_the_daemons_field_check_at_its_z(tmp_path):
    from dimstream.ops.search_cli import latest_field_check
    from dimstream.search.fieldcheck import FieldCheck

    check = FieldCheck.decide({"a": 0.3, "b": 0.1, "c": -0.1}, {"a": 0.1, "b": 0.1, "c": 0.1}, 2.0, 100, 0.1)
    (tmp_path / "field_check.json").write_text(json.dumps(check.to_dict() | {"window": 0}))
    assert latest_field_check(tmp_path, ["a", "b", "c"]).keep == {"a": True, "b": False, "c": False}
    assert latest_field_check(tmp_path, ["a", "b", "c"], 0.0).keep == {"a": True, "b": True, "c": False}
    assert latest_field_check(tmp_path, ["a", "b", "c"], 5.0).keep == {"a": False, "b": False, "c": False}


def test_a_plan_carries_the_tiers_and_a_tampered_tier_map_or_budget_is_rejected(trained, tmp_path):
    from dimstream.search.plan import Plan, PlanError, read_plan, validate_plan, write_plan

    control, batch = trained
    train, val = split_holdout(batch, 0.25)
    r = autosrh_search(control, train, val, Budget("params", 0.25), steps=10, batch_size=64, tiers=2)
    write_plan(tmp_path / "p.json", Plan.from_result(r, SCHEMA.fingerprint(), None))
    plan = read_plan(tmp_path / "p.json")
    validate_plan(plan, SCHEMA.fingerprint(), ROWS, control.dims, 0.25)
    from dimstream.search.tierplan import decode_tiers

    back = decode_tiers(plan.tiers)
    for f in DIMS:
        np.testing.assert_array_equal(back["tier_of"][f], r.details["tiers"]["tier_of"][f])
    assert back["dims"] == r.details["tiers"]["dims"]
    f = next(f for f, ds in back["dims"].items() if ds[1] == 0)
    wide = dict(plan.tiers, dims=dict(plan.tiers["dims"], **{f: [back["dims"][f][0], 8]}))
    wide["kept_columns"] = dict(plan.tiers["kept_columns"], **{f: [back["kept_columns"][f][0], list(range(8))]})
    moved = dict(plan.tiers, rows=dict(plan.tiers["rows"], **{f: back["rows"][f][::-1]}))
    for tiers, why in ((wide, "embedding parameters >"), (moved, "the tier map puts")):
        plan.tiers = tiers
        with pytest.raises(PlanError, match=why) as e:
            validate_plan(plan, SCHEMA.fingerprint(), ROWS, control.dims, 0.25)
        assert e.value.reason == "bad tiers"
