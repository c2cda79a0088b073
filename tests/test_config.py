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
