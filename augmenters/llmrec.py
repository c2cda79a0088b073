"""LLMRec (Wei et al., WSDM'24): implicit-feedback augmentation, item attribute completion and a
structured user profile. Unlike the reference code we validate what comes back: indices against the
candidate list, fields against the schema."""

from __future__ import annotations

from typing import Annotated, Any

import polars as pl
from pydantic import BaseModel, ConfigDict, Field, create_model

from recaug.augmenters.base import (
    normalise_attributes,
    Augmenter,
    ParseError,
    Parsed,
    SyntheticInteraction,
    extract_json_object,
    make_json_parser,
    register,
)
from recaug.augmenters.domains import DOMAINS
from recaug.augmenters.context import history_context, item_context, item_lines, user_context
from recaug.augmenters.recall import genre_popularity_candidates
from recaug.augmenters.vocab import canonical


class ImplicitFeedback(BaseModel):
    model_config = ConfigDict(extra="ignore")
    # decoding stops at two digits; the parser checks the index against the candidate list
    liked: int = Field(ge=0, json_schema_extra={"x-decoding": {"maximum": 99}})
    disliked: int = Field(ge=0, json_schema_extra={"x-decoding": {"maximum": 99}})


def implicit_feedback_context(inputs, user_ids: list[str], options: dict) -> pl.DataFrame:
    n = int(options["n_candidates"])
    hist = history_context(inputs, user_ids, options["history_token_budget"])
    cands = genre_popularity_candidates(inputs.history, inputs.items, user_ids, n=n)
    lines = item_lines(inputs.items)
    cand_lines = (
        cands.explode("candidates")
        .join(lines, left_on="candidates", right_on="item_id", how="left")
        .group_by("user_id", maintain_order=True)
        .agg(pl.col("candidates").alias("candidate_ids"), pl.col("item_line").alias("candidates"))
    )
    return hist.join(cand_lines, on="user_id", how="inner").rename({"user_id": "entity_id"})


def parse_implicit_feedback(raw: str, context: dict[str, Any]) -> Parsed:
    from pydantic import ValidationError

    try:
        choice = ImplicitFeedback.model_validate(extract_json_object(raw))
    except ValidationError as exc:
        raise ParseError(f"schema violation: {exc.errors()[0]['msg']}") from None
    ids = list(context["candidate_ids"])
    for field in ("liked", "disliked"):
        idx = getattr(choice, field)
        if idx >= len(ids):
            raise ParseError(f"{field} index {idx} is not a candidate (0..{len(ids) - 1})")
    if choice.liked == choice.disliked:
        raise ParseError(f"liked and disliked are the same candidate ({choice.liked})")
    pos, neg = ids[choice.liked], ids[choice.disliked]
    user = context["entity_id"]
    return Parsed(
        record={"liked": choice.liked, "disliked": choice.disliked, "liked_item_id": pos, "disliked_item_id": neg},
        text=f"likes {context['candidates'][choice.liked]}; dislikes {context['candidates'][choice.disliked]}",
        synthetic_interactions=[
            SyntheticInteraction(user_id=user, item_id=pos, label=1),
            SyntheticInteraction(user_id=user, item_id=neg, label=0),
        ],
    )


class ItemAttributes(BaseModel):
    model_config = ConfigDict(extra="ignore")
    director: str = Field(min_length=1, max_length=200)
    country: str = Field(min_length=1, max_length=100)
    language: str = Field(min_length=1, max_length=100)


def _attribute_model(domain: str) -> type[BaseModel]:
    """The attributes the domain has (augmenters/domains.py), e.g. books: author, publisher, language."""
    fields = {name: (str, Field(min_length=1, max_length=200)) for name in DOMAINS[domain].item_attributes}
    return create_model(f"ItemAttributes_{domain}", __config__=ConfigDict(extra="ignore"), **fields)


ITEM_ATTRIBUTE_MODELS = {d: (ItemAttributes if d == "movies" else _attribute_model(d)) for d in DOMAINS}


def parse_item_attributes(raw: str, context: dict[str, Any]) -> Parsed:
    """The domain's attributes; a value the catalogue already holds (context `attributes`) is taken
    from the catalogue, never from the model, and recorded as such."""
    domain = context.get("domain", "movies")  # the config's default domain
    rec = make_json_parser(ITEM_ATTRIBUTE_MODELS[domain])(raw, context).record
    known = normalise_attributes(context.get("attributes"))
    from_catalogue = sorted(k for k in rec if known.get(k))
    rec.update({k: known[k] for k in from_catalogue})
    text = "; ".join(f"{k}: {rec[k]}" for k in DOMAINS[domain].item_attributes)
    return Parsed(record={**rec, "from_catalogue": from_catalogue}, text=text)


Genre = Annotated[str, Field(json_schema_extra={"x-vocabulary": True})]
# a few short entries are what the profile text uses; validation accepts more from other engines
_FEW = {"x-decoding": {"maxItems": 4}}


class UserProfile(BaseModel):
    model_config = ConfigDict(extra="ignore")
    age: int | None = Field(default=None, ge=0, le=120)
    gender: str = Field("unknown", json_schema_extra={"x-decoding": {"enum": ["male", "female", "unknown"]}})
    # required, at least one: a profile without a liked genre is no profile (constrained decoding then
    # cannot leave it out; an answer without it is retried, then dead-lettered)
    liked_genres: list[Genre] = Field(..., min_length=1, max_length=10, json_schema_extra=_FEW)
    disliked_genres: list[Genre] = Field(default_factory=list, max_length=10, json_schema_extra=_FEW)
    liked_directors: list[Annotated[str, Field(json_schema_extra={"x-decoding": {"maxLength": 40}})]] = Field(
        default_factory=list, max_length=10, json_schema_extra=_FEW)
    country: str = "unknown"
    language: str = "unknown"


def _profile_model(domain: str) -> type[BaseModel]:
    """UserProfile with the domain's creator role: liked_authors for books, liked_brands elsewhere."""
    creator = DOMAINS[domain].creator
    if creator == "director":
        return UserProfile
    fields = {k: (v.annotation, v) for k, v in UserProfile.model_fields.items() if k != "liked_directors"}
    fields[f"liked_{creator}s"] = (UserProfile.model_fields["liked_directors"].annotation,
                                   UserProfile.model_fields["liked_directors"])
    return create_model(f"UserProfile_{domain}", __config__=ConfigDict(extra="ignore"), **fields)


USER_PROFILE_MODELS = {d: _profile_model(d) for d in DOMAINS}


def parse_user_profile(raw: str, context: dict[str, Any]) -> Parsed:
    domain = context["domain"]
    base = make_json_parser(USER_PROFILE_MODELS[domain])(raw, context)
    rec = dict(base.record)
    creators_key = f"liked_{DOMAINS[domain].creator}s"
    liked, unknown_l = canonical(context["domain"], rec["liked_genres"])
    disliked, unknown_d = canonical(context["domain"], rec["disliked_genres"])
    if not liked:
        raise ParseError("no liked genre from the vocabulary")
    rec.update(liked_genres=liked, disliked_genres=disliked, off_vocabulary=unknown_l + unknown_d)
    text = f"likes {', '.join(liked)}" + (f"; dislikes {', '.join(disliked)}" if disliked else "")
    if rec[creators_key]:
        text += f"; {DOMAINS[domain].creator}s: {', '.join(rec[creators_key])}"
    return Parsed(record=rec, text=text)


@register
def llmrec_implicit_feedback() -> Augmenter:
    return Augmenter(
        name="llmrec_implicit_feedback",
        family="LLMRec",
        entity_kind="user",
        template="llmrec_implicit_feedback.j2",
        build_context=implicit_feedback_context,
        response_model=ImplicitFeedback,
        parse=parse_implicit_feedback,
        parser_version="1",
        default_options={"n_candidates": 10, "min_history": 1},
        encodes=False,
        description="most/least liked of N base-recommender candidates -> synthetic (user, pos, neg)",
    )


@register
def llmrec_item_attributes() -> Augmenter:
    return Augmenter(
        name="llmrec_item_attributes",
        family="LLMRec",
        entity_kind="item",
        template="llmrec_item_attributes.j2",
        build_context=item_context,
        response_model=ItemAttributes,
        domain_models=ITEM_ATTRIBUTE_MODELS,
        parse=parse_item_attributes,
        parser_version="3",  # 3: the domain's attributes; catalogue values win over the model's
        description="item attribute completion: the domain's attributes (movies: director, country, language; "
                    "books: author, publisher, language; news: source, region, language; generic: brand, category, country)",
    )


@register
def llmrec_user_profile() -> Augmenter:
    return Augmenter(
        name="llmrec_user_profile",
        family="LLMRec",
        entity_kind="user",
        template="llmrec_user_profile.j2",
        build_context=user_context,
        response_model=UserProfile,
        domain_models=USER_PROFILE_MODELS,
        parse=parse_user_profile,
        parser_version="2",  # 2: the domain's creator role (liked_authors for books, ...)
        default_options={"min_history": 2},
        description="structured user profile: age, gender, liked/disliked genres, the domain's creators, country, language",
    )
