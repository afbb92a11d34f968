"""Run a release on a device that has only the agent: ``python -m edgebuild.device_agent generate``.

A runtime package is a runtime directory (``runtime_dir``): graph, weights, tokenizer and the
generation settings (``genai_config.json``'s ``search``). ``--package`` takes that folder, a folder
holding it as ``runtime/`` (an extracted release), or a release ``.tar.gz``, which is extracted
into a temporary folder after its entries are checked (regular files and folders inside the
archive only).
"""
from __future__ import annotations

import contextlib
import sys
import tarfile
import tempfile
import time
from pathlib import Path, PurePosixPath

from edgebuild.device_agent import runtime_dir
from edgebuild.device_agent.runtime import RuntimeLoadError

RUNTIME_SUBDIR = "runtime"


def _safe_members(tar: tarfile.TarFile, where) -> list:
    members = tar.getmembers()
    for member in members:
        path = PurePosixPath(member.name)
        if path.is_absolute() or ".." in path.parts or not (member.isfile() or member.isdir()):
            raise RuntimeLoadError(f"{where}: unsafe entry {member.name!r} in the package; "
                                   f"it is not trustworthy")
    return members


def _extract(archive: Path, dest: Path) -> Path:
    try:
        with tarfile.open(archive, "r:*") as tar:
            members = _safe_members(tar, archive)
            for member in members:
                tar.extract(member, dest, set_attrs=False)
    except (tarfile.TarError, OSError, EOFError) as err:
        raise RuntimeLoadError(f"{archive}: not a readable release archive ({err})") from None
    return dest


def find_runtime(folder: Path) -> Path:
    """The runtime directory in ``folder``: itself, ``runtime/``, or ``<one folder>/runtime/``."""
    candidates = [folder, folder / RUNTIME_SUBDIR, *sorted(folder.glob(f"*/{RUNTIME_SUBDIR}"))]
    for candidate in candidates:
        if runtime_dir.is_runtime_dir(candidate):
            return candidate
    raise RuntimeLoadError(f"{folder}: no runtime package here (no {runtime_dir.MANIFEST} in it or in "
                           f"its {RUNTIME_SUBDIR}/ folder); package a build's runtime stage first")


@contextlib.contextmanager
def open_package(path):
    """Yield the runtime directory of a package folder or release archive."""
    path = Path(path)
    if path.is_dir():
        yield find_runtime(path)
        return
    if not path.is_file():
        raise RuntimeLoadError(f"{path}: no such package folder or archive")
    with tempfile.TemporaryDirectory(prefix="edgebuild-package-") as tmp:
        yield find_runtime(_extract(path, Path(tmp)))


def generate(package, prompt: str, max_new_tokens: int = 128, threads=None, out=None) -> dict:
    """Stream a continuation of ``prompt`` to ``out`` (default stdout); return token counts and rates."""
    from edgebuild.device_agent.genai_runtime import GenaiRuntime

    out = out or sys.stdout
    with open_package(package) as folder:
        runtime = GenaiRuntime.load(folder, threads=threads)
        tokenizer = runtime.tokenizer()
        stream = tokenizer.create_stream()
        ids = [int(t) for t in tokenizer.encode(prompt)]
        out.write(prompt)
        start, first = time.perf_counter(), []

        def emit(token: int) -> None:
            if not first:
                first.append(time.perf_counter())
            out.write(stream.decode(token))
            out.flush()

        tokens = runtime.generate(ids, max_new_tokens, on_token=emit, sampling=True)
        end = time.perf_counter()
    decode = (end - first[0]) / max(len(tokens) - 1, 1) if first else 0.0
    return {"prompt_tokens": len(ids), "new_tokens": len(tokens),
            "prefill_s": (first[0] - start) if first else end - start,
            "decode_tok_s": 1.0 / decode if decode else 0.0,
            "tok_s": len(tokens) / (end - start) if end > start else 0.0}
