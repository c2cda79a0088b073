"""ONCE / GENRE (Liu et al.): content summariser, user profiler over a fixed topic vocabulary, and a
personalised item generator for cold users whose items and interactions go to separate, clearly
marked synthetic tables. Outputs are schema-validated (the reference code's were often malformed)."""

from __future__ import annotations

import dataclasses
import hashlib
from typing import Annotated, Any

import polars as pl
from pydantic import BaseModel, ConfigDict, Field

from recaug.augmenters.base import (
    Augmenter,
    AugmentInputs,
    ParseError,
    Parsed,
    SyntheticInteraction,
    SyntheticItem,
    free_text_answer,
    make_json_parser,
    register,
)
from recaug.augmenters.context import item_context, user_context
from recaug.augmenters.vocab import canonical


def parse_summary(raw: str, context: dict[str, Any]) -> Parsed:
    text = free_text_answer(raw)
    return Parsed(record={"summary": text}, text=text)


Topic = Annotated[str, Field(json_schema_extra={"x-vocabulary": True})]


class TopicProfile(BaseModel):
    model_config = ConfigDict(extra="ignore")
    # decoding: 1-5 topics from the vocabulary (the prompt asks for 1 to 5), a few short regions
    topics: list[Topic] = Field(min_length=1, max_length=8, json_schema_extra={"x-decoding": {"maxItems": 5}})
    regions: list[Annotated[str, Field(json_schema_extra={"x-decoding": {"maxLength": 30}})]] = Field(
        default_factory=list, max_length=5, json_schema_extra={"x-decoding": {"maxItems": 2}})


def parse_topics(raw: str, context: dict[str, Any]) -> Parsed:
    rec = make_json_parser(TopicProfile)(raw, context).record
    topics, unknown = canonical(context["domain"], rec["topics"])
    if not topics:
        raise ParseError(f"no topic from the vocabulary (got {rec['topics'][:5]})")
    topics = topics[:5]
    text = "interests: " + ", ".join(topics) + (f"; regions: {', '.join(rec['regions'])}" if rec["regions"] else "")
    return Parsed(record={"topics": topics, "regions": rec["regions"], "off_vocabulary": unknown}, text=text)


class GeneratedItem(BaseModel):
    model_config = ConfigDict(extra="ignore")
    title: str = Field(min_length=1, max_length=200, json_schema_extra={"x-decoding": {"maxLength": 60}})
    abstract: str = Field(min_length=1, max_length=1000, json_schema_extra={"x-decoding": {"maxLength": 100}})
    category: str = Field(min_length=1, max_length=100, json_schema_extra={"x-vocabulary": True})


class GeneratedItems(BaseModel):
    model_config = ConfigDict(extra="ignore")
    # decoding stops at 2 items (the default n_items; the parser keeps the first n_items)
    items: list[GeneratedItem] = Field(min_length=1, max_length=10, json_schema_extra={"x-decoding": {"maxItems": 2}})


def select_cold_users(inputs: AugmentInputs, options: dict[str, Any]) -> list[str]:
    limit = int(options["cold_max_interactions"])
    counts = inputs.history.group_by("user_id").len("n")
    users = inputs.users.select("user_id").join(counts, on="user_id", how="left").with_columns(pl.col("n").fill_null(0))
    return users.filter(pl.col("n") <= limit).sort("user_id")["user_id"].to_list()


def parse_generated_items(raw: str, context: dict[str, Any]) -> Parsed:
    rec = make_json_parser(GeneratedItems)(raw, context).record
    user = context["entity_id"]
    items, rows, dropped = [], [], []
    for n, item in enumerate(rec["items"][: int(context["n_items"])]):
        cats, _ = canonical(context["domain"], [item["category"]])
        if not cats:
            dropped.append(item["category"])
            continue
        # ids derive from content so a re-parse gives the same ids
        digest = hashlib.sha256(f"{user}|{item['title']}|{n}".encode()).hexdigest()[:10]
        item_id = f"syn:{user}:{digest}"
        items.append(SyntheticItem(item_id=item_id, for_user_id=user, title=item["title"], abstract=item["abstract"],
                                   category=cats[0]))
        rows.append(SyntheticInteraction(user_id=user, item_id=item_id, label=1))
    if not items:
        raise ParseError(f"no generated item has a category from the vocabulary (got {dropped[:5]})")
    text = " | ".join(f"{i.title}: {i.abstract}" for i in items)
    return Parsed(
        record={"items": [dataclasses.asdict(i) for i in items], "off_vocabulary_categories": dropped},
        text=text,
        synthetic_items=items,
        synthetic_interactions=rows,
    )


@register
def once_content_summary() -> Augmenter:
    return Augmenter(
        name="once_content_summary",
        family="ONCE",
        entity_kind="item",
        template="once_content_summary.j2",
        build_context=item_context,
        parse=parse_summary,
        description="content enhancer: a clear, neutral one-sentence rewrite of the item",
    )


@register
def once_user_profiler() -> Augmenter:
    return Augmenter(
        name="once_user_profiler",
        family="ONCE",
        entity_kind="user",
        template="once_user_profiler.j2",
        build_context=user_context,
        response_model=TopicProfile,
        parse=parse_topics,
        default_options={"min_history": 1},
        description="user interests from the domain's fixed topic vocabulary, optional regions",
    )


@register
def once_cold_item_generator() -> Augmenter:
    return Augmenter(
        name="once_cold_item_generator",
        family="ONCE",
        entity_kind="user",
        template="once_cold_item_generator.j2",
        build_context=user_context,
        response_model=GeneratedItems,
        parse=parse_generated_items,
        select=select_cold_users,
        default_options={"cold_max_interactions": 5, "n_items": 2, "min_history": 1},
        description="synthetic items for cold users (few interactions), written to synthetic tables",
    )
