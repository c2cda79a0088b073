"""The authoring API: an augmenter is a template, a response schema, a context builder and a parser.

A new augmenter is a template in ``prompts/`` plus a few lines of Python::

    @register
    def item_oneliner() -> Augmenter:
        return Augmenter(
            name="item_oneliner", entity_kind="item", template="item_oneliner.j2",
            build_context=item_context,            # entity rows -> template variables
            response_model=None,                   # free text; or a pydantic model for JSON
        )

Versioning is automatic: the template's content hash, the response schema and the parser version
enter every cache key (docs/architecture.md, "Contracts"), so editing one of them re-generates (or re-parses) exactly
that augmenter and nothing else.
"""

from __future__ import annotations

import hashlib
import json
import re
from dataclasses import dataclass, field
from functools import cached_property
from typing import Any, Callable, Literal

import polars as pl
from pydantic import BaseModel, ValidationError

from recaug.prompts import PromptError, PromptTemplate, load_template
from recaug.core.errors import UsageError
from recaug.core.sentences import split_sentences

EntityKind = Literal["user", "item"]


class ParseError(ValueError):
    """The LLM output cannot be turned into a valid record; the message says why."""


@dataclass(frozen=True)
class SyntheticItem:
    """A made-up item for one user (ONCE's generator): goes to the `synthetic_items` table only."""

    item_id: str
    for_user_id: str
    title: str
    abstract: str
    category: str


@dataclass(frozen=True)
class SyntheticInteraction:
    """A made-up (user, item, label) edge: goes to the `synthetic_interactions` table only."""

    user_id: str
    item_id: str
    label: int  # 1 liked, 0 disliked


@dataclass
class Parsed:
    record: dict[str, Any]  # the validated record (what the response model accepted)
    text: str  # what gets encoded into the vector
    # rows for the synthetic tables, typed: never mixed into the real catalogue or interactions
    synthetic_items: list[SyntheticItem] = field(default_factory=list)
    synthetic_interactions: list[SyntheticInteraction] = field(default_factory=list)


@dataclass
class AugmentInputs:
    """Everything a context builder may look at. History is prompt context only (never CTR rows)."""

    users: pl.DataFrame
    items: pl.DataFrame
    history: pl.DataFrame  # user_id, item_id, rating, timestamp: prompt split only, oldest first
    domain: str
    count_tokens: Callable[[list[str]], list[int]]
    seed: int = 0
    extras: dict[str, Any] = field(default_factory=dict)  # e.g. base-recommender candidates


# build_context(inputs, entity_ids, options) -> DataFrame with `entity_id` + one column per template variable
ContextBuilder = Callable[[AugmentInputs, list[str], dict[str, Any]], pl.DataFrame]
# parse(raw_text, context_row) -> Parsed, raising ParseError
Parser = Callable[[str, dict[str, Any]], Parsed]
# select(inputs, options) -> the entity ids this augmenter works on (before max_entities sampling)
Selector = Callable[[AugmentInputs, dict[str, Any]], list[str]]


def _all_entities(kind: EntityKind) -> Selector:
    def select(inputs: AugmentInputs, options: dict[str, Any]) -> list[str]:
        frame = inputs.users if kind == "user" else inputs.items
        return frame[f"{kind}_id"].to_list()

    return select


@dataclass
class Augmenter:
    name: str
    entity_kind: EntityKind
    template: str  # file name in prompts/
    build_context: ContextBuilder
    response_model: type[BaseModel] | None = None  # None: free text
    # a domain whose answer has other fields (books: author, not director) gets its own model; the
    # parser picks it with `model_for(context["domain"])`, decoding is constrained to it
    domain_models: dict[str, type[BaseModel]] = field(default_factory=dict)
    parse: Parser | None = None  # default: free text, or JSON validated by response_model
    parser_version: str = "1"
    select: Selector | None = None
    family: str = ""  # KAR | LLMRec | ONCE
    encodes: bool = True  # False: the output is synthetic rows only, not a text worth a vector
    description: str = ""
    default_options: dict[str, Any] = field(default_factory=dict)
    # free-text answers the prompt asks to keep to N sentences: the engine stops generating after the
    # N-th complete sentence (core/sentences.py) instead of running on to max_new_tokens; None: no limit.
    # `augmenters[].max_sentences` in the config overrides it.
    max_sentences: int | None = None
    _decoding: dict[str, dict[str, Any]] = field(default_factory=dict, init=False, repr=False, compare=False)
    _decoding_hash: dict[str, str] = field(default_factory=dict, init=False, repr=False, compare=False)

    def __post_init__(self):
        if self.select is None:
            self.select = _all_entities(self.entity_kind)
        if self.parse is None:
            self.parse = parse_free_text if self.response_model is None else make_json_parser(self.response_model)

    @cached_property
    def prompt(self) -> PromptTemplate:
        return load_template(self.template)

    @cached_property
    def json_schema(self) -> dict[str, Any] | None:
        return None if self.response_model is None else self.response_model.model_json_schema()

    def model_for(self, domain: str) -> type[BaseModel] | None:
        return self.domain_models.get(domain, self.response_model)

    def json_schema_for(self, domain: str) -> dict[str, Any] | None:
        model = self.model_for(domain)
        return None if model is None else model.model_json_schema()

    @cached_property
    def schema_hash(self) -> str:
        if not self.json_schema:
            return "free-text"
        every = {"": self.json_schema, **{d: m.model_json_schema() for d, m in sorted(self.domain_models.items())}}
        return _sha(json.dumps(every if self.domain_models else self.json_schema, sort_keys=True))

    def decoding_schema(self, domain: str) -> dict[str, Any] | None:
        """The schema engines constrain decoding with (see `decoding_schema`), for this domain."""
        if self.json_schema is None:
            return None
        if domain not in self._decoding:
            from recaug.augmenters.vocab import VOCABULARY

            self._decoding[domain] = decoding_schema(self.json_schema_for(domain), VOCABULARY.get(domain, []))
        return self._decoding[domain]

    def decoding_schema_hash(self, domain: str) -> str:
        # part of every request key: computed once per domain, not once per entity
        if domain not in self._decoding_hash:
            schema = self.decoding_schema(domain)
            self._decoding_hash[domain] = _sha(json.dumps(schema, sort_keys=True)) if schema else "free-text"
        return self._decoding_hash[domain]

    @property
    def parser_id(self) -> str:
        return f"{self.parser_version}:{self.schema_hash[:12]}"

    def options(self, overrides: dict[str, Any]) -> dict[str, Any]:
        unknown = sorted(set(overrides) - set(self.default_options))
        if unknown:
            raise AugmenterError(
                f"augmenter {self.name!r}: unknown option(s) {unknown}; allowed: {sorted(self.default_options) or 'none'}"
            )
        return {**self.default_options, **overrides}


# A bound on every free string while decoding: a small model under a grammar otherwise keeps writing
# inside one string until its token budget runs out, and a JSON cut mid-string cannot be repaired.
DECODING_MAX_STRING = 120


def decoding_schema(schema: dict[str, Any], vocabulary: list[str]) -> dict[str, Any]:
    """The response schema, tightened for constrained decoding (validation still uses the model):
    objects take no other keys, strings marked `x-vocabulary` become an enum of the domain's
    vocabulary, other strings are bounded, and `x-decoding` on a field overrides its keywords
    (e.g. fewer items than validation would accept)."""

    def tighten(node: Any) -> Any:
        if isinstance(node, list):
            return [tighten(v) for v in node]
        if not isinstance(node, dict):
            return node
        vocab_field = bool(node.get("x-vocabulary"))
        overrides = node.get("x-decoding") or {}
        out = {k: tighten(v) for k, v in node.items() if k not in ("x-vocabulary", "x-decoding")}
        if isinstance(out.get("properties"), dict):
            out.setdefault("additionalProperties", False)
        if vocab_field and vocabulary:
            out = {k: v for k, v in out.items() if k not in ("minLength", "maxLength", "type")}
            out["enum"] = list(vocabulary)
        out.update(overrides)
        if out.get("type") == "string" and "enum" not in out and "const" not in out:
            out["maxLength"] = min(int(out.get("maxLength", DECODING_MAX_STRING)), DECODING_MAX_STRING)
        return out

    return tighten(schema)


def _sha(text: str) -> str:
    return hashlib.sha256(text.encode("utf-8")).hexdigest()


# --- parsers ------------------------------------------------------------------------------------


def free_text_answer(raw: str, whole_sentences: bool = False) -> str:
    """The one helper every free-text parser starts with: the answer with its white space collapsed
    (line breaks and runs of spaces become one space), or ParseError when nothing is left.

    With `whole_sentences`, an answer cut off mid-sentence (at max_new_tokens) keeps its complete
    sentences (or lines) only (core/sentences.py says where a sentence ends), and a sentence the model repeated
    word for word is kept once: a small model that loops ("... a romantic undertones and a romantic
    undertones") must not publish the loop. An answer without one complete sentence is kept whole."""
    text = " ".join(raw.split())
    if whole_sentences and text:
        complete, _ = split_sentences(raw)  # on the raw text: a line break can end a sentence
        kept: list[str] = []
        for sentence in complete or [text]:
            if sentence not in kept:
                kept.append(sentence)
        text = " ".join(kept)
    if not text:
        raise ParseError("empty answer")
    return text


def parse_free_text(raw: str, context: dict[str, Any]) -> Parsed:
    text = free_text_answer(raw)
    return Parsed(record={"text": text}, text=text)


_FENCE = re.compile(r"```(?:json)?\s*(.*?)```", re.DOTALL)


def extract_json_object(raw: str) -> Any:
    """The JSON object in an answer, repairing only what is safe to repair: code fences, prose
    around the object, trailing commas, and a truncated object missing only closing brackets."""
    text = raw.strip()
    fenced = _FENCE.search(text)
    if fenced:
        text = fenced.group(1).strip()
    start = text.find("{")
    if start < 0:
        raise ParseError("no JSON object in the answer")
    text = text[start:]
    decoder = json.JSONDecoder()
    candidates = [text, re.sub(r",\s*([}\]])", r"\1", text)]
    for candidate in candidates:
        try:
            obj, _ = decoder.raw_decode(candidate)
            return obj
        except json.JSONDecodeError:
            continue
    repaired = _close_brackets(candidates[-1])
    if repaired is not None:
        try:
            return json.loads(repaired)
        except json.JSONDecodeError:
            pass
    raise ParseError("the answer is not valid JSON and cannot be safely repaired")


def _close_brackets(text: str) -> str | None:
    # Only closes what is open when the text ends between values; never invents a value.
    stack, in_str, esc = [], False, False
    for ch in text:
        if in_str:
            if esc:
                esc = False
            elif ch == "\\":
                esc = True
            elif ch == '"':
                in_str = False
        elif ch == '"':
            in_str = True
        elif ch in "{[":
            stack.append("}" if ch == "{" else "]")
        elif ch in "}]":
            if not stack:
                return None
            stack.pop()
    if in_str or not stack:
        return None
    body = text.rstrip()
    if body.endswith(":"):
        return None
    body = body.rstrip(",")
    return body + "".join(reversed(stack))


_PLACEHOLDER = re.compile(r"^\s*(?:\.{2,}|…|<[^<>]*>|\[\.\.\.\])\s*$")


def _placeholder_field(value: Any, path: str = "") -> str | None:
    """The first field whose value is a format placeholder ("...", "<index>"), or None."""
    if isinstance(value, str):
        return (path or "the answer") if _PLACEHOLDER.match(value) else None
    if isinstance(value, dict):
        items = value.items()
    elif isinstance(value, list):
        items = ((str(i), v) for i, v in enumerate(value))
    else:
        return None
    for key, v in items:
        hit = _placeholder_field(v, f"{path}.{key}" if path else key)
        if hit:
            return hit
    return None


def make_json_parser(model: type[BaseModel], to_text: Callable[[BaseModel], str] | None = None) -> Parser:
    def parse(raw: str, context: dict[str, Any]) -> Parsed:
        obj = extract_json_object(raw)
        try:
            record = model.model_validate(obj)
        except ValidationError as exc:
            first = exc.errors()[0]
            loc = ".".join(str(p) for p in first["loc"]) or "(object)"
            raise ParseError(f"schema violation at {loc}: {first['msg']}") from None
        placeholder = _placeholder_field(record.model_dump(mode="json"))
        if placeholder:
            raise ParseError(f"{placeholder} is a placeholder copied from the prompt, not an answer")
        text = to_text(record) if to_text else json.dumps(record.model_dump(mode="json"), sort_keys=True)
        return Parsed(record=record.model_dump(mode="json"), text=text)

    return parse


# --- template variables and the augmenter contract ----------------------------------------------


def normalise_attributes(value: Any) -> dict[str, str]:
    """`attributes` as templates see it: an ordered {name: value} of the non-empty values, whether the
    context column holds a mapping, a struct, a list of {name, value} pairs, or nothing."""
    if value is None:
        return {}
    if isinstance(value, dict):
        pairs = value.items()
    elif isinstance(value, (list, tuple)):
        pairs = []
        for entry in value:
            if isinstance(entry, dict) and "name" in entry:
                pairs.append((entry["name"], entry.get("value")))
            elif isinstance(entry, (list, tuple)) and len(entry) == 2:
                pairs.append((entry[0], entry[1]))
    else:
        return {}
    out: dict[str, str] = {}
    for name, v in pairs:
        text = "" if v is None else " ".join(str(v).split())
        if name and text:
            out[str(name)] = text
    return out


def template_variables(common: dict[str, Any], row: dict[str, Any]) -> dict[str, Any]:
    """What a template renders with for one entity: the injected variables (domain ones, options),
    then the context row; `attributes` is always a clean mapping (empty when the catalogue has none)."""
    variables = {**common, **row}
    variables["attributes"] = normalise_attributes(row.get("attributes"))
    return variables


class ContractError(PromptError):
    """A template uses a variable its context builder does not provide (checked before any entity runs)."""


def template_variables_used(template: PromptTemplate) -> set[str]:
    """The names a template reads from its context (jinja2.meta on the sandboxed environment's parse;
    names set inside the template and loop variables are not among them)."""
    from jinja2 import meta

    from recaug.prompts import _environment, _search_path

    return set(meta.find_undeclared_variables(_environment(tuple(_search_path())).parse(template.source)))


def check_contract(aug: "Augmenter", inputs: AugmentInputs, options: dict[str, Any]) -> set[str]:
    """Fail before any entity runs when the template reads a variable nobody provides: the context
    builder's columns (asked for on zero entities, so nothing is rendered or generated), the injected
    domain variables and the augmenter's options. Returns the variables the template uses."""
    from recaug.augmenters.domains import INJECTED

    used = template_variables_used(aug.prompt)
    columns = set(aug.build_context(inputs, [], options).columns)
    provided = columns | set(INJECTED) | set(options)
    missing = sorted(used - provided)
    if missing:
        raise ContractError(
            f"augmenter {aug.name!r}: template {aug.prompt.path} uses {', '.join(repr(m) for m in missing)}, which "
            f"its context builder {getattr(aug.build_context, '__name__', aug.build_context)!r} does not provide; "
            f"context columns: {', '.join(sorted(columns))}; injected: {', '.join(sorted(INJECTED))}; "
            f"options: {', '.join(sorted(options)) or 'none'}. Fix the variable name in the template, or add the "
            f"column to the context builder"
        )
    return used


# --- registry -----------------------------------------------------------------------------------

class AugmenterError(UsageError, ValueError):
    """An augmenter that is misconfigured or misregistered (exit 2)."""


class UnknownAugmenter(UsageError, KeyError):
    """No augmenter of that name is registered (exit 2)."""


REGISTRY: dict[str, Callable[[], Augmenter]] = {}


def register(factory: Callable[[], Augmenter]) -> Callable[[], Augmenter]:
    name = factory.__name__
    if name in REGISTRY:
        raise AugmenterError(f"augmenter {name!r} registered twice")
    REGISTRY[name] = factory
    return factory


def get_augmenter(name: str) -> Augmenter:
    import recaug.augmenters.families  # noqa: F401  (registers the built-in families)

    if name not in REGISTRY:
        raise UnknownAugmenter(f"unknown augmenter {name!r}; known: {', '.join(sorted(REGISTRY))}")
    aug = REGISTRY[name]()
    if aug.name != name:
        raise AugmenterError(f"augmenter factory {name!r} returned an augmenter named {aug.name!r}")
    return aug


def known_augmenters() -> list[str]:
    import recaug.augmenters.families  # noqa: F401

    return sorted(REGISTRY)
