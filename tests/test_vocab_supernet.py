"""The AdaS&S supernet (models/supernet.py) with managed fields: its max-tables look ids up
through the control's mapping (`Supernet.follow`), admit nothing themselves, re-draw the rows
whose id changed, and keep the mapping through to_bytes / from_bytes; the daemon runs
`--search adass` on a managed field."""

from __future__ import annotations

import numpy as np
import torch

from dimstream.models.distributed import progressive_val_score
from dimstream.models.supernet import Supernet
from dimstream.models.vocab import vocabs_of
from tests.test_vocab import CFG, _arm, _batch, _churn, _raw, _schema


def _net(schema) -> Supernet:
    return Supernet(schema.num_embeddings, set(), CFG, max_dim=8, managed=schema.managed)


def _user(net_or_arm):
    return vocabs_of(getattr(net_or_arm, "model", net_or_arm))["user"]


def test_the_supernet_looks_ids_up_in_the_controls_rows_and_admits_nothing():
    schema = _schema(capacity=16)
    control, net = _arm(schema), _net(schema)
    windows = _churn(schema, windows=4)
    for b in windows[:3]:
        progressive_val_score([control], b, batch_size=32)
    m = _user(control).mapping()
    assert len(m) == 15 and net.follow(control) == 15  # every row newly owned: drawn afresh
    assert _user(net).mapping() == m
    users = [u for u in range(1, 60) if _raw([u])[0] in m][:5]  # stream values with a row
    ids = _raw(users)
    batch = _batch(schema, users)
    pooled = net.pooled(batch)  # [5, fields, max_dim + 1]
    f = net.feature_names.index("user")
    table = net.table("user")
    torch.testing.assert_close(pooled[:, f, :8], table[[m[i] for i in ids]])  # each id its row
    # training the supernet on ids the control never saw admits none of them
    before = {k: t.clone() for k, t in _user(net).state_dict().items()}
    net.train_step(_batch(schema, list(range(500, 540))))
    assert all(torch.equal(before[k], t) for k, t in _user(net).state_dict().items())
    unseen = net.pooled(_batch(schema, [777, 778]))[:, f, :8]
    torch.testing.assert_close(unseen, table[[15, 15]])  # the default row


def test_following_again_redraws_only_the_rows_whose_id_changed():
    schema = _schema(capacity=16, eviction="lru")
    control, net = _arm(schema), _net(schema)
    windows = _churn(schema, windows=5)
    for b in windows[:2]:
        progressive_val_score([control], b, batch_size=32)
    net.follow(control)
    for b in windows[:2]:  # the supernet trains its rows
        for s in range(0, len(b), 32):
            net.train_step(b.slice(s, min(s + 32, len(b))))
    owners, trained = _user(net).owners(), net.table("user").clone()
    progressive_val_score([control], windows[2], batch_size=32)  # LRU: new ids take old rows
    changed = (_user(control).owners() != owners).nonzero().flatten()
    assert 0 < len(changed) < 15
    assert net.follow(control) == len(changed)
    assert _user(net).mapping() == _user(control).mapping()
    now = net.table("user")
    kept = torch.ones(16, dtype=torch.bool)
    kept[changed] = False
    torch.testing.assert_close(now[kept], trained[kept], rtol=0, atol=0)  # the same ids' rows as they were
    assert not torch.isclose(now[changed], trained[changed]).all(dim=1).any()  # each changed row drawn afresh
    assert now[changed].abs().max() <= CFG.init_range


def test_the_mapping_round_trips_through_the_saved_supernet():
    schema = _schema(capacity=12, admit_after=2)
    control, net = _arm(schema), _net(schema)
    for b in _churn(schema, windows=3):
        progressive_val_score([control], b, batch_size=32)
    net.follow(control)
    back = Supernet.from_bytes(net.to_bytes())
    assert _user(back).mapping() == _user(control).mapping() != {}
    a, b = _user(net).state_dict(), _user(back).state_dict()
    assert a.keys() == b.keys() and "sketch" in a and all(torch.equal(a[k], b[k]) for k in a)
    test = _churn(schema, windows=4)[-1]
    arch = np.array([2, 1])
    torch.testing.assert_close(back.subnet_logits(back.pooled(test), arch), net.subnet_logits(net.pooled(test), arch))


def test_the_daemon_searches_a_managed_field_with_adass(tmp_path):
    """`--search adass` with a managed field: the supernet trains and is searched on the control's
    mapping, the slim arm is re-shaped, and the saved supernet holds the control's mapping."""
    from dimstream.ops import checkpoint
    from dimstream.ops.config import RunConfig
    from dimstream.ops.daemon import Runner
    from dimstream.ops.searching import SUPERNET_FILE
    from tests.helpers import managed_files

    data, schema = managed_files(tmp_path, 600, 24)
    cfg = RunConfig(
        source=f"files:{data}",
        schema=schema,
        arms=("control", "slim"),
        search="adass",
        search_every=1,
        control_dim=8,
        windows=2,
        state_dir=tmp_path / "state",
        metrics_addr="127.0.0.1:0",
        progress=False,
        seed=0,
    )
    summary = Runner.from_config(cfg).run()
    w = summary["windows"][-1]
    assert w["search"]["method"] == "adass" and 0.3 < w["supernet"]["auc"] < 1
    control = checkpoint.load_arms(checkpoint.latest(cfg.state_dir)).arms["control"]
    saved = Supernet.from_bytes((cfg.state_dir / SUPERNET_FILE).read_bytes())
    m = _user(control).mapping()
    assert 20 <= len(m) <= 23 and _user(saved).mapping() == m  # tiny_batch: 30 users for 23 rows
    assert set(m) <= set(_raw(range(30)))
