"""What each domain has, in one place: the nouns templates use, KAR's factor list, the creator role
and the attributes LLMRec's attribute completion asks for. Templates never hard-code a domain's
fields: a books catalogue is asked for its author and publisher, never for a "director".

Every template sees these as variables (see `domain_variables`): `domain`, `noun` (plural, e.g.
"books"), `item_noun` (singular), `factors` (KAR's factorization list), `creator` (the role whose
names the user profile collects: director, author, source, brand), `item_attributes` (the keys
attribute completion asks for) and `vocabulary` (the fixed topic list of augmenters/vocab.py).
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass
from functools import lru_cache
from typing import Any

from recaug.augmenters.vocab import VOCABULARY


@dataclass(frozen=True)
class Domain:
    name: str
    noun: str  # plural: "movies"
    item_noun: str  # singular: "movie"
    factors: tuple[str, ...]  # KAR factorization prompting: what a preference or an item is made of
    creator: str  # whose names a user profile lists
    item_attributes: tuple[str, ...]  # what LLMRec's attribute completion asks for (JSON keys)


DOMAINS: dict[str, Domain] = {
    d.name: d
    for d in (
        Domain("movies", "movies", "movie",
               ("genre", "director and actors", "era and country", "characters", "plot and theme", "mood and tone",
                "critical acclaim", "production quality", "soundtrack"),
               "director", ("director", "country", "language")),
        Domain("books", "books", "book",
               ("genre", "author", "writing style", "theme", "setting", "length and complexity", "era",
                "literary quality", "critical acclaim"),
               "author", ("author", "publisher", "language")),
        Domain("news", "news articles", "news article",
               ("topic", "region", "source", "tone", "depth", "timeliness", "people and organisations", "format"),
               "source", ("source", "region", "language")),
        Domain("generic", "items", "item",
               ("category", "brand", "price range", "quality", "purpose", "style", "audience"),
               "brand", ("brand", "category", "country")),
    )
}


def domain(name: str) -> Domain:
    try:
        return DOMAINS[name]
    except KeyError:
        raise ValueError(f"unknown domain {name!r}; known: {', '.join(DOMAINS)}") from None


def domain_variables(name: str) -> dict[str, Any]:
    """The variables every template sees for this domain."""
    d = domain(name)
    return {"domain": d.name, "noun": d.noun, "item_noun": d.item_noun, "factors": list(d.factors),
            "creator": d.creator, "item_attributes": list(d.item_attributes), "vocabulary": list(VOCABULARY[d.name])}


@lru_cache(maxsize=None)
def domain_hash(name: str) -> str:
    """A version of what templates see for this domain: part of every request key, so editing a
    factor list or a vocabulary re-generates the prompts that use it even where a key is derived
    without rendering the prompt."""
    return hashlib.sha256(json.dumps(domain_variables(name), sort_keys=True).encode("utf-8")).hexdigest()[:16]


# names the stage injects next to a context builder's columns (see augmenters/base.py `check_contract`)
INJECTED = frozenset(domain_variables("movies")) | {"attributes"}
