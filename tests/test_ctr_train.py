"""The shared CTR training loop on real deepctr backbones.

Data: the toy world (recaug.ctr_models.toy) — 300 users, 200 items, clicks driven by a hidden
user/item affinity that the vectors partly reveal, split by the real KAR-protocol splitter — and
a slice of the packaged MovieLens-100K. Torch runs on one thread here: the tests share the
machine's cores with other processes, and the thread count changes speed, not behaviour.
"""

from __future__ import annotations

import numpy as np
import polars as pl
import pyarrow as pa
import pytest
import torch
from sklearn.metrics import roc_auc_score

from recaug.ctr_models.data import CTRDataError, FeatureSpec, build_ctr_data
from recaug.ctr_models.metrics import gauc
from recaug.ctr_models.network import build_model
from recaug.ctr_models.toy import make_toy_world
from recaug.ctr_models.train import (
    WarmStartError,
    load_checkpoint,
    load_model,
    load_warm_weights,
    predict,
    save_checkpoint,
    train_ctr,
    train_on_data,
)
from recaug.ctr_models.zoo import MODEL_NAMES
from recaug.core.config import CTRConfig, SplitConfig
from recaug.core.packaged import ml100k_dir
from recaug.ctr_models.splits import ctr_samples, split_interactions
from recaug.schemas import CTR_SAMPLES, INTERACTIONS, ITEMS, SPLIT_INTERACTIONS, USERS, conform

THREADS = 1
FAST = dict(epochs=4, patience=1, batch_size=256, history_len=10)


@pytest.fixture(scope="module")
def world():
    return make_toy_world(seed=0)


@pytest.fixture(scope="module")
def data(world):
    return build_ctr_data(world.samples, world.users, world.items, world.split, world.vectors, history_len=10, synthetic=world.synthetic)


@pytest.mark.parametrize("model_name", MODEL_NAMES)
def test_each_backbone_beats_a_constant_predictor(data, model_name):
    result = train_on_data(data, CTRConfig(adaptor="hybrid", **FAST), model_name, seed=0, num_threads=THREADS)
    # a constant predictor has AUC 0.5; the toy labels carry a learnable signal worth ~0.68-0.72
    assert result.metrics["test_auc"] > 0.6, result.metrics
    assert result.metrics["test_gauc"] > 0.55, result.metrics
    assert result.metrics["test_gauc_users"] > 100
    assert result.split_reads == {"train": 1, "valid": 1, "test": 1}
    assert 1 <= result.best_epoch <= result.metrics["epochs_run"]


def _with_shuffled_test_labels(samples: pa.Table, seed: int) -> pa.Table:
    df = pl.from_arrow(samples)
    test = df.filter(pl.col("split") == "test")
    shuffled = test.with_columns(pl.Series("label", np.random.default_rng(seed).permutation(test["label"].to_numpy())))
    return conform(pl.concat([df.filter(pl.col("split") != "test"), shuffled]).to_arrow(), CTR_SAMPLES)


def test_model_selection_sees_validation_only_and_test_is_read_once_last(world):
    cfg = CTRConfig(adaptor="mlp", epochs=6, patience=1, batch_size=256, history_len=10)
    runs = []
    for samples in (world.samples, _with_shuffled_test_labels(world.samples, seed=1)):
        data = build_ctr_data(samples, world.users, world.items, world.split, world.vectors, history_len=10)
        result = train_on_data(data, cfg, "deepfm", seed=7, num_threads=THREADS)
        assert data.reads["test"] == 1
        assert data.access_log[-1] == "test" and data.access_log.count("test") == 1
        runs.append(result)
    original, shuffled = runs
    # scrambling the test labels changes nothing about training or selection...
    assert original.history_of_valid_auc == shuffled.history_of_valid_auc
    assert original.train_loss_history == shuffled.train_loss_history
    assert original.best_epoch == shuffled.best_epoch
    assert original.metrics["valid_auc"] == shuffled.metrics["valid_auc"]
    # ...only the test figures, which are computed after selection
    assert original.metrics["test_auc"] > 0.6
    assert abs(shuffled.metrics["test_auc"] - 0.5) < 0.08
    # the kept epoch is the best validation epoch; training stopped `patience` epochs after it
    history = original.history_of_valid_auc
    assert original.best_epoch == int(np.argmax(history)) + 1
    assert original.metrics["valid_auc"] == max(history)
    assert len(history) == min(cfg.epochs, original.best_epoch + cfg.patience)


def test_synthetic_interactions_join_train_only(world, data):
    plain = build_ctr_data(world.samples, world.users, world.items, world.split, world.vectors, history_len=10)
    n_real = data.size("train")
    train, info = data.train_split(0.1, seed=5)
    assert info["synthetic_added"] == round(0.1 * n_real) == int(train.synthetic.sum())
    assert len(train) == n_real + info["synthetic_added"]
    again, _ = data.train_split(0.1, seed=5)
    other, _ = data.train_split(0.1, seed=6)
    assert torch.equal(again.ids, train.ids)  # deterministic for a seed
    assert not torch.equal(other.ids, train.ids)
    for name in ("valid", "test"):
        with_pool, without = data.split(name), plain.split(name)
        assert not with_pool.synthetic.any()
        assert torch.equal(with_pool.ids, without.ids) and torch.equal(with_pool.labels, without.labels)
    # more than the pool holds: everything in the pool, and the shortfall is reported
    _, capped = data.train_split(10.0, seed=0)
    assert capped["synthetic_added"] == capped["synthetic_available"] == world.synthetic.num_rows < capped["synthetic_wanted"]

    result = train_on_data(data, CTRConfig(adaptor="none", synthetic_rate=0.1, **FAST), "wdl", seed=5, num_threads=THREADS)
    assert result.metrics["n_train_synthetic"] == info["synthetic_added"]
    assert result.metrics["n_train"] == n_real + info["synthetic_added"]
    assert result.metrics["n_valid"] == plain.size("valid") and result.metrics["n_test"] == plain.size("test")

    # synthetic rows labelled valid/test in the samples table break the contract
    bad = pl.from_arrow(world.samples).with_columns(
        pl.when(pl.col("split") == "test").then(True).otherwise(pl.col("synthetic")).alias("synthetic")
    )
    with pytest.raises(CTRDataError, match="training-only"):
        build_ctr_data(bad.to_arrow(), world.users, world.items, world.split, {}, history_len=10)


@pytest.mark.parametrize("adaptor, every, scaled", [("hybrid", 16, True), ("hybrid", 1, False), ("mlp", 4, True)])
def test_a_warm_start_gives_the_adaptor_the_backbones_learning_rate(world, adaptor, every, scaled):
    from recaug.ctr_models.network import build_model
    from recaug.ctr_models.train import make_optimizer

    data = build_ctr_data(world.samples, world.users, world.items, world.split, world.vectors, history_len=10)
    cfg = CTRConfig(adaptor=adaptor, adaptor_update_every=every, embedding_dim=8)
    model = build_model("deepfm", data.spec, cfg, seed=0)
    cold, warm = make_optimizer(model, cfg), make_optimizer(model, cfg, warm_start=True)
    assert cold.param_groups[-1]["lr"] == pytest.approx(cfg.learning_rate * (every if scaled else 1))
    assert warm.param_groups[-1]["lr"] == pytest.approx(cfg.learning_rate)
    # the window size stays with the adaptor's group: a warm start keeps the windowed schedule
    assert max(g.get("adaptor_update_every", 1) for g in warm.param_groups) == (every if scaled else 1)


def test_warm_start_loads_weights_and_grows_vocabularies(world, tmp_path):
    cfg = CTRConfig(adaptor="hybrid", epochs=3, patience=3, batch_size=256, history_len=10)
    args = (world.samples, world.users, world.items, world.split, world.vectors, cfg, "deepfm", 0)
    first = train_ctr(*args, checkpoint_dir=tmp_path / "ckpt", lineage={"snapshot_id": "S1", "config_hash": "abc"}, num_threads=THREADS)
    ckpt = load_checkpoint(first.checkpoint_path)
    assert ckpt["lineage"] == {"snapshot_id": "S1", "config_hash": "abc", "seed": 0}
    assert ckpt["model_name"] == "deepfm" and ckpt["adaptor"] == "hybrid"
    assert len(ckpt["feature_spec"]["vocabularies"]["user_id"]) == 300
    assert ckpt["best_epoch"] == first.best_epoch

    # weights equal after load: the warm model scores validation exactly like the saved best model
    warm = train_ctr(*args, warm_start=first.checkpoint_path, checkpoint_dir=tmp_path / "ckpt2", num_threads=THREADS)
    assert warm.metrics["warm_start_valid_auc"] == pytest.approx(first.metrics["valid_auc"], abs=1e-9)
    model, spec, _ = load_model(first.checkpoint_path)  # the scoring path sees the same weights
    valid = build_ctr_data(world.samples, world.users, world.items, world.split, world.vectors, 10, base_spec=spec)
    assert valid.spec == spec
    assert roc_auc_score(valid.split("valid").labels.numpy(), predict(model, valid, valid.split("valid"))) == pytest.approx(
        first.metrics["valid_auc"], abs=1e-9
    )
    # and it resumes: the first epoch's training loss is below the from-scratch first epoch
    assert warm.train_loss_history[0] < first.train_loss_history[0]
    assert load_checkpoint(warm.checkpoint_path)["lineage"]["warm_start_from"] == str(first.checkpoint_path)
    # from scratch the windowed adaptor steps at k times the rate; from trained weights at the backbone's
    assert first.data_summary["adaptor_learning_rate"] == pytest.approx(cfg.learning_rate * cfg.adaptor_update_every)
    assert warm.data_summary["adaptor_learning_rate"] == pytest.approx(cfg.learning_rate)

    # new users and items: old indices keep their meaning, embedding tables grow
    bigger = make_toy_world(n_users=330, n_items=220, seed=1)
    old_spec = FeatureSpec.from_dict(ckpt["feature_spec"])
    grown_data = build_ctr_data(
        bigger.samples, bigger.users, bigger.items, bigger.split, bigger.vectors, history_len=10, base_spec=old_spec
    )
    for name in ("user_id", "item_id"):
        old_values = old_spec.vocabularies[name].values
        assert grown_data.spec.vocabularies[name].values[: len(old_values)] == old_values
    assert grown_data.spec.vocabularies["user_id"].size == 330 + 2
    model = build_model("deepfm", grown_data.spec, cfg, seed=0)
    grown = load_warm_weights(model, ckpt["state_dict"])
    key = "backbone.embedding_dict.user_id.weight"
    assert grown[key] == (302, 332)
    torch.testing.assert_close(model.state_dict()[key][:302], ckpt["state_dict"][key])
    resumed = train_on_data(grown_data, cfg, "deepfm", seed=0, warm_start=ckpt, num_threads=THREADS)
    assert "backbone.embedding_dict.item_id.weight" in resumed.data_summary["warm_start_grown_tables"]

    with pytest.raises(WarmStartError, match="model 'deepfm' vs 'wdl'"):
        train_on_data(grown_data, cfg, "wdl", seed=0, warm_start=ckpt, num_threads=THREADS)


def _decode(data, rows) -> list[list[str]]:
    items = data.spec.vocabularies["item_id"].values
    cols = data.spec.id_columns()
    a, b = cols["hist_item_id"]
    lengths = rows.ids[:, cols["hist_len"][0]].tolist()
    return [[items[int(i) - 2] for i in row[:n]] for row, n in zip(rows.ids[:, a:b].tolist(), lengths)]


def test_checkpoints_from_before_the_hidden_width_setting_load_with_kars_width(data, tmp_path):
    """Checkpoints written before `adaptor_hidden_dim` existed were trained with experts of width 128
    (and, being older than `vector_dnn_copy` too, with the adaptor outputs in DeepFM's DNN)."""
    old = build_model("deepfm", data.spec, CTRConfig(adaptor="hybrid", adaptor_hidden_dim=128, vector_dnn_copy=True), seed=0)
    ctr_config = CTRConfig(adaptor="hybrid", adaptor_hidden_dim=32).model_dump(mode="json")
    del ctr_config["adaptor_hidden_dim"], ctr_config["vector_dnn_copy"]
    path = save_checkpoint(tmp_path / "old.pt", {
        "format": "recaug.ctr_checkpoint/1", "model_name": "deepfm", "adaptor": "hybrid", "ctr_config": ctr_config,
        "feature_spec": data.spec.to_dict(), "state_dict": old.state_dict(), "lineage": {"seed": 0},
    })
    model, _, _ = load_model(path)
    assert model.adaptor.shared[0][0].out_features == 128
    ids = data.split("valid").ids[:32]
    vectors, missing = data.gather_vectors(ids)
    old.eval()
    torch.testing.assert_close(model(ids, vectors, missing), old(ids, vectors, missing))
    with pytest.raises(WarmStartError, match="adaptor_hidden_dim 128 vs 32"):
        cfg = CTRConfig(adaptor="hybrid", adaptor_hidden_dim=32, **FAST)
        train_on_data(data, cfg, "deepfm", seed=0, warm_start=path, num_threads=THREADS)


def test_deepfm_feeds_its_dnn_the_vectors_through_their_fields_and_old_checkpoints_keep_their_layout(data, tmp_path):
    """DeepFM's DNN sees each adaptor output through its FM field only (`ctr.vector_dnn_copy` null); a
    checkpoint written before the setting existed also fed the outputs to the DNN, and loads and
    warm-starts with that layout."""
    new = build_model("deepfm", data.spec, CTRConfig(adaptor="hybrid"), seed=0)
    old = build_model("deepfm", data.spec, CTRConfig(adaptor="hybrid", vector_dnn_copy=True), seed=0)
    assert (new.vector_dnn_copy, old.vector_dnn_copy) == (False, True)
    n_vec = len(data.spec.vectors)
    width = {m: m.backbone.dnn.linears[0].in_features for m in (new, old)}
    assert width[old] - width[new] == n_vec * 32
    # the linear part still reads every output; the missing flags still enter the DNN
    assert new.backbone.linear_model.weight.shape == old.backbone.linear_model.weight.shape
    assert all(f"{v.slug}__missing" in {c.name for c in new.backbone.dnn_feature_columns} for v in data.spec.vectors)
    # a backbone without knowledge fields keeps its only dense route whatever the setting; raw vectors
    # (d-dim) keep the copy unless told otherwise
    assert build_model("din", data.spec, CTRConfig(adaptor="hybrid", vector_dnn_copy=False), seed=0).vector_dnn_copy
    assert build_model("deepfm", data.spec, CTRConfig(adaptor="raw"), seed=0).vector_dnn_copy

    ctr_config = CTRConfig(adaptor="hybrid").model_dump(mode="json")
    del ctr_config["vector_dnn_copy"]
    path = save_checkpoint(tmp_path / "old.pt", {
        "format": "recaug.ctr_checkpoint/1", "model_name": "deepfm", "adaptor": "hybrid", "ctr_config": ctr_config,
        "feature_spec": data.spec.to_dict(), "state_dict": old.state_dict(), "lineage": {"seed": 0},
    })
    loaded, _, _ = load_model(path)
    assert loaded.vector_dnn_copy
    ids = data.split("valid").ids[:32]
    vectors, missing = data.gather_vectors(ids)
    old.eval()
    torch.testing.assert_close(loaded(ids, vectors, missing), old(ids, vectors, missing))

    # the daily warm start continues the checkpoint's layout, and its checkpoint says which it is
    warm = train_on_data(data, CTRConfig(adaptor="hybrid", **FAST), "deepfm", seed=0, warm_start=path,
                         checkpoint_dir=tmp_path / "warm", num_threads=THREADS)
    assert warm.data_summary["vector_routes"] == "dense (linear + DNN) and FM fields"
    assert load_checkpoint(warm.checkpoint_path)["ctr_config"]["vector_dnn_copy"] is True
    with pytest.raises(WarmStartError, match="vector_dnn_copy True vs False"):
        train_on_data(data, CTRConfig(adaptor="hybrid", vector_dnn_copy=False, **FAST), "deepfm", seed=0,
                      warm_start=path, num_threads=THREADS)
    cold = train_on_data(data, CTRConfig(adaptor="hybrid", **FAST), "deepfm", seed=0, checkpoint_dir=tmp_path / "cold",
                         num_threads=THREADS)
    assert load_checkpoint(cold.checkpoint_path)["ctr_config"]["vector_dnn_copy"] is False
    assert cold.data_summary["vector_routes"] == "dense (linear) and FM fields (FM + DNN)"
    assert not load_model(cold.checkpoint_path)[0].vector_dnn_copy

    # a null in a hand-built checkpoint is the layout before, not today's default
    ctr_config["vector_dnn_copy"] = None
    nulled = save_checkpoint(tmp_path / "null.pt", {**load_checkpoint(path), "ctr_config": ctr_config})
    assert load_model(nulled)[0].vector_dnn_copy
    # without vectors both layouts are one model: a baseline's warm start is never refused over it
    base = train_on_data(data, CTRConfig(adaptor="none", **FAST), "deepfm", seed=0, checkpoint_dir=tmp_path / "base",
                         num_threads=THREADS)
    again = train_on_data(data, CTRConfig(adaptor="none", vector_dnn_copy=False, **FAST), "deepfm", seed=0,
                          warm_start=base.checkpoint_path, num_threads=THREADS)
    assert again.metrics["warm_start_valid_auc"] == pytest.approx(base.metrics["valid_auc"], abs=1e-9)


def test_history_is_prompt_then_earlier_train_positives():
    split = conform(
        pa.table(
            {
                "user_id": ["a"] * 9,
                "item_id": ["p1", "p2", "x1", "x2", "x3", "x4", "v1", "t1", "t2"],
                "rating": [1.0, 5.0, 5.0, 1.0, 5.0, 5.0, 5.0, 5.0, 1.0],
                "timestamp": [1, 2, 10, 20, 30, 30, 40, 50, 60],
                "split": ["prompt", "prompt", "train", "train", "train", "train", "valid", "test", "test"],
            }
        ),
        SPLIT_INTERACTIONS,
    )
    samples = ctr_samples(split, SplitConfig())
    users = conform(pa.table({"user_id": ["a"], "age": [30], "gender": ["F"], "occupation": ["x"]}), USERS)
    items = conform(pa.table({"item_id": ["p1"], "title": ["P1"], "year": [1990], "genres": [["Drama"]]}), ITEMS)
    synthetic = pa.table({"user_id": ["a"], "item_id": ["s1"], "label": pa.array([1], pa.int8())})
    data = build_ctr_data(samples, users, items, split, {}, history_len=3, synthetic=synthetic)
    train = data.split("train")
    # train rows sorted by time (x3 and x4 share t=30: neither sees the other)
    assert _decode(data, train) == [["p1", "p2"], ["p1", "p2", "x1"], ["p1", "p2", "x1"], ["p1", "p2", "x1"]]
    # valid/test see train positives only (never valid/test labels), newest three kept
    assert _decode(data, data.split("valid")) == [["x1", "x3", "x4"]]
    assert _decode(data, data.split("test")) == [["x1", "x3", "x4"], ["x1", "x3", "x4"]]
    syn, _ = data.train_split(1.0, seed=0)
    assert _decode(data, syn.take(np.flatnonzero(syn.synthetic))) == [["p1", "p2"]]
    assert data.summary["unknown_ids"]["samples_without_item_row"] == 7  # only p1 is in the items table


def test_gauc_matches_per_user_auc():
    rng = np.random.default_rng(0)
    users = rng.integers(0, 30, size=600)
    labels = rng.integers(0, 2, size=600)
    preds = np.round(rng.random(600) + 0.3 * labels, 1)  # rounding makes ties
    value, counted = gauc(users, labels, preds)
    num, den, n_users = 0.0, 0, 0
    for u in np.unique(users):
        m = users == u
        if labels[m].min() == labels[m].max():
            continue
        num += roc_auc_score(labels[m], preds[m]) * m.sum()
        den += m.sum()
        n_users += 1
    assert counted == n_users
    assert value == pytest.approx(num / den, abs=1e-12)


def test_bad_inputs_are_reported(world):
    prompt_rows = pl.from_arrow(world.samples).with_columns(pl.lit("prompt").alias("split")).head(3)
    samples = pl.concat([pl.from_arrow(world.samples), prompt_rows]).to_arrow()
    with pytest.raises(CTRDataError, match="split outside"):
        build_ctr_data(samples, world.users, world.items, world.split, {}, history_len=5)
    with pytest.raises(CTRDataError, match="'user:<name>'"):
        build_ctr_data(world.samples, world.users, world.items, world.split, {"kar": world.vectors["user:toy_preference"]}, 5)
    dup = pa.concat_tables([world.users, world.users.slice(0, 2)])
    with pytest.raises(CTRDataError, match="2 duplicate user_id"):
        build_ctr_data(world.samples, dup, world.items, world.split, {}, history_len=5)


def _ml100k_slice(n_users: int):
    def read(name: str) -> pl.DataFrame:
        df = pl.read_csv(ml100k_dir() / f"ml-100k.{name}", separator="\t", infer_schema=False, quote_char=None)
        return df.rename({c: c.split(":", 1)[0] for c in df.columns})

    keep = read("user")["user_id"].head(n_users).implode()
    users = read("user").filter(pl.col("user_id").is_in(keep)).select(
        "user_id", pl.col("age").cast(pl.Int32), "gender", "occupation"
    )
    items = read("item").select(
        "item_id",
        pl.col("movie_title").alias("title"),
        pl.col("release_year").cast(pl.Int32, strict=False).alias("year"),
        pl.col("class").str.split(" ").alias("genres"),
    )
    inter = read("inter").filter(pl.col("user_id").is_in(keep)).select(
        "user_id", "item_id", pl.col("rating").cast(pl.Float32), pl.col("timestamp").cast(pl.Float64).cast(pl.Int64)
    )
    split, _ = split_interactions(conform(inter.to_arrow(), INTERACTIONS), SplitConfig())
    return conform(users.to_arrow(), USERS), conform(items.to_arrow(), ITEMS), split, ctr_samples(split, SplitConfig())


def test_movielens_slice_trains_din_above_chance(tmp_path):
    users, items, split, samples = _ml100k_slice(300)
    cfg = CTRConfig(adaptor="none", epochs=3, patience=1, batch_size=512, history_len=10)
    result = train_ctr(samples, users, items, split, None, cfg, "din", seed=0, checkpoint_dir=tmp_path, num_threads=THREADS)
    assert result.metrics["n_train"] > 15_000
    assert result.metrics["test_auc"] > 0.6, result.metrics
    assert result.checkpoint_path.name == "din-none-seed0.pt"
