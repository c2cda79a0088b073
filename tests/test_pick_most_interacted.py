"""`augmenters[].pick`: which entities an augmenter works on when `max_entities` cuts its selection.

`sample` (the default) is the deterministic hash sample; `most_interacted` takes the entities with
the most prompt-history interactions, ties broken by id, so knowledge goes where most CTR samples are.
"""

import polars as pl
import pytest
from pydantic import ValidationError

from recaug.augmenters.base import AugmentInputs, get_augmenter
from recaug.core.config import AugmenterConfig
from recaug.pipelines.augment import sample_entities, select_entities

# interactions per item in the prompt history: i3 5, i7 4, i1 4, i9 3, i0 1, the rest none; users u0..u5
COUNTS = {"i3": 5, "i7": 4, "i1": 4, "i9": 3, "i0": 1}


def make_inputs(counts=COUNTS, history_user_counts=None):
    items = pl.DataFrame(
        {"item_id": [f"i{n}" for n in range(12)], "title": [f"Movie {n}" for n in range(12)],
         "year": [1990 + n for n in range(12)], "genres": [["Drama"]] * 12, "description": [None] * 12},
        schema_overrides={"year": pl.Int32, "description": pl.String},
    )
    users = pl.DataFrame(
        {"user_id": [f"u{n}" for n in range(6)], "age": [30] * 6, "gender": ["F"] * 6, "occupation": ["x"] * 6,
         "region": [None] * 6},
        schema_overrides={"age": pl.Int32, "region": pl.String},
    )
    rows = [(f"u{k % 6}", item) for item, n in counts.items() for k in range(n)]
    history = pl.DataFrame(
        {"user_id": [u for u, _ in rows], "item_id": [i for _, i in rows],
         "rating": [4.0] * len(rows), "timestamp": list(range(len(rows)))}
    )
    return AugmentInputs(users=users, items=items, history=history, domain="movies",
                         count_tokens=lambda ts: [len(t.split()) for t in ts])


def pick(inputs, how, limit, name="kar_item_knowledge"):
    return select_entities(get_augmenter(name), AugmenterConfig(name=name, max_entities=limit, pick=how), inputs)


def test_most_interacted_items_come_first_ties_by_id():
    inputs = make_inputs()
    assert pick(inputs, "most_interacted", 1) == ["i3"]
    # i1 and i7 tie on 4: with room for one of them, the smaller id wins
    assert pick(inputs, "most_interacted", 2) == ["i1", "i3"]
    assert pick(inputs, "most_interacted", 4) == ["i1", "i3", "i7", "i9"]
    # past the interacted ones, items without interactions fill up by id
    assert pick(inputs, "most_interacted", 7) == ["i0", "i1", "i10", "i11", "i3", "i7", "i9"]


def test_most_interacted_is_deterministic_and_independent_of_the_seed():
    first = make_inputs()
    second = make_inputs()
    second.seed = 99
    assert pick(first, "most_interacted", 3) == pick(second, "most_interacted", 3) == ["i1", "i3", "i7"]


def test_more_interactions_move_an_item_in():
    before = pick(make_inputs(), "most_interacted", 3)
    after = pick(make_inputs({**COUNTS, "i5": 9}), "most_interacted", 3)
    assert before == ["i1", "i3", "i7"]
    assert after == ["i1", "i3", "i5"]  # i5 first; i1 and i7 tie on 4 for the last place: i1 keeps it


def test_without_a_cut_both_picks_take_every_entity():
    inputs = make_inputs()
    everything = [f"i{n}" for n in range(12)]
    assert sorted(pick(inputs, "most_interacted", None)) == sorted(everything)
    assert sorted(pick(inputs, "sample", None)) == sorted(everything)
    assert sorted(pick(inputs, "most_interacted", 50)) == sorted(everything)


def test_sample_stays_the_default_hash_sample():
    inputs = make_inputs()
    cfg = AugmenterConfig(name="kar_item_knowledge", max_entities=4)
    assert cfg.pick == "sample"
    chosen = select_entities(get_augmenter("kar_item_knowledge"), cfg, inputs)
    assert chosen == sample_entities([f"i{n}" for n in range(12)], 4, inputs.seed)


def test_users_are_counted_by_their_prompt_history_too():
    inputs = make_inputs()
    # history rows per user: u0 5, u1 4, u2 4, u3 3, u4 1, u5 0 (u4 and u5 are below min_history)
    assert pick(inputs, "most_interacted", 2, name="kar_user_preference") == ["u0", "u1"]
    assert pick(inputs, "most_interacted", 10, name="kar_user_preference") == ["u0", "u1", "u2", "u3"]


def test_an_unknown_pick_is_refused():
    with pytest.raises(ValidationError, match="most_interacted"):
        AugmenterConfig(name="kar_item_knowledge", pick="popular")
