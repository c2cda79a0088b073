"""One YAML file per pipeline, validated with pydantic.

Every section forbids unknown keys so that a typo fails loudly (`ConfigError` names the key and,
for choices, the allowed values) instead of silently falling back to a default.

The YAML is read by a strict safe loader (`_StrictLoader`): no anchors or aliases (a few lines of
aliases expand to billions of values), no key given twice (the second would silently win), no tags
beyond YAML's plain types (`!!python/...`), at most `MAX_CONFIG_BYTES` and `MAX_DEPTH` levels of
nesting; every error names the line. Error messages are bounded in size whatever the input.
"""

from __future__ import annotations

import string
from pathlib import Path
from typing import Any, Literal

import yaml
from yaml.events import AliasEvent, CollectionStartEvent, NodeEvent
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from recaug.errors import UsageError


class ConfigError(UsageError, ValueError):
    """A config file that cannot be used; the message is meant for the person who wrote it."""


class _Section(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


def _check_range(section: BaseModel, low: str, high: str, where: str) -> None:
    lo, hi = getattr(section, low), getattr(section, high)
    if lo > hi:
        raise ValueError(f"{where}.{low} ({lo:g}) is above {where}.{high} ({hi:g}): nothing could pass; swap them")


class TableSource(_Section):
    """A bring-your-own table: a parquet or csv file and how its columns map to ours."""

    path: str
    format: Literal["parquet", "csv"] | None = None  # default: from the file suffix
    # ours -> theirs, e.g. {user_id: customer, timestamp: event_time}
    columns: dict[str, str] = Field(default_factory=dict)
    csv_delimiter: str = ","
    # for list columns stored as text (e.g. "Action|Comedy")
    list_separator: str = "|"
    # how a non-numeric timestamp column is parsed (strftime format); numbers are unix seconds
    timestamp_format: str | None = None


class DatasetConfig(_Section):
    kind: Literal["ml100k", "files"] = "ml100k"
    domain: Literal["movies", "books", "news"] = "movies"
    users: TableSource | None = None
    items: TableSource | None = None
    interactions: TableSource | None = None

    @model_validator(mode="after")
    def _files_need_tables(self):
        if self.kind == "files":
            missing = [n for n in ("users", "items", "interactions") if getattr(self, n) is None]
            if missing:
                raise ValueError(f"dataset.kind 'files' needs dataset.{', dataset.'.join(missing)}")
        return self


class InputGateConfig(_Section):
    # share of rows (per table) that may be quarantined before the run stops
    max_quarantine_share: float = Field(0.01, ge=0.0, le=1.0)
    rating_min: float = Field(0.0, allow_inf_nan=False)
    rating_max: float = Field(5.0, allow_inf_nan=False)
    timestamp_min: int = 0  # 1970
    # rows dated after `as_of` (or now) + this slack are quarantined as future timestamps
    future_slack_s: int = Field(86_400, ge=0)
    max_text_chars: int = Field(20_000, gt=0)
    # users.age outside [age_min, age_max] is quarantined (a negative age must not reach a prompt)
    age_min: int = Field(0, ge=0)
    age_max: int = Field(130, ge=0)

    @model_validator(mode="after")
    def _ranges_are_ranges(self):
        _check_range(self, "rating_min", "rating_max", "input_gate")
        _check_range(self, "age_min", "age_max", "input_gate")
        return self


class SplitConfig(_Section):
    # KAR protocol: per user, the oldest part of the history is prompt context only
    prompt_share: float = Field(0.5, gt=0.0, lt=1.0)
    prompt_cap: int = Field(30, ge=1)
    # the CTR samples after it are split by global time quantiles
    valid_share: float = Field(0.1, gt=0.0, lt=0.5)
    test_share: float = Field(0.1, gt=0.0, lt=0.5)
    click_threshold: float = 3.0  # label = rating > click_threshold


class ChaosConfig(_Section):
    """Failure injection around the engine (docs/engines.md, "Chaos testing"): the share of requests
    whose answer is replaced by a malformed, truncated or empty one or an error, and the share of
    engine calls that raise. Deterministic per request key and seed."""

    malformed: float = Field(0.0, ge=0.0, le=1.0)
    truncated: float = Field(0.0, ge=0.0, le=1.0)
    empty: float = Field(0.0, ge=0.0, le=1.0)
    error: float = Field(0.0, ge=0.0, le=1.0)
    exception: float = Field(0.0, ge=0.0, le=1.0)
    seed: int = 0

    @model_validator(mode="after")
    def _shares_fit(self):
        total = self.malformed + self.truncated + self.empty + self.error
        if total > 1.0 + 1e-9:
            raise ValueError(f"malformed + truncated + empty + error add up to {total:g}, more than 1")
        return self

    def shares(self) -> dict[str, float]:
        return {k: getattr(self, k) for k in ("malformed", "truncated", "empty", "error", "exception")}


class EngineConfig(_Section):
    kind: Literal["transformers", "vllm", "http", "fake"] = "transformers"
    # "smollm2" is the packaged SmolLM2-135M-Instruct; otherwise a local folder or a served model name
    model: str = "smollm2"
    revision: str = "packaged"
    device: str = "cpu"
    batch_size: int = Field(16, ge=1)
    max_new_tokens: int = Field(96, ge=1)
    temperature: float = Field(0.0, ge=0.0)
    top_p: float = Field(1.0, gt=0.0, le=1.0)
    seed: int = 0
    max_attempts: int = Field(2, ge=1, le=10)
    # transformers engine: constrain JSON answers to the augmenter's schema (llguidance); false = parse only
    constrained_decoding: bool = True
    # http engine
    base_url: str | None = None
    api_key_env: str = "RECAUG_API_KEY"
    concurrency: int = Field(8, ge=1)
    timeout_s: float = Field(60.0, gt=0)
    max_retries: int = Field(4, ge=0)
    # vllm engine
    gpu_memory_utilization: float = Field(0.85, gt=0.0, le=1.0)
    # more keyword arguments for vllm.LLM, passed verbatim (max_model_len, dtype, tensor_parallel_size, ...)
    vllm_args: dict[str, Any] = Field(default_factory=dict)
    # chaos testing: wrap the engine above in a failure injector (None: off)
    chaos: ChaosConfig | None = None

    @field_validator("vllm_args")
    @classmethod
    def _vllm_args_leave_ours_alone(cls, value: dict[str, Any]) -> dict[str, Any]:
        taken = {"model": "engine.model", "tokenizer": "engine.model", "seed": "engine.seed",
                 "gpu_memory_utilization": "engine.gpu_memory_utilization"}
        clashes = [f"{k} (set {taken[k]})" for k in sorted(value) if k in taken]
        if clashes:
            raise ValueError(f"engine.vllm_args may not set {', '.join(clashes)}")
        return value


class AugmenterConfig(_Section):
    name: str
    enabled: bool = True
    # at most this many entities per run (None = all); picks a deterministic sample
    max_entities: int | None = Field(None, ge=1)
    # token budget of the history part of the prompt (oldest items dropped first)
    history_token_budget: int = Field(600, ge=16)
    max_new_tokens: int | None = Field(None, ge=1)
    options: dict[str, Any] = Field(default_factory=dict)


class RunnerConfig(_Section):
    kind: Literal["local", "ray", "beam"] = "local"
    shard_size: int = Field(32, ge=1)  # rows committed to the cache at a time
    # entities the augmentation stage holds at once (memory); each chunk with cache misses is one
    # execute on the runner, which costs Ray/Beam a fixed start-up (raise it there for big jobs)
    chunk_entities: int = Field(10_000, ge=1)
    # ray
    num_actors: int | None = None
    cpus_per_actor: float = Field(0.5, gt=0.0)
    gpus_per_actor: float = Field(0.0, ge=0.0)
    # beam: extra pipeline options passed through verbatim (e.g. --runner=DataflowRunner ...)
    beam_options: list[str] = Field(default_factory=list)


class EncoderConfig(_Section):
    # "minilm" is the packaged all-MiniLM-L6-v2; otherwise a local folder
    model: str = "minilm"
    pooling: Literal["mean", "cls", "last"] = "mean"
    normalize: bool = True
    batch_size: int = Field(64, ge=1)
    max_length: int = Field(256, ge=8)
    pca_dim: int | None = Field(None, ge=1)
    device: str = "cpu"


class AugmenterGateConfig(_Section):
    """Per-augmenter overrides of the output gate's per-augmenter floors (unset = the global value)."""

    min_coverage: float | None = Field(None, ge=0.0, le=1.0)
    min_parse_rate: float | None = Field(None, ge=0.0, le=1.0)
    max_dead_letter_share: float | None = Field(None, ge=0.0, le=1.0)


class OutputGateConfig(_Section):
    min_coverage: float = Field(0.95, ge=0.0, le=1.0)
    min_parse_rate: float = Field(0.8, ge=0.0, le=1.0)
    max_dead_letter_share: float = Field(0.2, ge=0.0, le=1.0)
    # e.g. {llmrec_implicit_feedback: {min_parse_rate: 0.1}}: a hard JSON task on a small model
    # needs its own floor without lowering everyone else's
    augmenters: dict[str, AugmenterGateConfig] = Field(default_factory=dict)

    def floor(self, augmenter: str, key: str) -> float:
        override = self.augmenters.get(augmenter)
        value = getattr(override, key) if override is not None else None
        return getattr(self, key) if value is None else value
    min_norm: float = Field(0.5, ge=0.0)
    max_norm: float = Field(1.5, gt=0.0)
    min_text_chars: int = Field(1, ge=0)
    max_text_chars: int = Field(20_000, ge=1)

    @model_validator(mode="after")
    def _ranges_are_ranges(self):
        _check_range(self, "min_norm", "max_norm", "output_gate")
        _check_range(self, "min_text_chars", "max_text_chars", "output_gate")
        return self


class PublishConfig(_Section):
    keep_snapshots: int = Field(5, ge=1)


class ScheduleConfig(_Section):
    long_every_s: int = Field(7 * 86_400, ge=60)
    short_every_s: int = Field(86_400, ge=60)
    long_max_entities: int | None = Field(None, ge=1)
    long_max_tokens: int | None = Field(None, ge=1)


class CTRConfig(_Section):
    models: list[str] = Field(default_factory=lambda: ["deepfm", "dcn", "din", "autoint", "xdeepfm", "wdl"])
    adaptor: Literal["hybrid", "mlp", "raw", "none"] = "hybrid"
    seeds: list[int] = Field(default_factory=lambda: [0, 1, 2])
    epochs: int = Field(10, ge=1)
    patience: int = Field(2, ge=0)
    batch_size: int = Field(1024, ge=1)
    learning_rate: float = Field(1e-3, gt=0)
    embedding_dim: int = Field(16, ge=1)
    synthetic_rate: float = Field(0.0, ge=0.0)
    history_len: int = Field(20, ge=1)
    # KAR hybrid-expert adaptor: experts shared by all vectors, and dedicated to each vector
    adaptor_shared_experts: int = Field(2, ge=2, le=5)
    adaptor_dedicated_experts: int = Field(2, ge=2, le=6)
    # which published embedding tables the CTR models take (KAR's two by default)
    vector_augmenters: list[str] = Field(default_factory=lambda: ["kar_user_preference", "kar_item_knowledge"])


class PipelineConfig(_Section):
    name: str = Field(pattern=r"^[A-Za-z0-9_.-]+$")
    # where caches, runs and snapshots live; relative paths are relative to the config file
    workdir: str = ".recaug/{name}"
    dataset: DatasetConfig = DatasetConfig()
    input_gate: InputGateConfig = InputGateConfig()
    split: SplitConfig = SplitConfig()
    engine: EngineConfig = EngineConfig()
    runner: RunnerConfig = RunnerConfig()
    augmenters: list[AugmenterConfig] = Field(default_factory=list)
    # extra Python modules (importable, or .py paths relative to this file) that @register augmenters
    augmenter_modules: list[str] = Field(default_factory=list)
    encoder: EncoderConfig = EncoderConfig()
    output_gate: OutputGateConfig = OutputGateConfig()
    publish: PublishConfig = PublishConfig()
    schedule: ScheduleConfig = ScheduleConfig()
    ctr: CTRConfig = CTRConfig()

    # set by load_config, not by the file
    source_path: str | None = Field(None, exclude=True)

    @field_validator("workdir")
    @classmethod
    def _workdir_fields(cls, value: str) -> str:
        return check_workdir_template(value)

    @field_validator("augmenters")
    @classmethod
    def _unique_augmenters(cls, v: list[AugmenterConfig]):
        names = [a.name for a in v]
        dup = sorted({n for n in names if names.count(n) > 1})
        if dup:
            raise ValueError(f"augmenter listed twice: {', '.join(dup)}")
        return v

    @model_validator(mode="after")
    def _gate_overrides_name_augmenters(self):
        unknown = sorted(set(self.output_gate.augmenters) - {a.name for a in self.augmenters})
        if unknown:
            raise ValueError(
                f"output_gate.augmenters names {', '.join(unknown)}, which the augmenters list does not have "
                f"(listed: {', '.join(a.name for a in self.augmenters) or 'none'})"
            )
        return self

    def workdir_path(self) -> Path:
        return self.resolve_path(self.workdir.format(name=self.name))

    def resolve_path(self, path: str) -> Path:
        """A data path from the config: relative paths are relative to the config file."""
        p = Path(path).expanduser()
        if not p.is_absolute() and self.source_path:
            p = Path(self.source_path).parent / p
        return p.resolve()

    def import_augmenter_modules(self) -> None:
        import importlib
        import importlib.util
        import sys

        for mod in self.augmenter_modules:
            if mod.endswith(".py"):
                path = self.resolve_path(mod)
                name = f"recaug_user_augmenters_{path.stem}"
                if name in sys.modules:
                    continue
                spec = importlib.util.spec_from_file_location(name, path)
                if spec is None or not path.exists():
                    raise ConfigError(f"augmenter_modules: {path} not found")
                module = importlib.util.module_from_spec(spec)
                sys.modules[name] = module
                spec.loader.exec_module(module)
            else:
                try:
                    importlib.import_module(mod)
                except ImportError as exc:
                    raise ConfigError(f"augmenter_modules: cannot import {mod!r}: {exc}") from None

    def hash_view(self) -> dict[str, Any]:
        return self.model_dump(mode="json")


def check_workdir_template(value: str) -> str:
    """`workdir` may use the one field `{name}` (the pipeline's name); `{{` and `}}` are literal braces."""
    try:
        parts = list(string.Formatter().parse(value))
    except ValueError as exc:
        raise ValueError(f"{_cut(value)} is not a valid template ({exc}); the only field is {{name}}, "
                         "write {{ and }} for literal braces") from None
    for _, field_name, spec, conversion in parts:
        if field_name is None:
            continue
        if field_name != "name" or spec or conversion:
            shown = "{" + field_name + (f"!{conversion}" if conversion else "") + (f":{spec}" if spec else "") + "}"
            raise ValueError(f"{_cut(shown)} is not allowed in workdir; the only field is {{name}} (the pipeline's "
                             "name), write {{ and }} for literal braces")
    return value


# a config error shows at most this many problems and this many characters of a bad value
MAX_ERRORS_SHOWN = 20
MAX_VALUE_CHARS = 120


def _cut(value: Any, limit: int = MAX_VALUE_CHARS) -> str:
    text = value if isinstance(value, str) else repr(value)
    return text if len(text) <= limit else f"{text[:limit]}... ({len(text):,} characters)"


def _format_validation_error(exc: ValidationError, origin: str) -> str:
    lines = [f"invalid config {origin}:"]
    errors = exc.errors()
    for err in errors[:MAX_ERRORS_SHOWN]:
        loc = _cut(".".join(str(p) for p in err["loc"]) or "(top level)")
        kind = err["type"]
        if kind == "extra_forbidden":
            lines.append(f"  - {loc}: unknown key (check the spelling; see docs/config.md for the keys)")
        elif kind == "literal_error":
            allowed = err.get("ctx", {}).get("expected", "")
            lines.append(f"  - {loc}: {_cut(repr(err['input']))} is not allowed; expected {allowed}")
        elif kind == "missing":
            lines.append(f"  - {loc}: required key is missing")
        else:
            msg = err["msg"].removeprefix("Value error, ")
            lines.append(f"  - {loc}: {_cut(msg, 400)} (got {_cut(repr(err.get('input')))})")
    if len(errors) > MAX_ERRORS_SHOWN:
        lines.append(f"  ... and {len(errors) - MAX_ERRORS_SHOWN:,} more")
    return "\n".join(lines)


def parse_config(data: Any, origin: str = "<dict>", source_path: str | None = None) -> PipelineConfig:
    if not isinstance(data, dict):
        raise ConfigError(f"invalid config {origin}: the top level must be a mapping, got {type(data).__name__}")
    try:
        cfg = PipelineConfig.model_validate(data)
    except ValidationError as exc:
        raise ConfigError(_format_validation_error(exc, origin)) from None
    if source_path:
        cfg = cfg.model_copy(update={"source_path": str(Path(source_path).resolve())})
    _check_workdir_place(cfg, origin)
    return cfg


def _check_workdir_place(cfg: PipelineConfig, origin: str) -> None:
    """A workdir that can never be right: the root of the file system, or an existing file.
    (Whether it can be written is checked when a command is about to write: `ensure_writable`.)"""
    path = cfg.workdir_path()
    if path == Path(path.anchor):
        raise ConfigError(
            f"invalid config {origin}: workdir {cfg.workdir!r} is the root of the file system ({path}); recaug "
            "writes caches, runs and snapshots there and removes its old files: give it a folder of its own"
        )
    if path.exists() and not path.is_dir():
        raise ConfigError(
            f"invalid config {origin}: workdir {path} is an existing file, not a folder; point workdir at a folder "
            "(it is created when missing)"
        )


# --- the YAML reader ---------------------------------------------------------------------------------

MAX_CONFIG_BYTES = 1 << 20  # a pipeline config is a few KB; this bounds what a bad file can cost
MAX_DEPTH = 32
_PLAIN_TAGS = frozenset(f"tag:yaml.org,2002:{t}" for t in ("str", "int", "float", "bool", "null", "seq", "map"))


class _StrictLoader(yaml.SafeLoader):
    """yaml.SafeLoader without anchors, aliases, duplicate keys, exotic tags or deep nesting."""

    def __init__(self, stream):
        super().__init__(stream)
        self._depth = 0

    def compose_node(self, parent, index):
        event = self.peek_event()
        line = f"line {event.start_mark.line + 1}"
        if isinstance(event, AliasEvent):
            raise ConfigError(f"{line}: YAML aliases (*{_cut(event.anchor, 40)}) are not allowed in a config; "
                              "write the value out")
        if isinstance(event, NodeEvent) and event.anchor is not None:
            raise ConfigError(f"{line}: YAML anchors (&{_cut(event.anchor, 40)}) are not allowed in a config; "
                              "write the value out where it is used")
        tag = getattr(event, "tag", None)
        if tag not in (None, "!") and self.resolve_explicit(tag) not in _PLAIN_TAGS:
            shown = tag.replace("tag:yaml.org,2002:", "!!", 1)
            raise ConfigError(f"{line}: the YAML tag {_cut(shown, 60)} is not allowed in a config; "
                              "only plain values, lists and mappings are")
        if isinstance(event, CollectionStartEvent):
            self._depth += 1
            if self._depth > MAX_DEPTH:
                raise ConfigError(f"{line}: nested more than {MAX_DEPTH} levels deep; a config is not that deep")
            try:
                return super().compose_node(parent, index)
            finally:
                self._depth -= 1
        return super().compose_node(parent, index)

    @staticmethod
    def resolve_explicit(tag: str) -> str:
        return tag.replace("!!", "tag:yaml.org,2002:", 1) if tag.startswith("!!") else tag

    def construct_mapping(self, node, deep=False):
        seen: dict[Any, int] = {}
        for key_node, _ in node.value:
            key = self.construct_object(key_node, deep=True)
            try:
                hash(key)
            except TypeError:
                raise ConfigError(f"line {key_node.start_mark.line + 1}: a mapping key must be a plain value") from None
            if key in seen:
                raise ConfigError(
                    f"line {key_node.start_mark.line + 1}: key {_cut(str(key), 60)!s} is given twice (first on line "
                    f"{seen[key]}); the second would silently win: keep one"
                )
            seen[key] = key_node.start_mark.line + 1
        return super().construct_mapping(node, deep=deep)


def read_yaml(text: str, origin: str) -> Any:
    """Parse a config's text with the strict loader; every problem is a bounded ConfigError."""
    if len(text.encode("utf-8", "surrogatepass")) > MAX_CONFIG_BYTES:
        raise ConfigError(f"config {origin} is larger than {MAX_CONFIG_BYTES // 1024} KiB; a pipeline config is a few KB")
    loader = _StrictLoader(text)
    try:
        return loader.get_single_data()
    except ConfigError as exc:
        raise ConfigError(f"config {origin} cannot be used: {exc}") from None
    except yaml.YAMLError as exc:
        lines = [_cut(line, 200) for line in str(exc).splitlines()[:12]]
        raise ConfigError(f"config {origin} is not valid YAML: " + "\n".join(lines)) from None
    except RecursionError:
        raise ConfigError(f"config {origin} is nested too deeply to read") from None
    finally:
        loader.dispose()


def load_config(path: str | Path) -> PipelineConfig:
    path = Path(path)
    if not path.exists():
        raise ConfigError(f"config file not found: {path}")
    if not path.is_file():
        raise ConfigError(f"config {path} is not a file")
    if path.stat().st_size > MAX_CONFIG_BYTES:
        raise ConfigError(f"config {path} is larger than {MAX_CONFIG_BYTES // 1024} KiB; a pipeline config is a few KB")
    try:
        text = path.read_text(encoding="utf-8")
    except UnicodeDecodeError as exc:
        raise ConfigError(f"config {path} is not UTF-8 text ({exc.reason} at byte {exc.start}); save it as UTF-8") from None
    except OSError as exc:
        raise ConfigError(f"config {path} cannot be read: {exc.strerror or exc}") from None
    data = read_yaml(text, str(path))
    return parse_config(data, origin=str(path), source_path=str(path))
