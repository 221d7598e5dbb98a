"""Decode and training throughput for DeepFM on a Criteo-shaped synthetic stream.

Criteo shape: 26 categorical + 13 numeric fields, embedding dim 16, batch 2048. Measures
  - decode rows/s: Arrow RecordBatch -> SparseBatch -> KeyedJaggedTensors (batch 2048),
  - bare rows/s: TorchRec forward/backward/fused update on pre-built KJTs (nothing else),
    in fp32 and (where the CPU has it natively) bf16, the headline at the default precision
    (ModelConfig.precision, `auto`: resolved for this machine),
  - loop rows/s: the daemon's window loop (decode, test-then-train, dead letters,
    checkpoint, summary and plot) over the same stream, counting every second it spends
    except the source's own time generating rows (a broker's job in production; see
    benchmarks/kafka_ingest.py for ingest), at 250k-row windows and again at 2M-row ones
    (an hour of Criteo-scale traffic, where a window's own costs are amortised as in production),
  - the machine's GEMM rate in fp32 and bf16 (one CPU model runs at different speeds from one
    session to the next),
  - levers (issue 15), each measured on and off, interleaved, REPS repetitions, median
    [min-max] rows/s of the bare step: bf16 autocast of the dense part; the concatenated
    embedding output fed to the head as it is (against the per-field split re-concatenated);
    width-grouped bmm projections on a slim-shaped arm (against one matmul per field);
    the bare rate of all four heads in fp32 and bf16; and the sparse side of a bf16 step
    (`sparse_step`): FBGEMM's bounds check, table_wise sharding, row-wise Adagrad, the wide
    collection removed or merged into the deep one, batch 2048 / 4096 / 8192.
Writes benchmarks/results/training.json.  Run: .venv/bin/python benchmarks/training.py
(`--profile-only`: refresh only its `profile`, the top ops of a bare step per precision;
`--headline-only`: only decode, bare and loop, for a run whose first minutes met a load spike;
`--deepfm-levers-only`: only the dense DeepFM levers; `--out PATH`: write there instead, e.g.
another machine's figures beside training.json)
"""

from __future__ import annotations

import json
import os
import platform
import statistics
import sys
import tempfile
import time
import types
from contextlib import contextmanager
from pathlib import Path

import torch
from fbgemm_gpu.split_table_batched_embeddings_ops_common import BoundsCheckMode
from torchrec.modules.embedding_modules import EmbeddingBagCollection

from dimstream.models import ctr, distributed, embedding, heads
from dimstream.models.arm import Arm, ArmSpec
from dimstream.models.config import ModelConfig, cpu_has_bf16, resolve_precision
from dimstream.ops.config import RunConfig
from dimstream.ops.daemon import Runner, make_arm
from dimstream.stream.decode import Decoder
from dimstream.stream.synthetic import SyntheticField, SyntheticSource

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "benchmarks" / "results"

# 250k-row windows keep the run short; an hour of Criteo-scale traffic is ~2M rows, and the
# loop runs again at that window size (HOUR_ROWS), where a window's own costs (checkpoint,
# summary) are amortised as in production
BATCH, DIM, ROWS, WINDOWS = 2048, 16, 250_000, 3
HOUR_ROWS = 2_000_000
LEVER_ROWS, REPS = 100_000, 3  # rows per lever measurement (one pass), repetitions
CRITEO_FIELDS = tuple(
    [
        SyntheticField(f"C{i}", c, r)
        for i, (c, r) in enumerate(
            [
                (100_000, 8),
                (50_000, 4),
                (20_000, 4),
                (10_000, 8),
                (5_000, 2),
                (2_000, 4),
                (1_000, 8),
                (500, 4),
                (300, 2),
                (200, 4),
                (100, 2),
                (50, 2),
                (30, 1),
                (20, 1),
                (10, 2),
                (5, 1),
                (3, 1),
                (2, 1),
                (100_000, 0),
                (20_000, 0),
                (5_000, 0),
                (1_000, 0),
                (100, 0),
                (10, 0),
                (4, 0),
                (2, 0),
            ],
            start=1,
        )
    ]
    + [SyntheticField(f"I{i}", 0, 1 if i <= 8 else 0, kind="numeric") for i in range(1, 14)]
)


def criteo_source(**kw) -> SyntheticSource:
    return SyntheticSource(seed=0, **{"rows_per_window": ROWS} | kw, fields=CRITEO_FIELDS)


def bench_decode(src: SyntheticSource) -> float:
    dec = Decoder(src.schema)
    table = src.window_table(0)
    batches = table.to_batches(max_chunksize=BATCH * 8)
    t0 = time.perf_counter()
    for rb in batches:
        sb = dec.decode(rb).batch
        for s in range(0, len(sb), BATCH):
            sb.slice(s, min(s + BATCH, len(sb))).to_kjt()
    return table.num_rows / (time.perf_counter() - t0)


def _kjts(src: SyntheticSource, feature_names: list[str], rows: int, batch: int = BATCH) -> list[tuple]:
    """The stream's first `rows` rows as ready-made (KJT, labels) batches."""
    out, w = [], 0
    while len(out) * batch < rows:
        sb = Decoder(src.schema).decode(src.window_table(w)).batch
        for s in range(0, len(sb) - batch + 1, batch):
            part = sb.slice(s, s + batch)
            out.append((part.to_kjt(feature_names), part.labels_tensor()))
        w += 1
    return out[: rows // batch]


def _arm(src: SyntheticSource, model: str = "deepfm", precision: str | None = None, dims=None, **config) -> Arm:
    cfg = ModelConfig(model, batch_size=BATCH, interaction_dim=DIM, **config)
    if precision is not None:
        cfg.precision = precision
    dims = dims or {f: DIM for f in src.schema.feature_names}
    return Arm(ArmSpec("control", dims), src.schema.num_embeddings, set(), cfg)


def _rate(arm: Arm, kjts: list[tuple]) -> float:
    for kjt, y in kjts[:3]:  # warm-up: first-touch allocations, autocast caches
        _step(arm, kjt, y)
    t0 = time.perf_counter()
    for kjt, y in kjts:
        _step(arm, kjt, y)
    return sum(y.numel() for _, y in kjts) / (time.perf_counter() - t0)


def bench_bare(src: SyntheticSource, precision: str | None = None) -> float:
    """One pass over the loop's rows (ROWS x WINDOWS), at the default precision unless given."""
    arm = _arm(src, precision=precision)
    return _rate(arm, _kjts(src, arm.feature_names, ROWS * WINDOWS))


def bench_mlp_alone(src: SyntheticSource, precision: str = "fp32", rows: int = 40 * BATCH) -> float:
    """The bound the issue measures against: DeepFM's MLP alone (its input as wide as the
    concatenated embeddings, the same sizes and init), forward, backward and Adam on dense
    random input in batches of BATCH, in fp32 or under bf16 autocast: no embeddings, no FM
    term, no first order."""
    width = DIM * len(src.schema.feature_names)  # the arms here: every field at width DIM
    dnn = heads.mlp([width, *ModelConfig().mlp, 1])
    opt = torch.optim.Adam(dnn.parameters(), lr=1e-3)
    gen = torch.Generator().manual_seed(0)
    batches = [
        (torch.randn(BATCH, width, generator=gen), torch.randint(0, 2, (BATCH,), generator=gen).float())
        for _ in range(rows // BATCH)
    ]

    def step(x, y):
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=precision == "bf16"):
            logits = dnn(x).squeeze(-1)
        loss = torch.nn.functional.binary_cross_entropy_with_logits(logits.float(), y)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()

    for x, y in batches[:3]:
        step(x, y)
    t0 = time.perf_counter()
    for x, y in batches:
        step(x, y)
    return rows / (time.perf_counter() - t0)


def bench_gemm(reps: int = 50) -> dict:
    """This machine's GEMM rate (GFLOP/s) at the MLP's first layer (2048 x 624 x 256) and at
    4096^3, fp32 and bf16: the speed of the same CPU model differs between sessions."""
    out = {}
    for name, dtype in (("fp32", torch.float32), ("bf16", torch.bfloat16)):
        for m, k, n in ((BATCH, 624, 256), (4096, 4096, 4096)):
            a, b = torch.randn(m, k, dtype=dtype), torch.randn(k, n, dtype=dtype)
            a @ b
            times = reps if m == BATCH else 3  # a 4096^3 product takes ~0.5 s
            t0 = time.perf_counter()
            for _ in range(times):
                a @ b
            out[f"{name}_{m}x{k}x{n}"] = 2 * m * k * n * times / (time.perf_counter() - t0) / 1e9
    return out


@contextmanager
def _list_path():
    """The hot path as it was: the collection's output split per field, then re-concatenated
    by the head (torch.cat for the DNN, torch.stack for the FM part)."""
    fwd = ctr.CTRModel.forward

    def forward(self, kjt, column_mask=None):
        embs, wide = self.embedding(kjt, column_mask)
        device = kjt.values().device.type
        with torch.autocast(device, dtype=torch.bfloat16, enabled=self._bf16(device)):
            return self.head(embs, wide if wide is not None else 0.0).float()

    ctr.CTRModel.forward = forward
    try:
        yield
    finally:
        ctr.CTRModel.forward = fwd


@contextmanager
def _per_field_projections():
    """Projections as they were: one matmul per projected field, then a stack."""
    fwd = heads.FieldProjections.forward

    def forward(self, embs):
        embs = heads.as_fields(embs, self.dims)
        return torch.stack([e if i < 0 else e @ self.weights[i].t() for e, i in zip(embs, self.index)], dim=1)

    heads.FieldProjections.forward = forward
    try:
        yield
    finally:
        heads.FieldProjections.forward = fwd


@contextmanager
def _nothing():
    yield


@contextmanager
def _plain_deepfm_inputs():
    """DeepFM's two uses of the concatenation as autograd builds them (before): the DNN input
    and fm_interaction over its view, e's gradient summed by autograd."""
    fwd = heads.DeepFMHead.forward
    heads.DeepFMHead.forward = heads.DeepFMHead.plain_forward
    try:
        yield
    finally:
        heads.DeepFMHead.forward = fwd


def _interleaved(src, kjts, variants: dict) -> dict:
    """variants: name -> (arm factory, context); REPS rounds, each variant once per round."""
    arms = {name: make() for name, (make, _) in variants.items()}
    rates = {name: [] for name in variants}
    for _ in range(REPS):
        for name, (_, context) in variants.items():
            with context():
                rates[name].append(_rate(arms[name], kjts))
    return {n: _summary(r) for n, r in rates.items()}


@contextmanager
def _patched(module, name: str, value):
    """module.name = value while an arm is built (sharding plan, collections)."""
    old = getattr(module, name)
    setattr(module, name, value)
    try:
        yield
    finally:
        setattr(module, name, old)


def _built_under(context, **arm_kw):
    """An arm factory that builds the arm inside `context` (it shapes the arm, not the step)."""

    def make():
        with context:
            return _arm(criteo_source(), **arm_kw)

    return make


@contextmanager
def _wide_in_deep():
    """The first-order tables as further tables of the deep collection (shared features: one
    FBGEMM lookup for both), the wide sum read off the collection's last columns."""
    init = embedding.MixedEmbedding.__init__

    def merged_concat(self, kjt):
        v = self.deep(kjt).values()
        return v[:, : self._deep_width], v[:, self._deep_width :].sum(dim=1)

    def merged_init(self, *a, **kw):
        init(self, *a, **kw)
        configs = self.deep.embedding_bag_configs() + self.wide.embedding_bag_configs()
        self.deep, self.wide = EmbeddingBagCollection(configs, device=torch.device("meta")), None
        self._deep_width = sum(self.dims.values())
        self.forward_concat = types.MethodType(merged_concat, self)  # this arm only

    embedding.MixedEmbedding.__init__ = merged_init
    try:
        yield
    finally:
        embedding.MixedEmbedding.__init__ = init


def bench_step_levers(src: SyntheticSource) -> dict:
    """The sparse side of a bf16 DeepFM step: FBGEMM's bounds check, the sharding type, the
    sparse optimizer, the wide collection (removed: the upper bound of any merge; merged into
    the deep one), and the batch size (rows/s only: see the README for its AUC)."""
    kjts = _kjts(src, src.schema.feature_names, LEVER_ROWS)
    bf16 = {"precision": "bf16"}
    variants = {
        "bf16, FBGEMM bounds check on (before)": _built_under(
            _patched(distributed, "BOUNDS_CHECK", BoundsCheckMode.WARNING), **bf16
        ),
        "bf16, bounds check off (default)": _built_under(_nothing(), **bf16),
        "bf16, table_wise only (planner: column_wise)": _built_under(
            _patched(distributed, "SHARDING_TYPES", distributed.SHARDING_TYPES | {"cpu": ["table_wise"]}), **bf16
        ),
        "bf16, row-wise Adagrad": _built_under(_nothing(), sparse_optimizer="rowwise_adagrad", **bf16),
        "bf16, no wide collection (upper bound of a merge)": _built_under(
            _patched(ctr, "USES_WIDE", ctr.USES_WIDE | {"deepfm": False}), **bf16
        ),
        "bf16, wide tables in the deep collection": _built_under(_wide_in_deep(), **bf16),
    }
    out = _interleaved(src, kjts, {n: (make, _nothing) for n, make in variants.items()})
    batches = {b: _kjts(src, src.schema.feature_names, LEVER_ROWS, b) for b in (BATCH, 2 * BATCH, 4 * BATCH)}
    arms = {b: _arm(src, precision="bf16") for b in batches}
    rates = {b: [] for b in batches}
    for _ in range(REPS):
        for b in batches:
            rates[b].append(_rate(arms[b], batches[b]))
    out |= {f"bf16, batch {b}": _summary(r) for b, r in rates.items()}
    return out


def _summary(r: list[float]) -> dict:
    return {"median": statistics.median(r), "min": min(r), "max": max(r), "runs": r}


def slim_dims(src: SyntheticSource) -> dict[str, int]:
    """A slim-shaped allocation: widths 4, 8, 12 (projected to k = 16) and 16, by field."""
    return {f: (4, 8, 12, 16)[i % 4] for i, f in enumerate(src.schema.feature_names)}


def bench_levers(src: SyntheticSource) -> dict:
    kjts = _kjts(src, src.schema.feature_names, LEVER_ROWS)
    out = {"deepfm": bench_deepfm_levers(src, kjts), "projections": bench_projection_levers(src, kjts)}
    models = {}
    for model in ("deepfm", "wdl", "fm", "dcnv2"):
        variants = {p: (lambda m=model, p=p: _arm(src, m, precision=p), _nothing) for p in ("fp32", "bf16")}
        models[model] = _interleaved(src, kjts, variants)
    out["heads"] = models
    out["sparse_step"] = bench_step_levers(src)
    return out


def bench_deepfm_levers(src: SyntheticSource, kjts: list[tuple]) -> dict:
    """The dense side of a uniform DeepFM step, interleaved: precision, the concatenated
    output, and the one autograd node for the DNN input and the FM term."""
    deepfm = {
        "fp32, per-field split re-concatenated (before)": (lambda: _arm(src, precision="fp32"), _list_path),
        "fp32, concatenated output as it is": (lambda: _arm(src, precision="fp32"), _nothing),
        "bf16 autocast, per-field split re-concatenated": (lambda: _arm(src, precision="bf16"), _list_path),
        "bf16 autocast, concatenated output as it is": (lambda: _arm(src, precision="bf16"), _nothing),
        "fp32, DeepFM inputs as two autograd uses (before)": (
            lambda: _arm(src, precision="fp32"),
            _plain_deepfm_inputs,
        ),
        "bf16, DeepFM inputs as two autograd uses (before)": (
            lambda: _arm(src, precision="bf16"),
            _plain_deepfm_inputs,
        ),
    }
    return _interleaved(src, kjts, deepfm)


def bench_projection_levers(src: SyntheticSource, kjts: list[tuple]) -> dict:
    slim = {
        "slim-shaped, fp32, one matmul per field (before)": (
            lambda: _arm(src, precision="fp32", dims=slim_dims(src)),
            _per_field_projections,
        ),
        "slim-shaped, fp32, one bmm per width": (lambda: _arm(src, precision="fp32", dims=slim_dims(src)), _nothing),
        "slim-shaped, bf16, one bmm per width": (lambda: _arm(src, precision="bf16", dims=slim_dims(src)), _nothing),
    }
    return _interleaved(src, kjts, slim)


def _step(arm, kjt, y):
    loss = arm.loss_fn(arm.model(kjt), y)
    arm.dense_optimizer.zero_grad(set_to_none=True)
    loss.backward()
    arm.dense_optimizer.step()


def bench_loop(rows_per_window: int = ROWS) -> dict:
    with tempfile.TemporaryDirectory() as state:
        cfg = RunConfig(
            arms=("control",),
            windows=WINDOWS,
            state_dir=Path(state),
            metrics_addr="127.0.0.1:0",
            progress=False,
            rows_per_window=rows_per_window,
            control_dim=DIM,
            model=ModelConfig("deepfm", batch_size=BATCH),
        )
        source = criteo_source(rows_per_window=rows_per_window)
        arm = make_arm(ArmSpec("control", {f: DIM for f in source.schema.feature_names}), source.schema, cfg.model)
        runner = Runner(cfg, source, [arm])
        t0 = time.perf_counter()
        summary = runner.run()
        # the source's own cost (generating rows here, a broker in production) is not the loop's
        elapsed = time.perf_counter() - t0 - runner.source.generate_seconds
    rows = sum(w["rows"] for w in summary["windows"])
    train = [w["arms"]["control"]["train_rows_per_s"] for w in summary["windows"]]
    phases = {
        k: sum(w.get(k, 0.0) for w in summary["windows"])
        for k in ("read_seconds", "checkpoint_seconds", "summary_seconds")
    }
    return {
        "rows": rows,
        "seconds_excluding_source": elapsed,
        "source_seconds": runner.source.generate_seconds,
        "rows_per_s": rows / elapsed,
        "train_only_rows_per_s": train,
        "phase_seconds": phases,
    }


def bench_profile(src: SyntheticSource, steps: int = 10, top: int = 12) -> dict:
    """Where a bare DeepFM step spends its time, per precision: the top ops by self CPU time."""
    from torch.profiler import ProfilerActivity, profile

    kjts = _kjts(src, src.schema.feature_names, (steps + 5) * BATCH)
    out = {}
    for precision in ("fp32", "bf16"):
        arm = _arm(src, precision=precision)
        rate = _rate(arm, kjts)
        with profile(activities=[ProfilerActivity.CPU]) as prof:
            for kjt, y in kjts[:steps]:
                _step(arm, kjt, y)
        events = sorted(prof.key_averages(), key=lambda e: -e.self_cpu_time_total)
        total = sum(e.self_cpu_time_total for e in events)
        out[precision] = {
            "rows_per_s": rate,
            "self_cpu_share": {e.key: round(e.self_cpu_time_total / total, 4) for e in events[:top]},
        }
    return out


def main() -> None:
    # --out PATH: another machine's figures beside training.json (the README names each CPU)
    out = Path(sys.argv[sys.argv.index("--out") + 1]) if "--out" in sys.argv else RESULTS / "training.json"
    torch.manual_seed(0)
    src = criteo_source()
    if "--profile-only" in sys.argv:  # refresh the profile alone, keep the other figures
        _update(out, {"profile": bench_profile(src) | {"load_average_at_start": _load()}})
        return
    if "--headline-only" in sys.argv:  # refresh decode, bare and loop alone (a run disturbed by load)
        _update(out, _headline(src), create=True)
        return
    if "--deepfm-levers-only" in sys.argv:  # refresh the dense DeepFM levers alone
        levers = json.loads(out.read_text())["levers"]
        levers["deepfm"] = bench_deepfm_levers(src, _kjts(src, src.schema.feature_names, LEVER_ROWS))
        _update(out, {"levers": levers, "deepfm_levers_load_average_at_start": _load()})
        return
    precision = ModelConfig().precision
    result = {
        "what": "DeepFM, Criteo-shaped synthetic stream (26 categorical + 13 numeric fields), dim 16, batch 2048",
        "machine": {
            "cpus": os.cpu_count(),
            "torch_threads": torch.get_num_threads(),
            "python": platform.python_version(),
            "torch": torch.__version__,
            "cpu_bf16": cpu_has_bf16(),
            "load_average_at_start": _load(),
        },
        "precision": {"default": precision, "resolved": resolve_precision(precision, "cpu")},
        "target_bare_rows_per_s": 200_000,
        **_headline(src),
        "levers": bench_levers(src),
        "profile": bench_profile(src) | {"load_average_at_start": _load()},
    }
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=1) + "\n")
    print(json.dumps(result, indent=1))


def _headline(src: SyntheticSource) -> dict:
    """Decode, bare (fp32, and bf16 where the CPU has it natively; `bare_train_rows_per_s` at
    the default precision as resolved here), the MLP alone, the loop (default precision), and
    the issue's checks on them."""
    load = _load()
    decode = bench_decode(src)
    # fp32 everywhere; bf16 only where the CPU computes it natively (emulated it says nothing)
    by_precision = {p: bench_bare(src, p) for p in ("fp32", "bf16") if p == "fp32" or cpu_has_bf16()}
    default = resolve_precision(ModelConfig().precision, "cpu")
    bare = by_precision[default]
    alone = {p: bench_mlp_alone(src, p) for p in by_precision}
    loop = bench_loop()
    overhead = bare / loop["rows_per_s"] - 1
    hour = bench_loop(HOUR_ROWS)  # the per-window costs (checkpoint, summary) as an hour amortises them
    return {
        "gemm_gflops": bench_gemm(),
        "decode_rows_per_s": decode,
        "bare_train_rows_per_s": bare,
        "bare_precision": default,
        "bare_fp32_train_rows_per_s": by_precision["fp32"],
        "bare_bf16_train_rows_per_s": by_precision.get("bf16"),
        "mlp_alone_fp32_rows_per_s": alone["fp32"],
        "mlp_alone_bf16_rows_per_s": alone.get("bf16"),
        "bare_over_mlp_alone": bare / alone[default],  # same precision
        "loop_rows_per_s": loop["rows_per_s"],
        "loop": loop,
        "loop_overhead_vs_bare": overhead,
        "loop_hour_windows_rows_per_s": hour["rows_per_s"],
        "loop_hour_windows": hour,
        "loop_hour_windows_overhead_vs_bare": bare / hour["rows_per_s"] - 1,
        "decode_over_train": decode / bare,
        "headline_load_average_at_start": load,
        "headline_machine": {"cpu": _cpu_model(), "cpu_bf16": cpu_has_bf16(), "torch_threads": torch.get_num_threads()},
        "checks": {
            "loop_overhead_at_most_20pct": overhead <= 0.20,
            "decode_at_least_5x_training": decode >= 5 * bare,
            "bare_at_least_200k_rows_per_s": bare >= 200_000,
        },
    }


def _update(out: Path, fields: dict, create: bool = False) -> None:
    """Replace `fields` in the saved result, keep the rest (a partial rerun)."""
    result = (json.loads(out.read_text()) if out.exists() or not create else {}) | fields
    out.write_text(json.dumps(result, indent=1) + "\n")
    print(json.dumps({k: v for k, v in fields.items() if not isinstance(v, dict)} or fields, indent=1))


def _cpu_model() -> str | None:
    """The CPU's model name: the machines this runs on differ from one session to the next."""
    for line in Path("/proc/cpuinfo").read_text().splitlines() if Path("/proc/cpuinfo").exists() else []:
        if line.startswith("model name"):
            return line.split(":", 1)[1].strip()
    return None


def _load() -> float | None:
    """1-minute load average: other processes on the machine slow every figure down."""
    try:
        return float(Path("/proc/loadavg").read_text().split()[0])
    except OSError:
        return None


if __name__ == "__main__":
    main()
