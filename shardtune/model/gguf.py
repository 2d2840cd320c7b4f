"""GGUF sources: a `.gguf` file is dequantized once, through transformers' GGUF loader, into a cached Hugging Face
directory (bf16 safetensors + config + the file's own tokenizer and chat template). Every engine and every export
verb then reads that directory like any other model, so FSDP/ZeRO-3 streaming, QLoRA re-quantization and
generate/evaluate/export need nothing GGUF-specific.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import shutil
from contextlib import contextmanager
from pathlib import Path
from types import SimpleNamespace
from typing import Optional

from shardtune.errors import EnvironmentProblem, ModelError

log = logging.getLogger(__name__)

SOURCE_FILE = "gguf_source.json"  # written into the converted directory: where it came from, how it was stored
_DONE = ".complete"
# bf16 keeps the dequantized values to ~0.4% relative rounding, far below the 4/5/6-bit block quantization the file
# already carries (docs/spider.md measures both), at half the disk and RAM of fp32.
STORAGE_DTYPE = "bfloat16"
_INSTALL = "pip install 'shardtune[gguf]' (or: pip install gguf)"


def gguf_source(mcfg) -> Optional[Path]:
    """The GGUF file a model config names (name_or_path ending in .gguf, or a directory plus gguf_file), else None."""
    name = str(mcfg.name_or_path)
    gfile = getattr(mcfg, "gguf_file", None)
    if gfile:
        folder = Path(name).expanduser()
        if not folder.is_dir():
            raise ModelError(f"model.gguf_file={gfile} needs model.name_or_path to be the directory holding it; "
                             f"'{name}' is not a directory")
        path = folder / gfile
    elif name.lower().endswith(".gguf"):
        path = Path(name).expanduser()
    else:
        return None
    if not path.is_file():
        raise ModelError(f"GGUF file '{path}' does not exist; pass model.name_or_path=/path/to/model.gguf "
                         f"(or a directory plus model.gguf_file=NAME.gguf)")
    return path


def require_gguf() -> None:
    try:
        import gguf  # noqa: F401
    except ImportError:
        raise EnvironmentProblem(f"reading a .gguf model needs the gguf package; {_INSTALL}") from None


def _cache_root() -> Path:
    return Path(os.environ.get("SHARDTUNE_CACHE", Path.home() / ".cache" / "shardtune")) / "gguf"


def _cache_key(path: Path) -> str:
    """Path, size and mtime name the file (hashing a multi-GB file on every run would cost seconds to minutes);
    the transformers version is in the key because its GGUF conversion (names, permutations) decides the result."""
    import transformers
    st = path.stat()
    ident = f"{path.resolve()}|{st.st_size}|{st.st_mtime_ns}|{transformers.__version__}|{STORAGE_DTYPE}"
    return hashlib.sha256(ident.encode()).hexdigest()[:16]


@contextmanager
def _lock(path: Path):
    """One converter per cache entry across processes on a host (DDP ranks all resolve the model at start)."""
    import fcntl
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "w") as fh:
        fcntl.flock(fh, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(fh, fcntl.LOCK_UN)


def converted_dir_for(path: Path) -> Path:
    """Where `path`'s dequantized copy lives (existing or not)."""
    return _cache_root() / f"{path.stem}-{_cache_key(path)}"


def dequantized_model_dir(path: Path) -> Path:
    """The cached HF directory for GGUF file `path`, converting it on first use. Conversion holds the whole model in
    bf16 in host RAM once (2 bytes/param: ~16 GB for an 8B model)."""
    path = Path(path)
    target = converted_dir_for(path)
    if (target / _DONE).is_file():
        return target
    require_gguf()
    with _lock(target.with_name(target.name + ".lock")):
        if (target / _DONE).is_file():  # another process converted it while we waited
            return target
        tmp = target.with_name(target.name + f".tmp{os.getpid()}")
        shutil.rmtree(tmp, ignore_errors=True)
        try:
            _convert(path, tmp)
            shutil.rmtree(target, ignore_errors=True)  # a partial directory from a killed conversion
            os.replace(tmp, target)
        finally:
            shutil.rmtree(tmp, ignore_errors=True)
    log.info("dequantized %s into %s (%s safetensors)", path, target, STORAGE_DTYPE)
    return target


def resolve_gguf_base(base: str, model_cfg: dict) -> str:
    """An adapter's base as generate/evaluate/export should load it: `--base FILE.gguf` becomes its dequantized
    directory, and a recorded cache directory that is gone (cleared cache, another machine) is rebuilt from the run's
    own model.name_or_path / model.gguf_file when that file still exists. Anything else is returned unchanged."""
    if base.lower().endswith(".gguf") and Path(base).expanduser().is_file():
        return str(dequantized_model_dir(Path(base).expanduser()))
    if Path(base).expanduser().exists() or not model_cfg.get("name_or_path"):
        return base
    try:
        src = gguf_source(SimpleNamespace(name_or_path=str(model_cfg["name_or_path"]),
                                          gguf_file=model_cfg.get("gguf_file")))
    except ModelError:  # the run's GGUF moved too: let the caller report the missing base
        return base
    if src is None or converted_dir_for(src).name != Path(base).name:
        return base
    return str(dequantized_model_dir(src))


def _convert(path: Path, out: Path) -> None:
    import torch
    import transformers
    from transformers import AutoModelForCausalLM, AutoTokenizer

    kw = {}
    try:  # transformers >= 5 can keep GGUF blocks packed (not trainable); ask for dense weights explicitly
        from transformers import GgufConfig
        kw["quantization_config"] = GgufConfig(dequantize=True)
    except ImportError:  # older versions always dequantize
        pass
    folder, name = str(path.parent), path.name
    try:
        tok = AutoTokenizer.from_pretrained(folder, gguf_file=name)
        model = AutoModelForCausalLM.from_pretrained(folder, gguf_file=name, dtype=getattr(torch, STORAGE_DTYPE),
                                                     low_cpu_mem_usage=True, **kw)
    except ImportError as e:
        if "gguf" in str(e).lower():
            raise EnvironmentProblem(f"reading '{path}' needs the gguf package; {_INSTALL}") from None
        raise
    except Exception as e:  # noqa: BLE001  the file is at fault: tokenizers raises bare Exception, the rest Value/Key
        first = (str(e).strip().splitlines() or [type(e).__name__])[0][:200]
        from transformers.modeling_gguf_pytorch_utils import GGUF_SUPPORTED_ARCHITECTURES as archs
        raise ModelError(f"cannot load GGUF file '{path}' ({first}); transformers {transformers.__version__} "
                         f"reads GGUF architectures {', '.join(a for a in archs if a not in ('general', 'tokenizer'))}"
                         f"; convert other models to a Hugging Face directory first") from None
    out.mkdir(parents=True)
    model.config.use_cache = True
    model.save_pretrained(str(out), safe_serialization=True)
    tok.save_pretrained(str(out))
    from importlib.metadata import version
    record = {"gguf_file": str(path.resolve()), "size_bytes": path.stat().st_size, "storage_dtype": STORAGE_DTYPE,
              "transformers": transformers.__version__, "gguf": version("gguf"),
              "has_chat_template": bool(getattr(tok, "chat_template", None))}
    (out / SOURCE_FILE).write_text(json.dumps(record, indent=2) + "\n")
    (out / _DONE).write_text("")
