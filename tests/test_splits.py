import polars as pl
import pyarrow as pa
import pytest

from recaug.core.config import SplitConfig
from recaug.pipelines.datasets import load_ml100k
from recaug.ctr_models.splits import ctr_samples, prompt_context, split_interactions, split_sizes
from recaug.schemas import CTR_SAMPLES, INTERACTIONS, SPLIT_INTERACTIONS, conform


@pytest.fixture(scope="module")
def ml100k_interactions():
    return conform(load_ml100k().tables["interactions"], INTERACTIONS)


def _assert_no_leak(split: pa.Table):
    df = pl.from_arrow(split)
    prompt_end = df.filter(pl.col("split") == "prompt").group_by("user_id").agg(pl.col("timestamp").max().alias("p_max"))
    ctr = df.filter(pl.col("split") != "prompt").join(prompt_end, on="user_id", how="left")
    # no CTR sample is older than the prompt context its user's profile could have seen
    leaks = ctr.filter(pl.col("p_max").is_not_null() & (pl.col("timestamp") < pl.col("p_max")))
    assert leaks.height == 0, leaks.head()
    return df


def test_ml100k_split_has_no_leak_and_respects_share_and_cap(ml100k_interactions):
    cfg = SplitConfig(prompt_share=0.5, prompt_cap=30)
    split, bounds = split_interactions(ml100k_interactions, cfg)
    assert split.schema.equals(SPLIT_INTERACTIONS)
    assert split.num_rows == 100_000
    df = _assert_no_leak(split)
    per_user = df.group_by("user_id").agg(
        pl.len().alias("n"), (pl.col("split") == "prompt").sum().alias("p")
    )
    expected = per_user.with_columns(pl.min_horizontal((pl.col("n") * 0.5).floor().cast(pl.UInt32), pl.lit(30, pl.UInt32)).alias("e"))
    assert (expected["p"] == expected["e"]).all()
    # validation and test lie strictly after training in time
    assert bounds.valid_from <= bounds.test_from
    assert df.filter(pl.col("split") == "train")["timestamp"].max() < bounds.valid_from
    assert df.filter(pl.col("split") == "test")["timestamp"].min() >= bounds.test_from
    sizes = split_sizes(split)
    assert sum(sizes.values()) == 100_000 and min(sizes.values()) > 0


def test_hand_built_history_ties_and_labels():
    inter = pa.table(
        {
            "user_id": ["u"] * 6 + ["v"] * 2,
            "item_id": ["a", "b", "c", "d", "e", "f", "a", "b"],
            "rating": [5, 1, 4, 3, None, 2, 4, 5],
            "timestamp": [100, 100, 50, 300, 400, 500, 10, 20],
        }
    )
    cfg = SplitConfig(prompt_share=0.5, prompt_cap=2, valid_share=0.2, test_share=0.2, click_threshold=3)
    split, _ = split_interactions(conform(inter, INTERACTIONS), cfg)
    df = _assert_no_leak(split)
    # u's oldest two (c@50, then a@100 before b@100 by item id) are prompt-only; the cap wins over half of 6
    assert df.filter((pl.col("user_id") == "u") & (pl.col("split") == "prompt"))["item_id"].to_list() == ["c", "a"]
    assert prompt_context(split).filter(pl.col("user_id") == "u")["item_id"].to_list() == ["c", "a"]
    samples = pl.from_arrow(ctr_samples(split, cfg))
    assert ctr_samples(split, cfg).schema.equals(CTR_SAMPLES)
    assert "prompt" not in samples["split"].to_list()
    mine = samples.filter(pl.col("user_id") == "u")
    labels = dict(zip(mine["item_id"].to_list(), mine["label"].to_list()))
    # rating > 3 is a click; a missing rating means an implicit-feedback interaction, i.e. a click
    assert labels["b"] == 0 and labels["d"] == 0 and labels["e"] == 1 and labels["f"] == 0
    assert not samples["synthetic"].any()


def test_every_sample_of_the_real_data_comes_after_its_users_prompt(ml100k_interactions):
    cfg = SplitConfig()
    split, _ = split_interactions(ml100k_interactions, cfg)
    samples = pl.from_arrow(ctr_samples(split, cfg))
    prompt = pl.from_arrow(split).filter(pl.col("split") == "prompt")
    last = prompt.group_by("user_id").agg(pl.col("timestamp").max().alias("p_max"))
    joined = samples.join(last, on="user_id", how="left")
    assert joined.filter(pl.col("timestamp") < pl.col("p_max")).height == 0
    assert samples.height == 100_000 - prompt.height
