"""RunConfig: every option of `dimstream run`, from defaults, a TOML file and the command line.

>>> c = RunConfig.from_mapping({"model": "fm", "windows": 3, "window": "1d"})
>>> c.model.model, c.windows, c.window_seconds
('fm', 3, 86400)
"""

from __future__ import annotations

import re
import tomllib
from dataclasses import dataclass, field, fields
from pathlib import Path

from dimstream.models.config import ModelConfig


class ConfigError(ValueError):
    """Bad option or config file: reported as one line, exit code 2."""


def parse_duration(text: str | int) -> int:
    """'1h' -> 3600, '1d' -> 86400, '90s', '15m', or plain seconds."""
    if isinstance(text, int):
        return text
    m = re.fullmatch(r"\s*(\d+)\s*([smhd]?)\s*", str(text))
    if not m or int(m.group(1)) <= 0:
        raise ConfigError(f"bad duration {text!r}: use e.g. 90s, 15m, 1h, 1d")
    return int(m.group(1)) * {"": 1, "s": 1, "m": 60, "h": 3600, "d": 86400}[m.group(2)]


def parse_addr(text: str) -> tuple[str, int]:
    host, sep, port = str(text).rpartition(":")
    if not sep or not port.isdigit() or not host or int(port) > 65535:
        raise ConfigError(f"bad address {text!r}: use HOST:PORT (port 0 picks a free one)")
    return host, int(port)


@dataclass
class RunConfig:
    source: str = "synthetic"
    windows: int = 24  # total windows to have processed in this state dir
    window_seconds: int | None = None  # None: the source's own default (1h synthetic, 1d ml-100k)
    state_dir: Path = Path("dimstream-state")
    metrics_addr: str = "127.0.0.1:9100"
    seed: int = 0
    # the main job shows the A/B: control, the searched slim arm and the uniform arm of the same
    # budget; a control-only run is `arms=("control",)` (--arms control)
    arms: tuple[str, ...] = ("control", "slim", "uniform")
    control_dim: int | None = None  # None: 32 when searching (0, 4, ..., 32 per field), else 16
    # a name of dimstream.search.registry.METHODS, or none; None: the registry's default method
    # when there is a slim arm to re-shape, else none
    search: str | None = None
    budget: float = 0.25  # kappa: slim embedding params <= kappa x control's
    # spend what eq. 12's prefix leaves on the next blocks that fit (search/budget.py Budget.fill):
    # with the gate off it beats uniform on synthetic and ml-100k (benchmarks/results/arms-variants.json)
    budget_fill: bool = True
    search_every: int = 1  # windows between searches (0: only apply cron plans)
    search_rows: int = 8192
    # windows the control trains before the first search: on a barely trained control the saliency
    # and the field check rank fields by how fast their ids are learnt, not by what they carry
    search_warmup: int = 0
    # re-shape the slim arm only if the searched allocation's total saliency beats the slim arm's
    # current columns by this fraction (scored on the same rows); 0 = whenever it differs
    # (0: the gate is off; with the fill, a 5% gate kept early allocations: ml-100k slim -0.0041
    # vs uniform instead of -0.0019, benchmarks/results/arms-variants.json)
    realloc_min_gain: float = 0.0
    # moving average of the searches' column scores, per search_rows rows a search scored (a
    # search on fewer rows decays it less: search/policy.py); 0 = the latest search only
    saliency_decay: float = 0.8
    # held-out field check (search/fieldcheck.py) on this many of a search window's rows, run
    # before the control trains on them; 0 = off, the default. With 8,192 and the pooling below it
    # gives 0 columns to 6 of 6 noise fields on synthetic seeds 0 and 1, slim above uniform; seed 2:
    # 5 of 6, but slim 0.0017 below uniform (benchmarks/results/noise_floor.json). Not the default:
    # it misses slim >= uniform on seed 2 and costs about one window's training per search window
    # (one head forward per field per row), which made the test suite's daemon runs about twice
    # as long
    field_check_rows: int = 0
    # the check keeps a field iff its (averaged) held-out loss increase delta > z x its standard error
    field_check_z: float = 0.5
    # the averaged check drops no field before its effective held-out rows reach this many: a single
    # 8,192-row check, or the first windows' checks on a barely trained control, dropped user_id,
    # ad_campaign and hour_of_day for good (slim -0.0050 vs uniform, benchmarks/results/noise_floor.json);
    # with 8,192 rows a window and decay 0.8 the average reaches 50,000 rows at its 8th window, and
    # never on ml-100k's days (at most 9x a window's rows): there it drops nothing
    field_check_min_rows: int = 50_000
    # SSEDS (search/noisefloor.py): a field whose summed saliency does not exceed the null of eq. 10's
    # per-row noise by this many standard deviations gets 0; None = off
    noise_floor: float | None = None
    # AutoSrh's frequency tiers (section 4.2.1): the slim arm holds one table per (field, tier), an
    # id's tier from its count on the stream (search/counts.py, checkpointed; models/tiers.py);
    # 1 = field level
    tiers: int = 1
    rows_per_window: int = 50_000  # synthetic source
    allowed_lateness: int = 0
    # a row this many seconds ahead of the data around it is bad_event_time, not a new watermark
    # (issue 12 item 3: one event time in 2100 must not starve every later window); 0 or None: off
    max_event_time_skew: int | None = 86400
    idle_timeout: float | None = None
    recent_rows: int = 50_000  # bounded buffer of recent rows kept for `dimstream search`
    progress: bool = True
    export_dir: Path | None = None  # if set: after each window, the slim arm (else control) is
    # exported to EXPORT_DIR/window-<n>, EXPORT_DIR/latest names it
    base_every: int = 24  # with export_dir: a full base every N windows, deltas between
    linger_seconds: float = 0.0  # keep serving /metrics this long after a finite run ends
    grace_seconds: float = 30.0  # on SIGTERM: finish the window if it fits, else abandon it
    schema: dict | None = None  # for files:DIR (and kafka): the declared schema
    kafka: dict = field(default_factory=dict)  # kafka-python security options pass through
    model: ModelConfig = field(default_factory=ModelConfig)

    def __post_init__(self):
        self.validate()

    @classmethod
    def from_mapping(cls, d: dict) -> RunConfig:
        d = dict(d)
        model_keys = {f.name for f in fields(ModelConfig)}
        model = {k: d.pop(k) for k in list(d) if k in model_keys and k != "seed"}
        if isinstance(d.get("model_config"), dict):
            model.update(d.pop("model_config"))
        if "window" in d:
            d["window_seconds"] = parse_duration(d.pop("window"))
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(d) - known)
        if unknown:
            raise ConfigError(f"unknown config key(s): {', '.join(unknown)}")
        for key in ("state_dir", "export_dir"):
            if d.get(key) is not None:
                d[key] = Path(d[key])
        if isinstance(d.get("arms"), str):
            d["arms"] = tuple(a.strip() for a in d["arms"].split(",") if a.strip())
        try:
            model_cfg = ModelConfig(**model, seed=int(d.get("seed", 0)))
            return cls(**d, model=model_cfg)
        except ConfigError:
            raise
        except (TypeError, ValueError) as e:
            raise ConfigError(str(e)) from None

    @classmethod
    def from_toml(cls, path: Path, overrides: dict | None = None) -> RunConfig:
        try:
            with open(path, "rb") as f:
                data = tomllib.load(f)
        except OSError as e:
            raise ConfigError(f"cannot read config {path}: {e.strerror}") from None
        except tomllib.TOMLDecodeError as e:
            raise ConfigError(f"config {path} is not valid TOML: {e}") from None
        data.update(overrides or {})
        return cls.from_mapping(data)

    def validate(self) -> None:
        from dimstream.search.registry import default_name, names

        if self.search is None:
            self.search = default_name() if "slim" in self.arms else "none"
        if self.control_dim is None:
            self.control_dim = 32 if (self.search != "none" or "slim" in self.arms) else 16
        if self.windows < 1:
            raise ConfigError("windows must be >= 1")
        if self.control_dim <= 0 or self.control_dim % 4:
            raise ConfigError("control_dim must be a positive multiple of 4 (FBGEMM fused kernels)")
        if self.search != "none" and self.search not in names():
            raise ConfigError(f"search must be one of {', '.join(names())} or none, got {self.search!r}")
        if not 0 < self.budget <= 1:
            raise ConfigError("budget (kappa) must be in (0, 1]")
        if "control" not in self.arms:
            raise ConfigError("the arms must include control (the super-net the others derive from)")
        for a in self.arms:
            if a not in ("control", "slim", "uniform"):
                raise ConfigError(f"unknown arm {a!r}: use control, slim, uniform")
        parse_addr(self.metrics_addr)
        if self.base_every < 1:
            raise ConfigError("base_every must be >= 1 (1: a full base every window)")
        if self.search_warmup < 0:
            raise ConfigError("search_warmup must be >= 0")
        if self.search_every < 0:
            raise ConfigError("search_every must be >= 0")
        if not 0 <= self.saliency_decay < 1:
            raise ConfigError("saliency_decay must be in [0, 1)")
        if self.field_check_rows < 0 or self.field_check_rows == 1:
            raise ConfigError("field_check_rows must be 0 (off) or at least 2")
        if not self.field_check_z >= 0:
            raise ConfigError("field_check_z must be >= 0")
        if self.field_check_min_rows < 0:
            raise ConfigError("field_check_min_rows must be >= 0")
        if self.tiers < 1 or (self.tiers > 1 and self.search != "autosrh"):
            raise ConfigError(f"tiers must be >= 1, and > 1 only with search autosrh (got {self.tiers}, {self.search})")
        if self.noise_floor is not None and not self.noise_floor >= 0:
            raise ConfigError("noise_floor must be >= 0 standard deviations (or unset: off)")
        if self.noise_floor is not None and self.search != "sseds":
            raise ConfigError(f"noise_floor is a knob of search sseds, not of {self.search!r}")
        if self.max_event_time_skew is not None and self.max_event_time_skew < 0:
            raise ConfigError("max_event_time_skew must be a number of seconds >= 0 (0: no bound)")
        if self.max_event_time_skew == 0:
            self.max_event_time_skew = None
        if not self.realloc_min_gain >= 0:
            raise ConfigError("realloc_min_gain must be >= 0")
