"""The runtime directory: a stage as the device executes it, in a low-bit ONNX layout.

One folder, flat, that onnxruntime-genai can open as it is::

    runtime.json        what this folder holds (below); written last
    model.onnx          the graph (fused attention with a KV cache, MatMulNBits, ...)
    model.onnx.data     every initializer of the graph: the runtime weights
    genai_config.json   onnxruntime-genai's model description and the generation settings
    tokenizer.json, tokenizer_config.json, ...   the tokenizer, for ``generate``

``runtime.json``::

    {"format": "edgebuild-runtime", "version": 1,
     "encodings": {"linear": "int4", "embedding": "int4", ...}, "knobs": {...},
     "weights_file": "model.onnx.data", "weights_sha256": "...", "runtime_bytes": N,
     "files": {name: {"bytes": N, "sha256": "..."}},
     "requirements": [{"domain", "op", "min_onnxruntime", "why"}], "tensors": {...}, ...}

``read_manifest`` checks the format and version; ``check_files`` checks every listed file's
size and sha256 and raises ``RuntimeFormatError`` naming the first file that is missing,
truncated or corrupt. Standard library only: the agent reads this before importing a runtime.
"""
from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path

FORMAT = "edgebuild-runtime"
VERSION = 1
MANIFEST = "runtime.json"
GRAPH = "model.onnx"
WEIGHTS = "model.onnx.data"
GENAI_CONFIG = "genai_config.json"
_CHUNK = 1 << 22


class RuntimeFormatError(ValueError):
    """A runtime directory or one of its files is missing, truncated, corrupt or of another version."""


def is_runtime_dir(path) -> bool:
    """Whether ``path`` is a folder holding a ``runtime.json``."""
    return (Path(path) / MANIFEST).is_file()


def sha256_file(path) -> str:
    """Hex sha256 of a file's content, read in chunks."""
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(_CHUNK), b""):
            digest.update(block)
    return digest.hexdigest()


def describe_files(folder, names) -> dict:
    """``{name: {"bytes", "sha256"}}`` of the files ``names`` inside ``folder``."""
    folder = Path(folder)
    return {name: {"bytes": (folder / name).stat().st_size, "sha256": sha256_file(folder / name)}
            for name in sorted(names)}


def read_manifest(folder) -> dict:
    """Read and check ``runtime.json`` of ``folder``; raise ``RuntimeFormatError`` when it is not one."""
    path = Path(folder) / MANIFEST
    try:
        manifest = json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise RuntimeFormatError(f"{path}: missing; {folder} is not a runtime directory "
                                 f"(encode the stage with edgebuild first)") from None
    except (OSError, UnicodeDecodeError, ValueError) as err:
        raise RuntimeFormatError(f"{path}: unreadable or not JSON ({err}); re-encode the stage") from None
    if not isinstance(manifest, dict) or manifest.get("format") != FORMAT:
        raise RuntimeFormatError(f"{path}: not an edgebuild runtime manifest (format "
                                 f"{manifest.get('format') if isinstance(manifest, dict) else None!r})")
    if manifest.get("version") != VERSION:
        raise RuntimeFormatError(f"{path}: runtime format version {manifest.get('version')!r} is not "
                                 f"supported (this agent reads {VERSION}); upgrade edgebuild-agent")
    if not isinstance(manifest.get("files"), dict) or manifest.get("weights_file") not in manifest["files"]:
        raise RuntimeFormatError(f"{path}: lists no files or no weights file; re-encode the stage")
    return manifest


def check_files(folder, manifest: dict, *, hashes: bool = True) -> dict:
    """Check size (and sha256 unless ``hashes`` is false) of every file ``manifest`` lists.

    Returns ``{name: sha256 computed here}``. Raises ``RuntimeFormatError`` naming the first bad file.
    """
    folder, computed = Path(folder), {}
    for name, entry in sorted(manifest["files"].items()):
        path = folder / name
        if os.path.basename(name) != name or not path.is_file():
            raise RuntimeFormatError(f"{path}: missing from the runtime directory; upload the stage again")
        size = path.stat().st_size
        if size != entry["bytes"]:
            what = "truncated" if size < entry["bytes"] else "longer than recorded"
            raise RuntimeFormatError(f"{path}: {what} ({size} bytes, expected {entry['bytes']}); "
                                     f"upload the stage again")
        if hashes:
            computed[name] = sha256_file(path)
            if computed[name] != entry["sha256"]:
                raise RuntimeFormatError(f"{path}: corrupt (sha256 {computed[name][:16]}..., expected "
                                         f"{entry['sha256'][:16]}...); upload the stage again")
    return computed


def upload_files(folder) -> dict:
    """``{name: path}`` of what a device needs of the runtime directory ``folder``: every file
    ``runtime.json`` lists, and ``runtime.json`` itself (the host's ``deploy_stage`` takes this)."""
    folder = Path(folder)
    names = [*read_manifest(folder)["files"], MANIFEST]
    return {name: folder / name for name in sorted(names)}


def stored_bytes(folder) -> int:
    """Bytes of every regular file directly inside ``folder``."""
    return sum(p.stat().st_size for p in Path(folder).iterdir() if p.is_file())
