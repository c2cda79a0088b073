import pytest

from recaug.core.config import ConfigError, load_config, parse_config

REPO_CONFIG = __import__("pathlib").Path(__file__).resolve().parent.parent / "configs" / "ml100k.yaml"


def test_demo_config_loads():
    cfg = load_config(REPO_CONFIG)
    assert cfg.name == "ml100k" and cfg.dataset.kind == "ml100k"
    assert cfg.workdir_path().name == "ml100k"
    assert cfg.workdir_path().parent.parent == REPO_CONFIG.parent.parent  # relative to the config file


def test_unknown_key_is_named():
    with pytest.raises(ConfigError) as err:
        parse_config({"name": "x", "split": {"promt_share": 0.5}})
    assert "split.promt_share: unknown key" in str(err.value)


def test_bad_choice_lists_allowed_values():
    with pytest.raises(ConfigError) as err:
        parse_config({"name": "x", "engine": {"kind": "llama"}})
    msg = str(err.value)
    assert "engine.kind" in msg and "'llama' is not allowed" in msg and "'transformers'" in msg and "'vllm'" in msg


def test_out_of_range_value_names_key_and_value():
    with pytest.raises(ConfigError) as err:
        parse_config({"name": "x", "split": {"prompt_share": 1.5}})
    assert "split.prompt_share" in str(err.value) and "1.5" in str(err.value)


def test_files_dataset_needs_its_tables():
    with pytest.raises(ConfigError, match="dataset.users"):
        parse_config({"name": "x", "dataset": {"kind": "files", "items": {"path": "i.csv"}, "interactions": {"path": "x.csv"}}})


def test_duplicate_augmenter_and_missing_name():
    with pytest.raises(ConfigError, match="augmenter listed twice: kar_item_knowledge"):
        parse_config({"name": "x", "augmenters": [{"name": "kar_item_knowledge"}, {"name": "kar_item_knowledge"}]})
    with pytest.raises(ConfigError, match="name: required key is missing"):
        parse_config({"split": {}})


def test_yaml_errors_and_missing_file(tmp_path):
    with pytest.raises(ConfigError, match="not found"):
        load_config(tmp_path / "nope.yaml")
    bad = tmp_path / "bad.yaml"
    bad.write_text("name: [unclosed\n")
    with pytest.raises(ConfigError, match="not valid YAML"):
        load_config(bad)
    bad.write_text("- a list\n")
    with pytest.raises(ConfigError, match="must be a mapping"):
        load_config(bad)


# --- engine: one config class per kind ------------------------------------------------------------


def test_engine_section_is_validated_by_the_class_of_its_kind():
    from recaug.core.config import EngineConfig, FakeConfig, HTTPConfig, TransformersConfig, VLLMConfig

    cfg = parse_config({"name": "x", "engine": {"kind": "http", "base_url": "http://h/v1", "http_retries": 1}})
    assert type(cfg.engine) is HTTPConfig and cfg.engine.http_retries == 1
    assert type(parse_config({"name": "x"}).engine) is TransformersConfig  # the default kind
    assert type(EngineConfig(kind="vllm")) is VLLMConfig and type(EngineConfig(kind="fake")) is FakeConfig
    # the dump (and so every config hash) keeps the keys of the engine's own class
    assert cfg.hash_view()["engine"]["base_url"] == "http://h/v1" and "batch_size" not in cfg.hash_view()["engine"]
    assert parse_config({"name": "x"}).hash_view()["engine"]["batch_size"] == 16


def test_a_key_of_another_engine_is_refused_with_the_engines_that_take_it():
    with pytest.raises(ConfigError) as err:
        parse_config({"name": "x", "engine": {"kind": "vllm", "batch_size": 8, "device": "cuda"}})
    msg = str(err.value)
    assert "batch_size is a key of engine kind transformers, not of kind 'vllm'" in msg
    assert "device is a key of engine kind transformers" in msg
    with pytest.raises(ConfigError, match="engine.batch_sise: unknown key"):
        parse_config({"name": "x", "engine": {"batch_sise": 8}})


@pytest.mark.parametrize("old,new,engine", [("max_attempts", "parse_attempts", {}),
                                            ("max_retries", "http_retries", {"kind": "http"})])
def test_a_renamed_engine_key_names_its_new_name(old, new, engine):
    with pytest.raises(ConfigError) as err:
        parse_config({"name": "x", "engine": {**engine, old: 3}})
    assert f"engine: {old} was renamed to {new}" in str(err.value)


def test_docs_config_lists_every_engine_key_as_the_models_describe_it():
    """docs/config.md's engine table is generated from the config classes: a field added, removed,
    renamed or re-described without regenerating it fails here."""
    from recaug.core.config import (
        ENGINE_CONFIGS,
        ENGINE_DOCS_BEGIN,
        ENGINE_DOCS_END,
        EngineConfig,
        engine_keys_markdown,
    )

    doc = (REPO_CONFIG.parent.parent / "docs" / "config.md").read_text(encoding="utf-8")
    block = doc.partition(ENGINE_DOCS_BEGIN)[2].partition(ENGINE_DOCS_END)[0].strip()
    builtin = {k: c for k, c in ENGINE_CONFIGS.items() if k in ("transformers", "vllm", "http", "fake")}
    for kind, cls in builtin.items():
        for name, info in cls.model_fields.items():
            assert info.description, f"{cls.__name__}.{name} has no Field(description=...)"
            row = f"| `{name}` |"
            assert row in block, f"engine key {name} ({kind}) is missing from docs/config.md"
            assert info.description in block, f"the description of engine key {name} in docs/config.md is stale"
    if set(ENGINE_CONFIGS) == set(builtin):  # (a test module may have registered its own engine)
        assert block == engine_keys_markdown().strip(), (
            "docs/config.md's engine keys differ from the config classes; regenerate them with "
            "python -c \"from recaug.core.config import update_engine_docs; update_engine_docs('docs/config.md')\"")
    assert set(EngineConfig.model_fields) <= set(builtin["fake"].model_fields)
