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
from typing import Any, ClassVar, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, SerializeAsAny, ValidationError, create_model, field_validator, model_validator
from yaml.events import AliasEvent, CollectionStartEvent, NodeEvent

from recaug.core.errors import UsageError


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
    # users/items only: extra text columns shown in prompts, {name shown in prompts: their column},
    # e.g. {author: Book-Author}; carried as nullable text columns `attr_<name>`
    attributes: dict[str, str] = Field(default_factory=dict)
    # CSV dialect: the field separator (one character), the file's text encoding (any Python codec:
    # utf-8, latin-1, cp1252, utf-16, ...), the quote character (null: no quoting) and the escape
    # character inside quoted values ("\\" for \"-escaped quotes; null: a quote is doubled "")
    csv_delimiter: str = ","
    encoding: str = "utf-8"
    quote: str | None = '"'
    escape: str | None = None
    # for list columns stored as text (e.g. "Action|Comedy")
    list_separator: str = "|"
    # how a non-numeric timestamp column is parsed (strftime format); numbers are unix seconds
    timestamp_format: str | None = None

    @field_validator("csv_delimiter", "quote", "escape", mode="before")
    @classmethod
    def _one_character(cls, value: Any, info) -> Any:
        if value is None and info.field_name != "csv_delimiter":
            return value
        if not isinstance(value, str) or len(value) != 1:
            what = "empty" if value == "" else (f"{len(value)} characters long" if isinstance(value, str) else type(value).__name__)
            raise ValueError(f"must be exactly one character (e.g. ',' ';' '\\t' '|'); got {value!r}, which is {what}")
        if value in "\r\n":
            raise ValueError("a line break cannot be a CSV delimiter, quote or escape character")
        return value

    @field_validator("encoding")
    @classmethod
    def _known_encoding(cls, value: str) -> str:
        import codecs

        try:
            codecs.lookup(value)
        except LookupError:
            raise ValueError(f"unknown text encoding {value!r}; e.g. utf-8, latin-1, cp1252, utf-16") from None
        return value

    @field_validator("attributes")
    @classmethod
    def _attribute_names(cls, value: dict[str, str]) -> dict[str, str]:
        import re

        bad = [k for k in value if not re.fullmatch(r"[A-Za-z][A-Za-z0-9_]{0,63}", k)]
        if bad:
            raise ValueError(
                f"attribute name(s) {bad} must start with a letter and hold only letters, digits and '_' "
                "(the name is shown in prompts and names the column attr_<name>)"
            )
        return value

    @model_validator(mode="after")
    def _distinct_dialect_characters(self):
        seen: dict[str, str] = {}
        for key in ("csv_delimiter", "quote", "escape"):
            ch = getattr(self, key)
            if ch is None:
                continue
            if ch in seen:
                raise ValueError(f"{seen[ch]} and {key} are both {ch!r}; they must differ")
            seen[ch] = key
        return self


class DatasetConfig(_Section):
    kind: Literal["ml100k", "files"] = "ml100k"
    domain: Literal["movies", "books", "news", "generic"] = "movies"
    users: TableSource | None = None
    items: TableSource | None = None
    interactions: TableSource | None = None
    # rating values that mean "interacted, not rated" (e.g. [0]): such interactions are kept without
    # a rating, so they are labelled as clicks and show no rating in prompts (docs/config.md)
    implicit_ratings: list[float] = Field(default_factory=list)

    @model_validator(mode="after")
    def _files_need_tables(self):
        if self.kind == "files":
            missing = [n for n in ("users", "items", "interactions") if getattr(self, n) is None]
            if missing:
                raise ValueError(f"dataset.kind 'files' needs dataset.{', dataset.'.join(missing)}")
        if self.interactions is not None and self.interactions.attributes:
            raise ValueError("dataset.interactions.attributes: only users and items carry attributes")
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
    # time: the CTR samples are split by global time quantiles (needs real timestamps).
    # by_row_order: for data without timestamps; each user's rows in file order, the first ones
    # prompt context, the last ones valid/test, so every evaluated user also has training rows
    mode: Literal["time", "by_row_order"] = "time"
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


# --- engines: one config class per engine kind -------------------------------------------------------

# Keys that were renamed: an old key is refused with the new name (no silent fallback to a default).
RENAMED_ENGINE_KEYS = {
    "max_attempts": "parse_attempts",  # answers of JSON augmenters that fail to parse, retried
    "max_retries": "http_retries",  # HTTP retries of one request, after its first attempt
}

# kind -> config class; every EngineConfig subclass with a `kind: Literal[...]` registers itself
ENGINE_CONFIGS: dict[str, type["EngineConfig"]] = {}


class EngineConfig(_Section):
    """The keys every engine has. Each engine kind has its own subclass (TransformersConfig,
    VLLMConfig, HTTPConfig, FakeConfig, ...); `engine:` in a pipeline YAML is validated by the class
    its `kind` names (a discriminated union on `kind` over every registered class), so a key another
    engine uses is an error that names the engines that take it.

    `EngineConfig(kind="vllm", ...)` builds the class of that kind; a new engine registers by
    subclassing with `kind: Literal["mine"] = "mine"` and `engine_class` (docs/engines.md,
    "Adding an engine")."""

    # "module.path:ClassName" (imported only when the engine is made) or the class itself
    engine_class: ClassVar[Any] = None

    kind: str = Field("transformers", description="which engine; each kind is a config class of its own")
    model: str = Field(
        "smollm2",
        description="`smollm2` = the packaged SmolLM2-135M-Instruct; `qwen2.5-coder-0.5b` / `qwen2.5-coder-1.5b` = opt-in "
        "packaged Qwen2.5-Coder-Instruct GGUFs (docs/quality.md); else a local model folder (http: the served model name)",
    )
    revision: str = Field(
        "packaged",
        description="part of `model_id` (the cache key); for a local folder any value but `packaged` is trusted as its "
        "version and skips hashing the weights",
    )
    max_new_tokens: int = Field(96, ge=1, description="default answer budget in tokens (an augmenter may set its own)")
    temperature: float = Field(0.0, ge=0.0, description="0 = greedy, so outputs are reproducible; > 0 samples")
    top_p: float = Field(1.0, gt=0.0, le=1.0, description="nucleus sampling; part of the cache key only when sampling")
    seed: int = Field(0, description="sampling seed; part of the cache key only when sampling")
    parse_attempts: int = Field(
        2, ge=1, le=10,
        description="attempts per entity of a JSON augmenter: an answer that fails to parse is retried with the error "
        "shown to the model, then dead-lettered",
    )
    chaos: ChaosConfig | None = Field(
        None, description="failure injection around the engine: `{malformed, truncated, empty, error, exception, seed}` "
        "shares (docs/engines.md, Chaos testing)",
    )

    def __new__(cls, *args: Any, **data: Any):
        if cls is EngineConfig:  # EngineConfig(kind=...) -> the class of that kind, validated
            return engine_config_class(data.get("kind", "transformers")).model_validate(data)
        return super().__new__(cls)

    @classmethod
    def __pydantic_init_subclass__(cls, **kwargs: Any) -> None:
        super().__pydantic_init_subclass__(**kwargs)
        # only a class that declares its own kind registers it (not a subclass that inherits one, nor
        # the bare skeleton cloudpickle builds before it restores a class shipped by value)
        if "kind" not in cls.__dict__.get("__annotations__", {}):
            return
        kind = cls.model_fields["kind"].default
        if not isinstance(kind, str):
            return
        known = ENGINE_CONFIGS.get(kind)
        if known is not None and (known.__module__, known.__qualname__) != (cls.__module__, cls.__qualname__):
            raise TypeError(f"engine kind {kind!r} is already the config class {known.__module__}.{known.__qualname__}; "
                            f"{cls.__module__}.{cls.__qualname__} needs a kind of its own")
        ENGINE_CONFIGS[kind] = cls

    @model_validator(mode="wrap")
    @classmethod
    def _one_class_per_kind(cls, data: Any, handler):
        if isinstance(data, dict):
            renamed = [f"{old} was renamed to {new}" for old, new in RENAMED_ENGINE_KEYS.items() if old in data]
            if renamed:
                raise ValueError("; ".join(renamed) + " (see docs/config.md)")
            if cls is EngineConfig:
                kind = data.get("kind", "transformers")
                if kind not in ENGINE_CONFIGS:  # the error of a Literal over every kind, at engine.kind
                    create_model("EngineKind", __config__=ConfigDict(extra="ignore"),
                                 kind=(Literal[tuple(ENGINE_CONFIGS)], ...)).model_validate(data)
                return ENGINE_CONFIGS[kind].model_validate(data)
            foreign = sorted(k for k in data if k not in cls.model_fields and engines_taking(k))
            if foreign:
                kind = cls.model_fields["kind"].default
                raise ValueError("; ".join(
                    f"{k} is a key of engine kind {' and '.join(engines_taking(k))}, not of kind {kind!r}" for k in foreign))
        return handler(data)


def engine_config_class(kind: str) -> type[EngineConfig]:
    if kind not in ENGINE_CONFIGS:
        raise ValueError(f"kind {kind!r} is not allowed; expected {', '.join(repr(k) for k in ENGINE_CONFIGS)}")
    return ENGINE_CONFIGS[kind]


def engines_taking(key: str) -> list[str]:
    """The engine kinds whose config has `key` (for errors that say where a misplaced key belongs)."""
    return [kind for kind, c in ENGINE_CONFIGS.items() if key in c.model_fields and key not in EngineConfig.model_fields]


class TransformersConfig(EngineConfig):
    """Hugging Face transformers on CPU or one CUDA device (the embedded default)."""

    engine_class: ClassVar[Any] = "recaug.pipelines.engines.transformers_engine:TransformersEngine"
    kind: Literal["transformers"] = Field("transformers", description="Hugging Face transformers, CPU or one CUDA device")
    device: str = Field("cpu", description="`cpu`, `cuda`, `cuda:1`; a CUDA device makes each Ray actor ask for one GPU")
    batch_size: int = Field(16, ge=1, description="micro-batch size of one `generate` call")
    constrained_decoding: bool = Field(
        True, description="JSON answers decode under the augmenter's schema (llguidance); `false` = parse and retry "
        "only (vLLM and HTTP engines always send the schema)",
    )
    quantize: Literal["none", "int8"] = Field(
        "none", description="`int8`: the model's linear layers run as dynamic int8 (torch, CPU only), about twice as fast "
        "on a CPU; answers differ slightly from fp32, so it is part of the model id and the cache keys",
    )


class VLLMConfig(EngineConfig):
    """Offline vLLM (`vllm.LLM`), one engine per GPU."""

    engine_class: ClassVar[Any] = "recaug.pipelines.engines.vllm_engine:VLLMEngine"
    kind: Literal["vllm"] = Field("vllm", description="offline vLLM, one engine per GPU (the `gpu` extra)")
    gpu_memory_utilization: float | None = Field(
        None, gt=0.0, le=1.0,
        description="share of the GPU vLLM may take; unset = 0.85 on a GPU, and on vLLM's CPU backend half of the free "
        "RAM as a share of the node's (checked against free memory before vLLM starts; docs/engines.md)",
    )
    vllm_args: dict[str, Any] = Field(
        default_factory=dict,
        description="more `vllm.LLM` arguments, verbatim (`max_model_len`, `dtype`, `tensor_parallel_size`, ...); not "
        "part of the cache key, so name different weights in `revision`",
    )

    @field_validator("vllm_args")
    @classmethod
    def _vllm_args_leave_ours_alone(cls, value: dict[str, Any]) -> dict[str, Any]:
        taken = {"model": "engine.model", "tokenizer": "engine.model", "seed": "engine.seed",
                 "gpu_memory_utilization": "engine.gpu_memory_utilization"}
        clashes = [f"{k} (set {taken[k]})" for k in sorted(value) if k in taken]
        if clashes:
            raise ValueError(f"engine.vllm_args may not set {', '.join(clashes)}")
        return value


class HTTPConfig(EngineConfig):
    """Any OpenAI-compatible `/v1/chat/completions` endpoint."""

    engine_class: ClassVar[Any] = "recaug.pipelines.engines.http_engine:HTTPEngine"
    kind: Literal["http"] = Field("http", description="an OpenAI-compatible chat-completions server (`vllm serve`, a hosted API)")
    base_url: str | None = Field(
        None, description="`http://host:8000/v1` (or without `/v1`, or the full `/v1/chat/completions`); required",
    )
    api_key_env: str = Field(
        "RECAUG_API_KEY", description="name of the environment variable holding the key (optional; never logged)",
    )
    concurrency: int = Field(8, ge=1, description="requests in flight at once")
    timeout_s: float = Field(60.0, gt=0, description="seconds per connect and per read")
    http_retries: int = Field(
        4, ge=0, description="retries of one request after its first attempt (429, 5xx, timeouts; backoff with jitter)",
    )


class FakeConfig(EngineConfig):
    """A deterministic engine without a model, for tests and dry runs."""

    engine_class: ClassVar[Any] = "recaug.pipelines.engines.fake:FakeEngine"
    kind: Literal["fake"] = Field("fake", description="no model, deterministic words from a hash of the prompt (tests, dry runs)")


ENGINE_DOCS_BEGIN = "<!-- engine keys: generated from recaug.core.config, do not edit by hand -->"
ENGINE_DOCS_END = "<!-- end of engine keys -->"


def _doc_default(info) -> str:
    if info.default_factory is not None:
        value = info.default_factory()
    else:
        value = info.default
    if value is None:
        return "none"
    if isinstance(value, bool):
        return f"`{str(value).lower()}`"
    return f"`{value}`"


def engine_keys_markdown() -> str:
    """The `engine:` keys as a Markdown table, from the config classes (docs/config.md holds it
    between ENGINE_DOCS_BEGIN and ENGINE_DOCS_END; tests/test_config.py fails when it drifts)."""
    rows = ["| key | default | engines | meaning |", "|---|---|---|---|"]
    for name, info in EngineConfig.model_fields.items():
        meaning = info.description
        if name == "kind":
            meaning = "which engine: " + "; ".join(
                f"`{kind}` = {cls.model_fields['kind'].description}" for kind, cls in ENGINE_CONFIGS.items())
        rows.append(f"| `{name}` | {_doc_default(info)} | all | {meaning} |")
    for kind, cls in ENGINE_CONFIGS.items():
        for name, info in cls.model_fields.items():
            if name not in EngineConfig.model_fields:
                rows.append(f"| `{name}` | {_doc_default(info)} | {kind} | {info.description} |")
    renamed = ", ".join(f"`{old}` is now `{new}`" for old, new in RENAMED_ENGINE_KEYS.items())
    rows.append("")
    rows.append(f"Renamed keys are refused with their new name: {renamed}. A key of another engine kind is "
                "refused with the kinds that take it.")
    return "\n".join(rows)


def update_engine_docs(path: str | Path) -> bool:
    """Rewrite the generated engine-keys block of docs/config.md; True when it changed."""
    path = Path(path)
    text = path.read_text(encoding="utf-8")
    head, begin, rest = text.partition(ENGINE_DOCS_BEGIN)
    _, end, tail = rest.partition(ENGINE_DOCS_END)
    if not begin or not end:
        raise ConfigError(f"{path} has no generated engine-keys block ({ENGINE_DOCS_BEGIN} ... {ENGINE_DOCS_END})")
    new = f"{head}{ENGINE_DOCS_BEGIN}\n{engine_keys_markdown()}\n{ENGINE_DOCS_END}{tail}"
    if new != text:
        path.write_text(new, encoding="utf-8")
    return new != text


class AugmenterConfig(_Section):
    name: str
    enabled: bool = True
    # at most this many entities per run (None = all)
    max_entities: int | None = Field(None, ge=1)
    # which ones when max_entities cuts: `sample` = a deterministic hash sample; `most_interacted` = those
    # with the most prompt-history interactions (ties by id), where knowledge reaches the most CTR samples
    pick: Literal["sample", "most_interacted"] = "sample"
    # token budget of the history part of the prompt (oldest items dropped first)
    history_token_budget: int = Field(600, ge=16)
    max_new_tokens: int | None = Field(None, ge=1)
    # stop a free-text answer after this many complete sentences (None: the augmenter's own limit)
    max_sentences: int | None = Field(None, ge=1)
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
    max_text_rejected_share: float | None = Field(None, ge=0.0, le=1.0)


class OutputGateConfig(_Section):
    min_coverage: float = Field(0.95, ge=0.0, le=1.0)
    min_parse_rate: float = Field(0.8, ge=0.0, le=1.0)
    max_dead_letter_share: float = Field(0.2, ge=0.0, le=1.0)
    # text checks on free-text answers (schemas/output_gate.py `TextChecks`): an answer that echoes
    # the prompt, contradicts the catalogue record, or is given word for word for more than
    # max_identical_answers different prompts is a dead letter; over this share of the expected
    # entities, nothing is published
    max_text_rejected_share: float = Field(0.2, ge=0.0, le=1.0)
    max_identical_answers: int = Field(3, ge=1)
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
    # width of each expert's hidden layer (d -> hidden -> 32; KAR's 128). Narrower trains faster but
    # reached a lower AUC once trained to convergence (docs/ctr-models.md)
    adaptor_hidden_dim: int = Field(128, ge=4, le=1024)
    # the adaptor runs once over the distinct users/items of this many consecutive batches and steps
    # once on their summed gradient, at this many times the learning rate (the backbone's own rate when
    # the run warm-starts from a checkpoint; docs/ctr-models.md) (the backbone still steps
    # every batch); 1 = the adaptor runs and steps with every batch, about half as fast to train
    # (AUC: docs/ctr-models.md). A window holds its rows' activations: at most 256 batches
    adaptor_update_every: int = Field(16, ge=1, le=256)
    # backbones that take each adaptor output as a field (deepfm, dcn, autoint, xdeepfm) can also feed
    # the output itself to their DNN as a dense input. null = the backbone's choice (deepfm: no, its FM
    # field already feeds its DNN; the others: yes; docs/ctr-models.md). A warm start keeps the
    # checkpoint's choice; checkpoints written before this setting existed fed it (true)
    vector_dnn_copy: bool | None = None
    # which published embedding tables the CTR models take (KAR's two by default)
    vector_augmenters: list[str] = Field(default_factory=lambda: ["kar_user_preference", "kar_item_knowledge"])


class PipelineConfig(_Section):
    name: str = Field(pattern=r"^[A-Za-z0-9_.-]+$")
    # where caches, runs and snapshots live; relative paths are relative to the config file
    workdir: str = ".recaug/{name}"
    dataset: DatasetConfig = DatasetConfig()
    input_gate: InputGateConfig = InputGateConfig()
    split: SplitConfig = SplitConfig()
    # the class of `engine.kind` (SerializeAsAny: dumps, and so config hashes, keep that class's keys)
    engine: SerializeAsAny[EngineConfig] = Field(default_factory=TransformersConfig)
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
    def _row_order_has_no_timestamp(self):
        src = self.dataset.interactions
        if self.split.mode == "by_row_order" and src is not None and "timestamp" in src.columns:
            raise ValueError(
                "split.mode by_row_order orders each user's interactions by their row in the file and "
                "takes no timestamp column: remove dataset.interactions.columns.timestamp, or use split.mode: time"
            )
        return self

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
        elif kind == "value_error":
            lines.append(f"  - {loc}: {_cut(str(err.get('ctx', {}).get('error', err['msg'])), 400)}")
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
