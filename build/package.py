"""Release packages: a reproducible tar.gz of the shipped stage.

Entries are sorted, owned by 0:0, with a fixed mtime and no absolute paths; the gzip header carries
no timestamp. Two packages of the same build are byte-identical.
"""
from __future__ import annotations

import gzip
import io
import json
import os
import tarfile
from pathlib import Path

from edgebuild.build.cache import sha256_file
from edgebuild.build.errors import PackageError, UsageError

EPOCH = 0


def build_package(build_dir: Path, dest: Path | None = None) -> Path:
    manifest_path = build_dir / "manifest.json"
    if not manifest_path.exists():
        raise UsageError(f"no manifest at {manifest_path}", hint="run `edgebuild all` first")
    manifest = json.loads(manifest_path.read_text())
    stage = manifest["compression_level"]
    files = _collect(build_dir, manifest, stage)
    name = f"edgebuild-{_slug(manifest['model'])}-{stage}-{manifest['target']}"
    dest = Path(dest) if dest else build_dir / "release"
    dest.mkdir(parents=True, exist_ok=True)
    out = dest / f"{name}.tar.gz"
    tmp = out.with_name(f".{out.name}.tmp")
    with open(tmp, "wb") as raw:
        with gzip.GzipFile(filename="", mode="wb", fileobj=raw, mtime=EPOCH) as gz:
            _write_tar(gz, name, files)
    os.replace(tmp, out)
    return out


def _slug(s: str) -> str:
    return "".join(c if c.isalnum() or c in "-_." else "-" for c in Path(s).name)


def _collect(build_dir: Path, manifest: dict, stage: str) -> dict:
    files = {}
    for art in manifest["artifacts"].get(stage, []):
        path = build_dir / art["path"]
        if not path.exists() or sha256_file(path) != art["sha256"]:
            raise PackageError(f"artifact {path} is missing or does not match the manifest's sha256",
                               hint="rerun `edgebuild all` to rebuild it")
        files[f"stage/{path.name}"] = path.read_bytes()
    files["build-manifest.json"] = manifest_bytes(manifest)
    files["MODEL_CARD.md"] = model_card(manifest).encode()
    import hashlib
    sums = {k: hashlib.sha256(v).hexdigest() for k, v in sorted(files.items())}
    files["SHA256SUMS.json"] = json.dumps(sums, indent=2, sort_keys=True).encode() + b"\n"
    return files


def manifest_bytes(manifest: dict) -> bytes:
    return json.dumps(manifest, indent=2, sort_keys=True, default=str).encode() + b"\n"


def _write_tar(fileobj, root: str, files: dict) -> None:
    with tarfile.open(fileobj=fileobj, mode="w", format=tarfile.PAX_FORMAT) as tar:
        for rel in sorted(files):
            data = files[rel]
            info = tarfile.TarInfo(f"{root}/{rel}")
            info.size, info.mtime, info.mode = len(data), EPOCH, 0o644
            info.uid = info.gid = 0
            info.uname = info.gname = ""
            tar.addfile(info, io.BytesIO(data))


def model_card(m: dict) -> str:
    lat = m.get("latency", {})
    ret = ", ".join(f"{k} {v * 100:.1f}%" for k, v in m["benchmarks"]["retention"].items() if v is not None)
    lines = [f"# {m['model']} — {m['compression_level']} for {m['target']}", "",
             f"- size: {m['size_bytes']} bytes ({m['size_mb']:.1f} MB); original {m['original_size_mb']:.1f} MB; "
             f"ratio {m['compression_ratio']:.2f}×" if m.get("compression_ratio") else "- size: n/a",
             f"- bits per weight (compressed tensors): {m.get('bits_per_weight')}",
             f"- retention against the baseline: {ret or 'n/a'} (profile {m['profile']})",
             f"- device latency: {lat.get('decode_ms_per_token_p50', 'not measured')} ms/token decode (p50)",
             f"- quality gates passed: {m['quality_gates']['passed']}; ready for edge deployment: "
             f"{m['ready_for_edge_deployment']}", "",
             "Limits: scores come from the benchmark sample named by the profile; the device numbers are "
             "from the target named above only.", ""]
    return "\n".join(lines)
