"""The demo config on the packaged data: the counts the README promises, and `recaug preview` with
the real packaged model (the data engineer's inner loop)."""

import re
from pathlib import Path

import pytest

from recaug.pipelines import cli

DEMO = Path(__file__).resolve().parent.parent / "configs" / "ml100k.yaml"


def test_validate_prints_the_full_movielens_with_nothing_quarantined(tmp_path, capsys, monkeypatch):
    import yaml

    data = yaml.safe_load(DEMO.read_text())
    data["workdir"] = str(tmp_path / "work")
    cfg = tmp_path / "ml100k.yaml"
    cfg.write_text(yaml.safe_dump(data))
    assert cli.main(["validate", str(cfg)]) == 0
    out = capsys.readouterr().out
    assert re.search(r"users\s+943\s+943\s+0\s", out)
    assert re.search(r"items\s+1,682\s+1,682\s+0\s", out)
    assert re.search(r"interactions\s+100,000\s+100,000\s+0\s", out)
    sizes = {m[0]: int(m[1].replace(",", "")) for m in re.findall(r"^(prompt|train|valid|test)\s+([\d,]+)$", out, re.M)}
    assert set(sizes) == {"prompt", "train", "valid", "test"} and sum(sizes.values()) == 100_000


@pytest.mark.slow
def test_preview_shows_prompt_answer_and_parsed_record(tmp_path, capsys, write_config):
    path = write_config({"name": "pv", "engine": {"kind": "transformers", "model": "smollm2", "max_new_tokens": 40}})
    assert cli.main(["preview", str(path), "llmrec_item_attributes", "-n", "2"]) == 0
    out = capsys.readouterr().out
    assert out.count("=================== llmrec_item_attributes · item") == 2
    assert "--- prompt [user]" in out and "Reply with a JSON object" in out
    assert "--- LLM answer (" in out
    # each sample ends either in a parsed record or in the validation error that would dead-letter it
    assert out.count("--- parsed record") + out.count("--- validation error:") == 2
