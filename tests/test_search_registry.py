"""The search-method registry: a method defined and registered here, in the test, is usable by
the CLI choices, the config and the daemon, which re-allocates the slim arm by it."""

import numpy as np
import pytest

from dimstream.models.config import ModelConfig
from dimstream.ops.config import ConfigError, RunConfig
from dimstream.search import registry
from dimstream.search.budget import Budget, allocate, make_result
from dimstream.search.masks import ctr_model
from dimstream.search.registry import SearchMethod, register


class Toy(SearchMethod):
    """Column j of a field of width d scores d - j (the first columns first), at most 1 + `cap`."""

    name = "toy"
    min_score = 27.0  # at width 32 only each field's first block (mean 29.5) passes; the next (25.5) does not

    def __init__(self, cap: float = 1e9):
        self.cap = cap

    def run(self, control, rows, budget, *, field_check=None):
        import time

        t0 = time.perf_counter()
        m = ctr_model(control)
        scores = {f: np.minimum(np.arange(d, 0, -1, dtype=np.float64), 1 + self.cap) for f, d in m.dims.items()}
        return make_result(
            self.name,
            scores,
            budget,
            m.dims,
            m.num_embeddings,
            started=t0,
            rows_used=len(rows),
            min_score=self.min_score,
            field_check=field_check,
        )


@pytest.fixture
def toy():
    register(Toy)
    yield Toy
    registry.METHODS.pop("toy", None)


def test_a_registered_method_is_a_choice_everywhere(toy):
    from dimstream.ops.cli import build_parser

    assert "toy" in registry.names() and {"sseds", "ham"} <= set(registry.names())
    assert registry.knobs("toy") == {"cap"}
    assert registry.build("toy", rows=100, cap=3).cap == 3  # rows offered, not taken
    with pytest.raises(TypeError):
        registry.get("toy", rows=100)
    with pytest.raises(ValueError, match="unknown search method 'nope'"):
        registry.get("nope")
    assert build_parser().parse_args(["search", "--method", "toy"]).method == "toy"
    with pytest.raises(SystemExit):
        build_parser().parse_args(["search", "--method", "nope"])
    assert RunConfig(source="synthetic", search="toy").search == "toy"
    with pytest.raises(ConfigError, match="search must be one of"):
        RunConfig(source="synthetic", search="nope")


def test_the_daemon_reallocates_the_slim_arm_by_the_toy_method(toy, tmp_path):
    from dimstream.ops.daemon import Runner
    from dimstream.stream.synthetic import SyntheticSource

    cfg = RunConfig(
        source="synthetic",
        rows_per_window=2000,
        windows=2,
        arms=("control", "slim"),
        search="toy",
        metrics_addr="127.0.0.1:0",
        progress=False,
        state_dir=tmp_path,
        model=ModelConfig("fm"),
    )
    summary = Runner.from_config(cfg).run()
    w0, w1 = summary["windows"]
    rows = SyntheticSource(seed=cfg.seed, rows_per_window=2000).schema.num_embeddings
    control = {f: 32 for f in rows}
    scores = {f: np.arange(32, 0, -1, dtype=np.float64) for f in rows}
    expected = allocate(scores, Budget("params", kappa=cfg.budget), control, rows, min_score=Toy.min_score)
    assert w0["search"]["method"] == "toy" and w0["reallocation"]["source"] == "daemon"
    assert w0["reallocation"]["method"] == "toy" and w0["reallocation"]["dims"] == expected.dims
    assert w1["arms"]["slim"]["dims"] == expected.dims
    # the toy's floor, read from the class, held: without it every field would keep 2 blocks
    assert set(expected.dims.values()) == {4}
    assert set(allocate(scores, Budget("params", kappa=cfg.budget), control, rows).dims.values()) == {8}
    # the same scores again: the average does not move, the gain is 0, the slim arm is kept
    assert w1["search"]["gain_over_current"] == 0.0 and "reallocation" not in w1
