"""The augmentation stage: augmenter -> requests -> cache -> runner/engine -> parse -> tables.

This part is the same for every runner; runners only execute the requests the cache lacks. Entities
are taken a chunk at a time (`runner.chunk_entities`) so memory does not grow with the catalogue.
Shards are cut deterministically from *all* requests of a chunk (cached or not), so a resumed, Ray or
Beam run with the same config sends the engine exactly the batches an uninterrupted local run would
have, and greedy outputs match.
"""

from __future__ import annotations

import contextlib
import dataclasses
import datetime as dt
import functools
import gc
import hashlib
import json
import os
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

import polars as pl
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from recaug.augmenters.base import AugmentInputs, Augmenter, AugmenterError, ParseError, check_contract, template_variables, template_variables_used
from recaug.augmenters.domains import domain_hash, domain_variables
from recaug.core.config import AugmenterConfig, EngineConfig
from recaug.pipelines.cache import CACHE_SCHEMA, CacheSink, GenerationCache, request_key
from recaug.pipelines.engines.base import FINISH_ERROR, FINISH_LENGTH, Engine, GenerationRequest, GenerationResult
from recaug.core.memory import release_memory
from recaug.core.spill import TableParts, frame_to_table
from recaug.prompts import PromptError
from recaug.schemas import DEAD_LETTER, GENERATED_TEXTS, SYNTHETIC_INTERACTIONS, SYNTHETIC_ITEMS
from recaug.schemas.output_gate import (
    TEXT_REASON_PREFIX, TextChecks, contradiction, identical_answer_rows, looping, prompt_echo, text_checks_fingerprint,
)

RETRY_INSTRUCTION = (
    "Your previous answer could not be used: {reason}. Reply again with only the JSON object, nothing else."
)


@dataclass(slots=True)
class Pending:
    """One entity's request at one attempt."""

    entity_id: str
    context: dict[str, Any]
    messages: tuple[dict[str, str], ...]
    base_key: str
    key: str
    attempt: int
    max_new_tokens: int
    size: int = 0  # bytes of the serialised context row: orders first attempts by length (see context_keys)


@dataclass
class AugmenterStats:
    augmenter: str
    entities: int = 0  # worked on in this run (eligible, sampled); no_history ones are not among them
    no_history: int = 0  # selected users with too little prompt history: never prompted (see min_history)
    requests: int = 0  # entity attempts, incl. retries
    distinct_prompts: int = 0  # distinct request keys over all attempts: == cache_hits + llm_requests
    cache_hits: int = 0  # distinct prompts answered by the cache
    llm_requests: int = 0  # distinct prompts sent to the engine in this run (identical prompts go once)
    engine_errors: int = 0
    input_tokens: int = 0  # of this run's LLM requests (the rendered prompts)
    prompt_tokens_computed: int = 0  # of those, run through the model (a reused shared prefix is not)
    output_tokens: int = 0
    generate_seconds: float = 0.0
    parsed: int = 0
    dead_letter: int = 0
    truncated: int = 0  # finish_reason == length among the final answers, parsed or dead-lettered
    retries: int = 0
    render_errors: int = 0
    text_rejected: int = 0  # answers a text check turned into dead letters (echo, loop, contradiction, identical)
    deferred: int = 0  # over this run's budget: left for a later run
    carried_over: int = 0  # deferred entities whose previous answer was kept

    @property
    def cache_hit_rate(self) -> float:
        return self.cache_hits / self.distinct_prompts if self.distinct_prompts else 1.0

    @property
    def truncated_share(self) -> float:
        total = self.parsed + self.dead_letter
        return self.truncated / total if total else 0.0

    def summary_line(self) -> str:
        """One line per augmenter for the run log: the counts always add up
        (distinct prompts = cached + LLM calls; entities without history are counted apart)."""
        line = (f"  {self.augmenter:<26} {self.entities:>6} entities"
                + (f" (+{self.no_history} without prompt history, not prompted)" if self.no_history else "")
                + f"  {self.distinct_prompts:>6} distinct prompts = {self.cache_hits} cached + {self.llm_requests} LLM calls"
                + f"  parsed {self.parse_rate:6.1%}  dead-letter {self.dead_letter:>4}"
                + (f" ({self.text_rejected} by text checks)" if self.text_rejected else "")
                + f"  truncated {self.truncated} ({self.truncated_share:.0%})")
        if self.deferred:
            line += f"  deferred {self.deferred} (kept {self.carried_over})"
        if self.llm_requests:
            line += (f"  {self.tokens_per_s:6.1f} tok/s  prompt tokens {self.input_tokens:,} rendered, "
                     f"{self.prompt_tokens_computed:,} computed")
        return line

    @property
    def parse_rate(self) -> float:
        total = self.parsed + self.dead_letter
        return self.parsed / total if total else 1.0

    @property
    def tokens_per_s(self) -> float:
        return self.output_tokens / self.generate_seconds if self.generate_seconds else 0.0

    def as_dict(self) -> dict[str, Any]:
        d = dict(self.__dict__)
        d.update(cache_hit_rate=self.cache_hit_rate, parse_rate=self.parse_rate, tokens_per_s=self.tokens_per_s,
                 truncated_share=self.truncated_share)
        return d


@dataclass
class AugmenterOutput:
    augmenter: Augmenter
    generated: pa.Table
    dead_letter: pa.Table
    synthetic_items: pa.Table
    synthetic_interactions: pa.Table
    stats: AugmenterStats
    expected_entities: list[str] = field(default_factory=list)


@dataclass(frozen=True)
class Budget:
    """Incremental long job: at most this many new LLM requests (entities) or tokens per run."""

    max_entities: int | None = None
    max_tokens: int | None = None


def apply_budget(
    todo: list[tuple[str, str, int]], budget: Budget | None, known: set[str]
) -> tuple[list[str], list[str]]:
    """(entity ids to run now, entity ids to defer) from the cache misses (entity_id, key, token cost):
    entities never answered before come first, then changed ones, each in a stable hash order so the
    same entities are not starved run after run."""
    if budget is None or (budget.max_entities is None and budget.max_tokens is None):
        return [t[0] for t in todo], []
    ranked = sorted(todo, key=lambda t: (t[0] in known, t[1]))
    if budget.max_entities is not None:
        ranked, over = ranked[: budget.max_entities], ranked[budget.max_entities :]
    else:
        over = []
    if budget.max_tokens is not None and ranked:
        kept, spent = [], 0
        for t in ranked:
            if spent + t[2] > budget.max_tokens:
                over.append(t)
                continue
            kept.append(t)
            spent += t[2]
        ranked = kept
    return [t[0] for t in ranked], [t[0] for t in over]


# A runner executes shards of requests and calls on_shard(results, committed) as each completes;
# `committed` says the runner already wrote them to the cache through the sink (Beam workers do).
OnShard = Callable[..., None]
ExecuteFn = Callable[[list[list[GenerationRequest]], OnShard, CacheSink], None]


def sample_entities(ids: list[str], limit: int | None, seed: int) -> list[str]:
    """A deterministic sample that is stable as the catalogue grows (hash order, not position)."""
    # polars' byte order is Python's code point order for UTF-8; sorted(set()) cost 1.5 s CPU at 1M ids
    ids = pl.Series("id", ids, dtype=pl.String).unique().sort().to_list()
    if limit is None or len(ids) <= limit:
        return ids
    ranked = sorted(ids, key=lambda e: hashlib.sha256(f"{seed}:{e}".encode()).hexdigest())
    return sorted(ranked[:limit])


def most_interacted_entities(ids: list[str], limit: int | None, history: pl.DataFrame, kind: str) -> list[str]:
    """The `limit` entities with the most prompt-history interactions, ties by id (`pick: most_interacted`).
    Deterministic; only the prompt split is counted, so no CTR sample decides which entity gets an answer."""
    ids = sorted(set(ids))
    if limit is None or len(ids) <= limit:
        return ids
    col = f"{kind}_id"
    counts = history.select(pl.col(col).cast(pl.String)).group_by(col).len("_n")
    ranked = (
        pl.DataFrame({col: ids}, schema={col: pl.String})
        .join(counts, on=col, how="left")
        .with_columns(pl.col("_n").fill_null(0))
        .sort(["_n", col], descending=[True, False])
        .head(limit)
    )
    return sorted(ranked[col].to_list())


def _sampling_key(aug: Augmenter, engine: Engine) -> dict[str, Any]:
    sampling = engine.sampling_key()
    if aug.json_schema is None:
        # constrained decoding cannot change a free-text answer: switching it must not re-generate those
        sampling = {k: v for k, v in sampling.items() if k != "json_constrained"}
    return sampling


def _key_parts(aug: Augmenter, engine: Engine, messages, max_new_tokens: int, domain: str) -> dict[str, Any]:
    return {
        "augmenter": aug.name,
        "template": aug.prompt.content_hash,
        "domain_variables": domain_hash(domain),  # factor lists, nouns, vocabulary (augmenters/domains.py)
        "model": engine.model_id,
        "sampling": _sampling_key(aug, engine),
        # the response schema as the engine constrains it (per domain: vocabulary enums)
        "schema": aug.decoding_schema_hash(domain),
        "max_new_tokens": max_new_tokens,
        "messages": list(messages),
    }


# Version of the render-free request key (`context_keys`): bump it when the key's recipe changes.
KEY_VERSION = 2


def template_fingerprint(aug: Augmenter) -> str:
    from recaug.prompts import _search_path

    # memoised per state of the template folders (a stat per file), so an edited include counts
    files = tuple((str(p), p.stat().st_mtime_ns, p.stat().st_size)
                  for folder in _search_path() for p in sorted(Path(folder).glob("*.j2")))
    return _fingerprint(aug.template, aug.prompt.source, os.environ.get("RECAUG_PROMPTS_PATH", ""), files)


@functools.lru_cache(maxsize=64)
def _fingerprint(template: str, source: str, prompts_path: str, files: tuple) -> str:
    """The template's content hash, plus those of every template it includes, imports or extends
    (recursively); a name computed at render time makes every template on the search path count."""
    from jinja2 import meta

    from recaug.prompts import _search_path, load_template

    env = _template_env()
    seen: dict[str, str] = {}
    todo = [template]
    while todo:
        name = todo.pop()
        if name in seen:
            continue
        tpl_source = source if name == template else load_template(name).source
        seen[name] = hashlib.sha256(tpl_source.encode("utf-8")).hexdigest()
        for ref in meta.find_referenced_templates(env.parse(tpl_source)):
            if ref is None:  # dynamic: cannot tell which one, so all of them
                for folder in _search_path():
                    for path in sorted(Path(folder).glob("*.j2")):
                        todo.append(path.name)
            else:
                todo.append(ref)
    return hashlib.sha256(json.dumps(seen, sort_keys=True).encode("utf-8")).hexdigest()


def _template_env():
    from recaug.prompts import _environment, _search_path

    return _environment(tuple(_search_path()))


def context_keys(
    aug: Augmenter, aug_cfg: AugmenterConfig, inputs: AugmentInputs, engine: Engine, engine_cfg: EngineConfig,
    ctx: pl.DataFrame,
) -> pl.DataFrame:
    """(entity_id, key, size) per context row, without rendering any prompt.

    A prompt is a function of the template (and the templates it includes), the variables shared by
    every entity (domain, vocabulary, the augmenter's options including the history token budget) and
    the entity's context row, which already holds the history *as truncated* to its budget. A key is
    sha256 over a canonical JSON of the template fingerprint, model, sampling, decoding schema, answer
    cap and shared variables, followed by the row serialised by polars (`json_encode`). The parser
    sees the same variables, so the key also covers what a parse depends on. `entity_id` enters only
    if the template reads it: entities with identical context share one answer, as before.
    `size` (bytes of the serialised row) orders requests by length when cutting shards."""
    max_new = aug_cfg.max_new_tokens or engine_cfg.max_new_tokens
    options = augmenter_options(aug, aug_cfg)
    shared = {**domain_variables(inputs.domain), **options}  # what build_pending renders with, besides the row
    prefix = json.dumps({
        "key_version": KEY_VERSION,
        "augmenter": aug.name,
        "template": template_fingerprint(aug),
        "model": engine.model_id,
        "sampling": _sampling_key(aug, engine),
        "schema": aug.decoding_schema_hash(inputs.domain),
        "max_new_tokens": max_new,
        # only when set, so augmenters without a limit keep their keys
        **({"max_sentences": limit} if (limit := sentence_limit(aug, aug_cfg)) else {}),
        "shared": shared,
    }, sort_keys=True, ensure_ascii=False, separators=(",", ":"), default=str)
    columns = [c for c in ctx.columns if c != "entity_id" or "entity_id" in _variables_used(aug.prompt)]
    rows = ctx.select(
        pl.col("entity_id"),
        pl.struct(columns).struct.json_encode().alias("_row") if columns else pl.lit("{}").alias("_row"),
    )
    base = hashlib.sha256(prefix.encode("utf-8") + b"\n")
    keys = []
    with _gc_paused():
        for row in rows["_row"]:
            h = base.copy()
            h.update(row.encode("utf-8"))
            keys.append(h.hexdigest())
    return pl.DataFrame({
        "entity_id": rows["entity_id"],
        "key": pl.Series("key", keys, dtype=pl.String),
        "size": rows["_row"].str.len_bytes().cast(pl.Int64),
    })


@functools.lru_cache(maxsize=64)
def _variables_used(prompt) -> frozenset[str]:
    """The template's variables, parsed once per template and not once per chunk."""
    return frozenset(template_variables_used(prompt))


@contextlib.contextmanager
def _gc_paused():
    """Build many small objects (one request or row per entity) without the cyclic collector
    re-scanning all of them again and again: at 1M entities that was ~40% of the stage's CPU.
    Nothing built here forms reference cycles; refcounting still frees everything at once."""
    was_enabled = gc.isenabled()
    gc.disable()
    try:
        yield
    finally:
        if was_enabled:
            gc.enable()


def sentence_limit(aug: Augmenter, aug_cfg: AugmenterConfig) -> int | None:
    """After how many complete sentences the engine stops this augmenter's answers (None: no limit)."""
    if aug_cfg.max_sentences is not None and aug.response_model is not None:
        raise AugmenterError(
            f"augmenters[{aug.name}].max_sentences: {aug.name} answers in JSON, which a sentence limit would cut "
            "mid-object; max_sentences applies to free-text augmenters only"
        )
    return aug_cfg.max_sentences or aug.max_sentences


def augmenter_options(aug: Augmenter, aug_cfg: AugmenterConfig) -> dict[str, Any]:
    options = aug.options(aug_cfg.options)
    options["history_token_budget"] = aug_cfg.history_token_budget
    return options


def split_by_history(aug: Augmenter, options: dict[str, Any], inputs: AugmentInputs, ids: list[str]) -> tuple[list[str], list[str]]:
    """(eligible ids, ids without enough prompt history). A user augmenter with `min_history` never
    prompts a user whose prompt history holds fewer rows: the model would invent a profile for nobody
    (no interactions, all rows quarantined, rows that belong to other users all end here)."""
    need = int(options.get("min_history", 0) or 0)
    if aug.entity_kind != "user" or need <= 0 or not ids:
        return list(ids), []
    frame = pl.DataFrame({"user_id": ids}, schema={"user_id": pl.String})
    counts = inputs.history.filter(pl.col("user_id").is_in(ids)).group_by("user_id").len("_n")
    joined = frame.join(counts, on="user_id", how="left").with_columns(pl.col("_n").fill_null(0))
    ok = pl.col("_n") >= need
    return joined.filter(ok)["user_id"].to_list(), joined.filter(~ok)["user_id"].to_list()


def selection(aug: Augmenter, aug_cfg: AugmenterConfig, inputs: AugmentInputs) -> tuple[list[str], list[str]]:
    """(entities this augmenter works on in this run, selected users left out for lack of history):
    its selection, minus users without enough prompt history, cut to max_entities as `pick` says."""
    options = augmenter_options(aug, aug_cfg)
    eligible, no_history = split_by_history(aug, options, inputs, aug.select(inputs, options))
    if aug_cfg.pick == "most_interacted":
        return most_interacted_entities(eligible, aug_cfg.max_entities, inputs.history, aug.entity_kind), sorted(no_history)
    return sample_entities(eligible, aug_cfg.max_entities, inputs.seed), sorted(no_history)


def select_entities(aug: Augmenter, aug_cfg: AugmenterConfig, inputs: AugmentInputs) -> list[str]:
    """The entities this augmenter works on in this run: its eligible selection, cut to max_entities."""
    return selection(aug, aug_cfg, inputs)[0]


def build_pending(
    aug: Augmenter,
    aug_cfg: AugmenterConfig,
    inputs: AugmentInputs,
    engine: Engine,
    engine_cfg: EngineConfig,
    entity_ids: list[str] | None = None,
    ctx: pl.DataFrame | None = None,
    keys: pl.DataFrame | None = None,
) -> tuple[list[Pending], list[dict[str, Any]], list[str]]:
    """First-attempt requests, plus render failures (as dead-letter dicts) and the expected ids.
    `ctx` and `keys` (rows in the same order, from `context_keys`) may be given to render only those rows."""
    options = augmenter_options(aug, aug_cfg)
    if entity_ids is None:
        entity_ids = select_entities(aug, aug_cfg, inputs) if ctx is None else ctx["entity_id"].to_list()
    elif ctx is None:
        entity_ids = split_by_history(aug, options, inputs, list(entity_ids))[0]
    if not entity_ids:
        return [], [], []
    if ctx is None:
        ctx = aug.build_context(inputs, entity_ids, options)
    if keys is None:
        keys = context_keys(aug, aug_cfg, inputs, engine, engine_cfg, ctx)
    max_new = aug_cfg.max_new_tokens or engine_cfg.max_new_tokens
    common = {**domain_variables(inputs.domain), **options}
    pending, failed = [], []
    with _gc_paused():
        # rendering is per entity by nature; everything around it is columnar
        for row, key, size in zip(ctx.to_dicts(), keys["key"].to_list(), keys["size"].to_list()):
            variables = template_variables(common, row)
            try:
                messages = aug.prompt.render(variables)
            except PromptError as exc:
                failed.append({"entity_id": row["entity_id"], "reason": f"render: {exc}", "prompt": ""})
                continue
            pending.append(Pending(row["entity_id"], variables, messages, key, key, 1, max_new, size))
    return pending, failed, list(entity_ids)


def retry_of(p: Pending, raw: str, reason: str, aug: Augmenter, engine: Engine) -> Pending:
    messages = p.messages + (
        {"role": "assistant", "content": raw},
        {"role": "user", "content": RETRY_INSTRUCTION.format(reason=reason)},
    )
    key = request_key({**_key_parts(aug, engine, messages, p.max_new_tokens, p.context["domain"]), "base": p.base_key, "attempt": p.attempt + 1})
    return Pending(p.entity_id, p.context, messages, p.base_key, key, p.attempt + 1, p.max_new_tokens)


def request_order(pending: list[Pending]) -> list[Pending]:
    # similar lengths together cut padding; the key breaks ties so the order is fully determined.
    # One fixed-width string per request sorts exactly like the (length, key) tuple, 2.5x faster at 1M.
    return sorted(pending, key=lambda p: f"{sum(len(m['content']) for m in p.messages):012d}{p.key}")


def shard_requests(pending: list[Pending], shard_size: int) -> list[list[Pending]]:
    ordered = request_order(pending)
    return [ordered[i : i + shard_size] for i in range(0, len(ordered), shard_size)]


def first_attempt_order(keys: pl.DataFrame, pending: list[Pending]) -> list[Pending]:
    """A chunk's first attempts by serialised context length (`keys["size"]`, known before rendering),
    then key: the order their misses are cut into engine shards."""
    rank = {e: i for i, e in enumerate(keys.sort(["size", "key"])["entity_id"].to_list())}
    return sorted(pending, key=lambda p: rank[p.entity_id])


class _SortedRowGroups:
    """One table of a previous run, decoded a row group at a time (once, not per chunk) as the stage's
    chunks (ascending entity ids) reach it, keeping the rows `keep` accepts, sorted by entity id."""

    def __init__(self, path: Path, columns: tuple[str, ...], keep: Callable[[pa.Table], pa.Array]):
        self.file = pq.ParquetFile(path)
        self.columns = list(columns)
        self.keep = keep
        meta = self.file.metadata
        col = self.file.schema_arrow.get_field_index("entity_id")
        self.ranges = []
        for i in range(meta.num_row_groups):
            st = meta.row_group(i).column(col).statistics
            ok = st is not None and st.has_min_max
            self.ranges.append((st.min, st.max) if ok else (None, None))
        self._decoded: dict[int, tuple[pa.Table, pl.Series]] = {}

    def _group(self, i: int) -> tuple[pa.Table, pl.Series]:
        group = self._decoded.get(i)
        if group is None:
            table = self.file.read_row_group(i, columns=self.columns, use_threads=False)
            keep = self.keep(table)
            if not pc.all(keep).as_py():  # copying every column only when some row is left out
                table = table.filter(keep)
            ids = pl.Series("entity_id", table.column("entity_id"))
            if not ids.is_sorted():  # runs write it sorted; a stable sort keeps ties' order
                order = pc.sort_indices(table, sort_keys=[("entity_id", "ascending")])
                table = table.take(order)
                ids = pl.Series("entity_id", table.column("entity_id"))
            group = self._decoded[i] = (table, ids)
        return group

    def rows(self, keys: pl.DataFrame) -> pa.Table | None:
        """The kept rows whose (entity_id, cache_key) is in `keys` (entity_id, key), at most one per
        entity, or None. Only entity_id and cache_key go through polars (to match the keys); the other
        columns stay Arrow and are copied once, by `take`."""
        if not keys.height:
            return None
        lo, hi = keys["entity_id"].min(), keys["entity_id"].max()
        wanted = [i for i, (a, b) in enumerate(self.ranges) if a is None or not (b < lo or a > hi)]
        for i in [i for i in self._decoded if i not in wanted]:
            del self._decoded[i]  # chunks come in ascending order: a passed row group is not needed again
        pieces = []
        for i in wanted:  # the chunk's id range by binary search, not a filter over the whole group
            table, ids = self._group(i)
            start = ids.search_sorted(lo, side="left")
            end = ids.search_sorted(hi, side="right")
            if end > start:
                pieces.append(table.slice(start, end - start))
        if not pieces:
            return None
        table = pa.concat_tables(pieces) if len(pieces) > 1 else pieces[0]
        found = (
            pl.from_arrow(table.select(["entity_id", "cache_key"])).with_row_index("_row")
            .join(keys.select("entity_id", pl.col("key").alias("cache_key")), on=["entity_id", "cache_key"],
                  how="inner", maintain_order="left")
            .unique("entity_id", keep="first", maintain_order=True)
        )
        if not found.height:
            return None
        if found.height == table.num_rows:  # every row, in order (`_row` ascends): no copy
            return table
        return table.take(found["_row"].to_arrow())


# Schema metadata of a run's dead-letter table: what its verdicts were reached with. A later run takes a
# verdict over only when all are unchanged (the text bounds are config; the parser and the checks code).
VERDICTS_METADATA = b"recaug.verdicts"


def verdicts_metadata(aug: Augmenter, text_bounds: tuple[int, int] | None) -> bytes:
    return json.dumps({"parser_version": aug.parser_id, "text_bounds": list(text_bounds) if text_bounds else None,
                       "text_checks": text_checks_fingerprint()}, sort_keys=True).encode("utf-8")


class PreviousOutputs:
    """The newest finished run's outputs of one augmenter, reused for entities whose request key is
    unchanged (and still cached): same key, same entity and same parser version give the same prompt,
    answer, parse and text checks, so those rows are copied instead of re-rendered and re-parsed.

    - generated rows: those that took no retry, and whose key has no synthetic rows;
    - dead letters: those a per-answer text check rejected (prompt echo, loop, contradiction), when
      the dead-letter table records the same parser version, text bounds and checks code
      (`VERDICTS_METADATA`).
      Engine, render and parse errors, text-bound rejections, answers that took a retry and identical
      answers (a verdict over the whole run's answers) take the normal path."""

    def __init__(self, generated: Path, dead: Path, synthetic: list[Path], aug: Augmenter,
                 text_bounds: tuple[int, int] | None):
        excluded = []
        for path in synthetic:
            if path.exists():
                t = pq.read_table(path)
                who = "augmenter" if "augmenter" in t.column_names else "source"
                excluded.append(pl.from_arrow(t.select([who, "cache_key"])).filter(pl.col(who) == aug.name)["cache_key"])
        self.excluded = (pl.concat(excluded).unique() if excluded else pl.Series("cache_key", [], pl.String)).to_arrow().cast(pa.string())
        self.generated = _SortedRowGroups(generated, _REUSED_COLUMNS, lambda t: pc.and_(
            pc.and_(pc.equal(t.column("attempts"), 1), pc.equal(t.column("parser_version"), aug.parser_id)),
            pc.invert(pc.is_in(t.column("cache_key"), value_set=self.excluded)),
        ))
        self.dead = None
        if dead.is_file():
            meta = pq.read_schema(dead).metadata or {}
            if meta.get(VERDICTS_METADATA) == verdicts_metadata(aug, text_bounds):
                self.dead = _SortedRowGroups(dead, _REUSED_DEAD_COLUMNS, lambda t: pc.and_(
                    pc.and_(pc.equal(t.column("attempts"), 1), pc.not_equal(t.column("finish_reason"), FINISH_ERROR)),
                    pc.and_(pc.starts_with(t.column("reason"), TEXT_REASON_PREFIX),
                            pc.invert(pc.starts_with(t.column("reason"), IDENTICAL_ANSWER_REASON))),
                ))

    @classmethod
    def newest(cls, runs_dir: Path | None, aug: Augmenter,
               text_bounds: tuple[int, int] | None = None) -> "PreviousOutputs | None":
        if runs_dir is None or not Path(runs_dir).is_dir():
            return None
        for run in sorted((p for p in Path(runs_dir).iterdir() if not p.name.startswith(".")), reverse=True):
            generated = run / "generated" / f"{aug.name}.parquet"
            if generated.is_file():
                try:
                    return cls(generated, run / "dead_letter" / f"{aug.name}.parquet",
                               [run / "synthetic_items.parquet", run / "synthetic_interactions.parquet"], aug, text_bounds)
                except (OSError, pa.ArrowException, KeyError):
                    return None  # unreadable: nothing is reused, everything takes the normal path
        return None

    def rows(self, keys: pl.DataFrame) -> pa.Table | None:
        """The reusable generated rows for `keys` (entity_id, key), at most one per entity, in the
        previous run's columns (`_REUSED_COLUMNS`), or None."""
        return self.generated.rows(keys)

    def dead_rows(self, keys: pl.DataFrame) -> pa.Table | None:
        """The reusable text-check dead letters for `keys`, in `_REUSED_DEAD_COLUMNS`, or None."""
        return self.dead.rows(keys) if self.dead is not None else None


_REUSED_COLUMNS = (
    "entity_id", "cache_key", "parser_version", "prompt", "raw_text", "text", "parsed_json", "input_tokens",
    "output_tokens", "finish_reason", "latency_s", "attempts",
)
_REUSED_DEAD_COLUMNS = ("entity_id", "cache_key", "prompt", "raw_text", "reason", "finish_reason", "attempts")
IDENTICAL_ANSWER_REASON = f"{TEXT_REASON_PREFIX}identical answer given for "


def _now() -> dt.datetime:
    return dt.datetime.now(dt.timezone.utc)


# Entities per chunk: the stage renders, generates, parses and tabulates one chunk at a time, so its
# Python objects (contexts, prompts, answers) never exceed one chunk; each chunk's finished Arrow
# tables are appended to the output (on disk with `spill_dir`). Requests are still cut into shards
# deterministically (within a chunk).
ENTITY_CHUNK = 10_000


# Entities rendered in one chunk from which its Python objects are worth handing back to the OS
# (a few MB; or a whole chunk, when runner.chunk_entities is smaller); below that, the allocator just
# reuses the freed blocks for the next chunk.
RELEASE_AFTER_RENDERED = 1_000


def _chunks(ids: list[str], size: int) -> list[list[str]]:
    return [ids[i : i + size] for i in range(0, len(ids), size)]


def run_augmenter(
    aug: Augmenter,
    aug_cfg: AugmenterConfig,
    inputs: AugmentInputs,
    engine: Engine,
    engine_cfg: EngineConfig,
    cache: GenerationCache,
    execute: ExecuteFn,
    shard_size: int,
    progress: Callable[[int, int, int], None] | None = None,
    entity_ids: list[str] | None = None,
    budget: Budget | None = None,
    carry_over: pa.Table | None = None,
    chunk_size: int = ENTITY_CHUNK,
    spill_dir: Path | None = None,
    text_checks: TextChecks = TextChecks(),
    reuse_runs: Path | None = None,
    text_bounds: tuple[int, int] | None = None,
) -> AugmenterOutput:
    """Generate, parse, retry (bounded) and assemble this augmenter's tables, a chunk of entities at a time.
    With `spill_dir`, each chunk's tables go to disk as they are finished (see core/spill.py) and
    the output tables are memory-mapped from there. With `reuse_runs` (the folder of finished runs),
    entities whose request is unchanged and cached take their rows from the newest run that has this
    augmenter (`PreviousOutputs`) instead of being rendered and parsed again. With `text_bounds` (the
    output gate's (min_text_chars, max_text_chars)), a parsed text to encode outside them is that
    entity's dead letter, so one oversized entity cannot fail the output gate, and with it the whole
    publish."""
    stats = AugmenterStats(augmenter=aug.name)
    check_contract(aug, inputs, augmenter_options(aug, aug_cfg))  # a template typo fails here, not per entity
    if entity_ids is None:
        expected, no_history = selection(aug, aug_cfg, inputs)
    else:
        expected, no_history = split_by_history(aug, augmenter_options(aug, aug_cfg), inputs, list(entity_ids))
    stats.entities = len(expected)
    stats.no_history = len(no_history)
    now = _now()
    deferred: set[str] = set()
    carried: pl.DataFrame | None = None
    if budget is not None and (budget.max_entities is not None or budget.max_tokens is not None):
        deferred = _over_budget(aug, aug_cfg, inputs, engine, engine_cfg, cache, expected, budget, carry_over, chunk_size)
        stats.deferred = len(deferred)
        if deferred and carry_over is not None:
            # filtered in Arrow first: the previous snapshot's table is the whole catalogue's
            keep = pc.is_in(carry_over.column("entity_id"), value_set=pa.array(sorted(deferred), pa.string()))
            carried = pl.from_arrow(carry_over.filter(keep))
            stats.carried_over = carried.height

    parts = {
        "generated": TableParts(GENERATED_TEXTS, "entity_id", spill_dir),
        "dead": TableParts(DEAD_LETTER, "entity_id", spill_dir),
        "items": TableParts(SYNTHETIC_ITEMS, "item_id", spill_dir),
        "inter": TableParts(SYNTHETIC_INTERACTIONS, "user_id", spill_dir),
    }
    common = {
        "entity_kind": aug.entity_kind,
        "augmenter": aug.name,
        "template_hash": aug.prompt.content_hash,
        "model": engine.model_id,
        "created_at": now,
    }
    bounds = text_bounds if aug.encodes else None
    previous = PreviousOutputs.newest(reuse_runs, aug, bounds)
    todo = sorted(e for e in expected if e not in deferred) if deferred else sorted(expected)
    for chunk in _chunks(todo, chunk_size):
        rendered = _run_chunk(aug, aug_cfg, inputs, engine, engine_cfg, cache, execute, shard_size, progress, chunk,
                              stats, common, parts, previous, bounds)
        if rendered >= min(RELEASE_AFTER_RENDERED, chunk_size):
            # the chunk's prompts, answers and rows as Python objects. A chunk of reused rows (and a few
            # re-checked dead letters) made next to none; handing its pages back would only make the next
            # row group's decode fault them in again (that was a third of an unchanged re-run's CPU, as
            # kernel time)
            release_memory()

    generated = parts["generated"].table()
    if aug.response_model is None and generated.num_rows:
        # one answer word for word for many different prompts says nothing about any of them
        same = identical_answer_rows(generated, text_checks.max_identical_answers)
        if pc.any(same).as_py():
            rejected = pl.from_arrow(generated.filter(same))
            counts = rejected.group_by("raw_text").agg(pl.col("cache_key").n_unique().alias("_n"))
            rejected = rejected.join(counts, on="raw_text", how="left").with_columns(
                pl.concat_str([pl.lit(IDENTICAL_ANSWER_REASON), pl.col("_n").cast(pl.String),
                               pl.lit(f" different prompts (more than output_gate.max_identical_answers = "
                                      f"{text_checks.max_identical_answers})")]).alias("reason"))
            parts["dead"].append(frame_to_table(rejected, DEAD_LETTER, "entity_id"))
            stats.text_rejected += rejected.height
            generated = generated.filter(pc.invert(same))
    stats.parsed = generated.num_rows
    stats.dead_letter = parts["dead"].rows
    if carried is not None and carried.height:
        # a deferred entity keeps its previous answer, with the lineage it was made with
        final = TableParts(GENERATED_TEXTS, "entity_id", spill_dir)
        final.append(generated)
        final.append(frame_to_table(carried, GENERATED_TEXTS, "entity_id"))
        generated = final.table()
    dead = parts["dead"].table()
    # what the verdicts were reached with, so that a later run can take them over (PreviousOutputs)
    dead = dead.replace_schema_metadata({**(dead.schema.metadata or {}), VERDICTS_METADATA: verdicts_metadata(aug, bounds)})
    return AugmenterOutput(
        augmenter=aug,
        generated=generated,
        dead_letter=dead,
        synthetic_items=parts["items"].table(),
        synthetic_interactions=parts["inter"].table(),
        stats=stats,
        expected_entities=expected,
    )


def _over_budget(aug, aug_cfg, inputs, engine, engine_cfg, cache, expected, budget, carry_over, chunk_size) -> set[str]:
    """The entities a budgeted run leaves for later. Ranking needs every cache miss, so this pass
    derives each chunk's keys (no rendering), renders only the misses for their token costs, and
    keeps only (entity, key, cost)."""
    misses: list[tuple[str, str, int]] = []
    options = augmenter_options(aug, aug_cfg)
    for chunk in _chunks(expected, chunk_size):
        ctx = aug.build_context(inputs, chunk, options)
        keys = context_keys(aug, aug_cfg, inputs, engine, engine_cfg, ctx)
        miss = ~cache.contains(keys["key"])
        if budget.max_tokens is None:
            misses += [(e, k, 0) for e, k in zip(keys.filter(miss)["entity_id"], keys.filter(miss)["key"])]
            continue
        todo, _, _ = build_pending(aug, aug_cfg, inputs, engine, engine_cfg, ctx=ctx.filter(miss), keys=keys.filter(miss))
        if todo:
            costs = engine.count_tokens(["\n".join(m["content"] for m in p.messages) for p in todo])
            misses += [(p.entity_id, p.key, c + p.max_new_tokens) for p, c in zip(todo, costs)]
    known = set() if carry_over is None else set(carry_over.column("entity_id").to_pylist())
    _, over = apply_budget(misses, budget, known)
    return set(over)


def text_bound_problem(text: str, bounds: tuple[int, int]) -> str | None:
    """Why a text to encode cannot pass the output gate's text_length check, or None."""
    low, high = bounds
    n = len(text)
    if n > high:
        return (f"text to encode is {n:,} characters, above output_gate.max_text_chars = {high:,}; shorten the "
                "source text (input_gate.max_text_chars) or raise output_gate.max_text_chars")
    if n < low:
        return f"text to encode is {n:,} characters, below output_gate.min_text_chars = {low:,}"
    return None


def _run_chunk(aug, aug_cfg, inputs, engine, engine_cfg, cache, execute, shard_size, progress, chunk, stats, common,
               parts, previous: PreviousOutputs | None = None,
               text_bounds: tuple[int, int] | None = None) -> int:
    """One chunk of entities from requests to finished Arrow tables (appended to `parts`): keys are
    derived from the context rows, rows of a previous run are reused for unchanged cached keys, and
    only the other entities are rendered (cache hits among them are parsed, misses generated).
    Returns how many entities were rendered (or failed to render)."""
    ctx = aug.build_context(inputs, chunk, augmenter_options(aug, aug_cfg))
    keys = all_keys = context_keys(aug, aug_cfg, inputs, engine, engine_cfg, ctx)
    reused = reused_dead = None
    counted: set[str] = set()  # distinct keys of this chunk already counted as cache hits
    if previous is not None:
        present = cache.contains(keys["key"])
        if present.any():
            reused = previous.rows(keys.filter(present))
            if text_bounds and reused is not None:
                # the bounds are config: a row the previous run published may be out of them now, and
                # takes the normal path to become that entity's dead letter
                length = pc.utf8_length(reused.column("text"))
                inside = pc.and_(pc.greater_equal(length, text_bounds[0]), pc.less_equal(length, text_bounds[1]))
                if not pc.all(inside).as_py():
                    reused = reused.filter(inside)
            reused = _take_over(reused, stats, counted)
            if reused is not None:
                ctx, keys, present = _without(reused, ctx, keys, present)
            if keys.height and present.any():
                reused_dead = _take_over(previous.dead_rows(keys.filter(present)), stats, counted)
                if reused_dead is not None:
                    stats.text_rejected += reused_dead.num_rows
                    ctx, keys, present = _without(reused_dead, ctx, keys, present)
    pending, render_failed, _ = build_pending(aug, aug_cfg, inputs, engine, engine_cfg, ctx=ctx, keys=keys) \
        if ctx.height else ([], [], [])
    del ctx
    rendered = len(pending) + len(render_failed)
    first = first_attempt_order(all_keys, pending) if pending else None
    stats.render_errors += len(render_failed)
    # the generated rows, column by column (one dict per row cost ~2 KB per entity at 1M entities)
    gen_cols: dict[str, list[Any]] = {name: [] for name in _GENERATED_ROW_COLUMNS}
    dead_rows: list[dict[str, Any]] = [
        dict(entity_id=f["entity_id"], prompt="", raw_text="", reason=f["reason"], finish_reason=FINISH_ERROR,
             attempts=0, cache_key="")
        for f in render_failed
    ]
    synth_items: list[dict[str, Any]] = []
    synth_inter: list[dict[str, Any]] = []

    while pending:
        stats.requests += len(pending)
        ordered = first if first is not None else request_order(pending)
        first = None
        cached = [p.key for p, hit in zip(pending, cache.contains([p.key for p in pending])) if hit]
        hits = cache.lookup(cached) if cached else pl.from_arrow(CACHE_SCHEMA.empty_table())
        hit_keys = set(hits["cache_key"].to_list())
        stats.cache_hits += len(hit_keys - counted)
        # identical prompts (same key) go to the engine once; every entity with that key gets the answer
        distinct, seen = [], set()
        for p in ordered:
            if p.key not in seen:
                seen.add(p.key)
                distinct.append(p)
        sent = hit_keys | seen
        # Shards are cut over this attempt's requests: the entities the previous finished run could not
        # supply, which depend on the input and that run, not on the cache. A run resumed after a kill
        # therefore sends exactly the batches it would have sent (whole shards committed before the kill
        # are cache hits), and a run that changed 1% of a catalogue sends full shards (cut over every
        # entity, it sent one or a few requests per engine call and committed a cache shard for each).
        todo = [shard for shard in ([p for p in distinct[i : i + shard_size] if p.key not in hit_keys]
                                    for i in range(0, len(distinct), shard_size)) if shard]
        stats.distinct_prompts += len(sent - counted)
        fresh: dict[str, GenerationResult] = {}
        if todo:
            schema = aug.decoding_schema(inputs.domain)
            max_sentences = sentence_limit(aug, aug_cfg)
            requests = [
                [GenerationRequest(p.key, p.messages, p.max_new_tokens, schema, max_sentences) for p in shard]
                for shard in todo
            ]
            total = sum(len(s) for s in requests)
            started = time.perf_counter()

            def on_shard(results: list[GenerationResult], committed: bool = False) -> None:
                if not committed:
                    cache.commit(results, aug.name, engine.model_id)
                for r in results:
                    fresh[r.key] = r
                    stats.input_tokens += r.input_tokens
                    stats.prompt_tokens_computed += (r.extra or {}).get("prompt_tokens_computed", r.input_tokens)
                    stats.output_tokens += r.output_tokens
                    if r.finish_reason == FINISH_ERROR:
                        stats.engine_errors += 1
                if progress:
                    progress(len(results), sum(r.output_tokens for r in results), total)

            if progress:  # open the bar now (or grow it by this pass): rows/s then counts the first shard too
                progress(0, 0, total)
            execute(requests, on_shard, cache.sink(aug.name, engine.model_id))
            stats.generate_seconds += time.perf_counter() - started
            stats.llm_requests += total
            del requests

        # key -> (raw_text, input_tokens, output_tokens, finish_reason, latency_s, error): cached rows
        # straight from the lookup's columns, then this run's results
        answers: dict[str, tuple] = dict(zip(
            hits["cache_key"].to_list(),
            zip(*(hits[c].to_list() for c in ("raw_text", "input_tokens", "output_tokens", "finish_reason", "latency_s")),
                [None] * hits.height),
        ))
        del hits
        for key, r in fresh.items():
            if r.finish_reason == FINISH_ERROR:
                answers[key] = ("", 0, 0, FINISH_ERROR, 0.0, r.error or "engine error")
            else:
                answers[key] = (r.text, r.input_tokens, r.output_tokens, r.finish_reason, r.latency_s, None)
        fresh.clear()

        retry: list[Pending] = []
        with _gc_paused():
            for p in pending:
                ans = answers.get(p.key)
                prompt_text = json.dumps(list(p.messages), ensure_ascii=False)
                if ans is None or ans[3] == FINISH_ERROR:
                    # engine errors are not retried in this run (they are not cached either: the next run retries)
                    reason = ans[5] if ans else "no result from the runner"
                    dead_rows.append(dict(entity_id=p.entity_id, prompt=prompt_text, raw_text="", reason=f"engine: {reason}",
                                          finish_reason=FINISH_ERROR, attempts=p.attempt, cache_key=p.key))
                    continue
                raw, input_tokens, output_tokens, finish_reason, latency_s, _ = ans
                try:
                    parsed = aug.parse(raw, p.context)
                except ParseError as exc:
                    reason = str(exc)
                    if finish_reason == FINISH_LENGTH:
                        reason += " (answer truncated at max_new_tokens)"
                    if p.attempt < engine_cfg.parse_attempts and aug.response_model is not None:
                        retry.append(retry_of(p, raw, reason, aug, engine))
                    else:
                        if finish_reason == FINISH_LENGTH:
                            stats.truncated += 1  # a cut-off answer is counted whether or not it parsed
                        dead_rows.append(dict(entity_id=p.entity_id, prompt=prompt_text, raw_text=raw, reason=reason,
                                              finish_reason=finish_reason, attempts=p.attempt, cache_key=p.key))
                    continue
                if finish_reason == FINISH_LENGTH:
                    stats.truncated += 1
                out_of_bounds = text_bound_problem(parsed.text, text_bounds) if text_bounds else None
                if out_of_bounds:
                    dead_rows.append(dict(entity_id=p.entity_id, prompt=prompt_text, raw_text=raw, reason=out_of_bounds,
                                          finish_reason=finish_reason, attempts=p.attempt, cache_key=p.key))
                    continue
                if aug.response_model is None:  # free text: what a schema cannot check
                    problem = prompt_echo(raw, p.messages, p.context.get("title")) or looping(parsed.text) or (
                        contradiction(raw, p.context, p.context.get("vocabulary") or [], p.context.get("noun") or "")
                        if aug.entity_kind == "item" else None)
                    if problem:
                        stats.text_rejected += 1
                        dead_rows.append(dict(entity_id=p.entity_id, prompt=prompt_text, raw_text=raw, reason=problem,
                                              finish_reason=finish_reason, attempts=p.attempt, cache_key=p.key))
                        continue
                for name, value in zip(_GENERATED_ROW_COLUMNS, (
                    p.entity_id, p.key, prompt_text, raw, parsed.text,
                    json.dumps(parsed.record, ensure_ascii=False, sort_keys=True),
                    int(input_tokens), int(output_tokens), finish_reason, float(latency_s), p.attempt,
                )):
                    gen_cols[name].append(value)
                for item in parsed.synthetic_items:
                    synth_items.append({**dataclasses.asdict(item), "augmenter": aug.name, "cache_key": p.key})
                for edge in parsed.synthetic_interactions:
                    synth_inter.append({**dataclasses.asdict(edge), "source": aug.name, "cache_key": p.key})
        del answers
        stats.retries += len(retry)
        pending = retry

    pieces = []
    if gen_cols["entity_id"]:
        gen = pl.DataFrame(gen_cols, schema_overrides=_GENERATED_ROW_TYPES).with_columns(
            *(pl.lit(v).alias(k) for k, v in common.items()), pl.lit(aug.parser_id).alias("parser_version"))
        pieces.append(frame_to_table(gen, GENERATED_TEXTS, "entity_id"))
    if reused is not None:
        pieces.append(_reused_table(reused, GENERATED_TEXTS, {**common, "parser_version": aug.parser_id}))
    _append_in_order(parts["generated"], pieces)
    pieces = []
    if dead_rows:
        pieces.append(frame_to_table(pl.DataFrame([{**common, **r} for r in dead_rows]), DEAD_LETTER, "entity_id"))
    if reused_dead is not None:
        pieces.append(_reused_table(reused_dead, DEAD_LETTER, common))
    _append_in_order(parts["dead"], pieces)
    if synth_items:
        parts["items"].append(frame_to_table(pl.DataFrame(synth_items), SYNTHETIC_ITEMS, "item_id"))
    if synth_inter:
        parts["inter"].append(frame_to_table(pl.DataFrame(synth_inter), SYNTHETIC_INTERACTIONS, "user_id"))
    return rendered


def _append_in_order(part: TableParts, pieces: list[pa.Table]) -> None:
    """A chunk's rows made here and rows taken over from the previous run (each one row per entity), as
    one piece ordered by entity id and then cache key, the order `frame_to_table` gives."""
    if not pieces:
        return
    table = pa.concat_tables(pieces) if len(pieces) > 1 else pieces[0]
    if len(pieces) > 1 or not pl.Series(table.column("entity_id")).is_sorted():
        table = table.take(pc.sort_indices(table, sort_keys=[("entity_id", "ascending"), ("cache_key", "ascending")]))
    part.append(table)


def _take_over(rows: pa.Table | None, stats: AugmenterStats, counted: set[str]) -> pa.Table | None:
    """Count a previous run's rows taken over for this chunk as the normal path counts the entities it
    answers from the cache (requests, distinct prompts, cache hits, truncated answers); `counted` holds
    the chunk's distinct keys counted so far. None when there are no rows."""
    if rows is None or not rows.num_rows:
        return None
    keys = set(pl.Series(rows.column("cache_key")).unique().to_list()) - counted
    counted |= keys
    stats.requests += rows.num_rows
    stats.cache_hits += len(keys)
    stats.distinct_prompts += len(keys)
    stats.truncated += pc.sum(pc.equal(rows.column("finish_reason"), FINISH_LENGTH)).as_py() or 0
    return rows


def _without(rows: pa.Table, ctx: pl.DataFrame, keys: pl.DataFrame, present: pl.Series):
    """The chunk's context rows, keys and cache flags without the entities `rows` (one per entity) cover."""
    if rows.num_rows >= keys.height:  # every entity of the chunk
        return ctx.clear(), keys.clear(), present.clear()
    rest = ~keys["entity_id"].is_in(pl.Series(rows.column("entity_id")).implode())
    return ctx.filter(rest), keys.filter(rest), present.filter(rest)


def _reused_table(reused: pa.Table, schema: pa.Schema, own: dict[str, Any]) -> pa.Table:
    """Rows of a previous run as this run's rows of `schema` (generated rows, dead letters): copied
    columns as they are, the run's own columns (`own`) as constants, without a round trip through polars."""
    n = reused.num_rows
    columns = []
    for field in schema:
        if field.name in own:
            columns.append(pa.repeat(pa.scalar(own[field.name], field.type), n))
        else:
            columns.append(reused.column(field.name).cast(field.type))
    return pa.Table.from_arrays(columns, schema=schema)


_GENERATED_ROW_COLUMNS = (
    "entity_id", "cache_key", "prompt", "raw_text", "text", "parsed_json", "input_tokens", "output_tokens",
    "finish_reason", "latency_s", "attempts",
)
_GENERATED_ROW_TYPES = {
    "entity_id": pl.String, "cache_key": pl.String, "prompt": pl.String, "raw_text": pl.String, "text": pl.String,
    "parsed_json": pl.String, "input_tokens": pl.Int64, "output_tokens": pl.Int64, "finish_reason": pl.String,
    "latency_s": pl.Float64, "attempts": pl.Int64,
}
