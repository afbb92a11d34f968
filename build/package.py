"""Release packages: a reproducible tar.gz of the shipped stage, its verification and safe extraction.

Entries are sorted, owned by 0:0, with a fixed mtime and no absolute paths; the gzip header carries
no timestamp. Two packages of the same build are byte-identical.

Every package holds, under one root folder ``<name>/``: the stage's files (``stage/``) or its
runtime directory (``runtime/``: what ``python -m edgebuild.device_agent generate --package`` runs
on a device that has only the agent; ``runtime_files``, ``build_runtime_package``), the build
manifest, a model card, ``SHA256SUMS`` (``sha256sum -c`` format) and ``PACKAGE.json``, which lists
every other file with its size and sha256 and carries the sha256 of its own canonical content.
``verify`` checks all of it; ``extract`` verifies, refuses unsafe entries, then installs atomically.
"""
from __future__ import annotations

import contextlib
import gzip
import hashlib
import io
import json
import os
import shutil
import tarfile
import tempfile
import zlib
from pathlib import Path, PurePosixPath

from edgebuild.core.files import atomic_path
from edgebuild.core.errors import PackageError, UsageError

EPOCH = 0
FORMAT = 1
INDEX = "PACKAGE.json"


def build_package(build_dir: Path, dest: Path | None = None) -> Path:
    """Package the shipped stage of ``build_dir`` into ``dest`` (default ``build_dir/release``)."""
    manifest_path = build_dir / "manifest.json"
    if not manifest_path.exists():
        raise UsageError(f"no manifest at {manifest_path}", hint="run `edgebuild all` first")
    try:
        manifest = json.loads(manifest_path.read_text())
        stage = manifest["compression_level"]
    except (OSError, ValueError, KeyError, TypeError) as e:
        raise PackageError(f"manifest {manifest_path} is unreadable ({type(e).__name__}: {e})",
                           hint="rerun `edgebuild all` to write it again") from None
    name = f"edgebuild-{_slug(manifest['model'])}-{stage}-{manifest['target']}"
    files = _collect(build_dir, manifest, stage)
    files[INDEX] = index_bytes(name, files)
    dest = Path(dest) if dest else build_dir / "release"
    dest.mkdir(parents=True, exist_ok=True)
    out = dest / f"{name}.tar.gz"
    with atomic_path(out) as tmp, open(tmp, "wb") as raw:
        with gzip.GzipFile(filename="", mode="wb", fileobj=raw, mtime=EPOCH) as gz:
            _write_tar(gz, name, files)
    return out


def runtime_files(runtime_dir: Path) -> dict:
    """``{"runtime/<file>": bytes}``: a runtime directory laid out for a release, every file its
    ``runtime.json`` lists (checked against their sha256) and ``runtime.json`` itself."""
    from edgebuild.device_agent import runtime_dir as fmt

    runtime_dir = Path(runtime_dir)
    try:
        listed = fmt.check_files(runtime_dir, fmt.read_manifest(runtime_dir))
    except fmt.RuntimeFormatError as e:
        raise PackageError(str(e), hint="encode the stage again") from None
    names = [*listed, fmt.MANIFEST]
    return {f"runtime/{name}": (runtime_dir / name).read_bytes() for name in sorted(names)}


def build_runtime_package(runtime_dir: Path, dest: Path, name: str) -> Path:
    """A release ``dest/<name>.tar.gz`` holding a runtime directory (``runtime/``), ``SHA256SUMS``
    and ``PACKAGE.json``; reproducible like ``build_package``."""
    files = runtime_files(runtime_dir)
    files["SHA256SUMS"] = "".join(f"{hashlib.sha256(v).hexdigest()}  {k}\n"
                                  for k, v in sorted(files.items())).encode()
    files[INDEX] = index_bytes(name, files)
    out = Path(dest) / f"{name}.tar.gz"
    out.parent.mkdir(parents=True, exist_ok=True)
    with atomic_path(out) as tmp, open(tmp, "wb") as raw:
        with gzip.GzipFile(filename="", mode="wb", fileobj=raw, mtime=EPOCH) as gz:
            _write_tar(gz, name, files)
    return out


def _slug(s: str) -> str:
    return "".join(c if c.isalnum() or c in "-_." else "-" for c in Path(s).name)


def _collect(build_dir: Path, manifest: dict, stage: str) -> dict:
    files = {}
    for art in manifest["artifacts"].get(stage, []):
        path = build_dir / art["path"]
        files[f"stage/{path.name}"] = _checked_artifact(path, art)
    files["build-manifest.json"] = manifest_bytes(manifest)
    files["MODEL_CARD.md"] = model_card(manifest).encode()
    sums = "".join(f"{hashlib.sha256(v).hexdigest()}  {k}\n" for k, v in sorted(files.items()))
    files["SHA256SUMS"] = sums.encode()
    return files


def _checked_artifact(path: Path, art: dict) -> bytes:
    """The bytes of an artifact once they hash as the manifest says (hashed as read: what is
    checked is what is packaged); else a one-line ``PackageError`` naming the file."""
    hint = "rerun `edgebuild all` to rebuild it from the verified cache"
    try:
        data = path.read_bytes()
    except OSError as e:
        raise PackageError(f"artifact {path} cannot be read ({e.strerror or e}); refusing to package",
                           hint=hint) from None
    actual = hashlib.sha256(data).hexdigest()
    if actual != art.get("sha256"):
        raise PackageError(f"artifact {path} does not match the manifest (sha256 {actual[:16]}…, "
                           f"manifest {str(art.get('sha256'))[:16]}…); refusing to package", hint=hint)
    return data


def manifest_bytes(manifest: dict) -> bytes:
    return json.dumps(manifest, indent=2, sort_keys=True, default=str).encode() + b"\n"


def _canonical(obj) -> bytes:
    return json.dumps(obj, sort_keys=True, separators=(",", ":")).encode()


def index_bytes(name: str, files: dict) -> bytes:
    """``PACKAGE.json``: every file's size and sha256, and the sha256 of that listing itself."""
    body = {"format": FORMAT, "name": name,
            "files": {k: {"bytes": len(v), "sha256": hashlib.sha256(v).hexdigest()} for k, v in sorted(files.items())}}
    body["sha256"] = hashlib.sha256(_canonical(body)).hexdigest()
    return json.dumps(body, indent=2, sort_keys=True).encode() + b"\n"


def _write_tar(fileobj, root: str, files: dict) -> None:
    with tarfile.open(fileobj=fileobj, mode="w", format=tarfile.PAX_FORMAT) as tar:
        for rel in sorted(files):
            data = files[rel]
            info = tarfile.TarInfo(f"{root}/{rel}")
            info.size, info.mtime, info.mode = len(data), EPOCH, 0o644
            info.uid = info.gid = 0
            info.uname = info.gname = ""
            tar.addfile(info, io.BytesIO(data))


# -- verification and extraction -------------------------------------------------------------------

def check_member(member: tarfile.TarInfo) -> PurePosixPath:
    """The member's relative path; PackageError for absolute paths, ``..``, links out of the tree,
    and anything that is not a regular file, a folder or a link."""
    name = member.name
    path = PurePosixPath(name)
    if not path.parts:
        raise PackageError(f"unsafe package entry {name!r}: empty path", hint="the package is not trustworthy")
    if name.startswith(("/", "\\")) or path.is_absolute() or (len(name) > 1 and name[1] == ":"):
        raise PackageError(f"unsafe package entry {name!r}: absolute path", hint="the package is not trustworthy")
    if ".." in path.parts or "\\" in name:
        raise PackageError(f"unsafe package entry {name!r}: path leaves the package", hint="the package is not trustworthy")
    if member.issym() or member.islnk():
        _check_link(member, path)
    elif not (member.isfile() or member.isdir()):
        raise PackageError(f"unsafe package entry {name!r}: not a regular file or folder",
                           hint="the package is not trustworthy")
    return path


def _check_link(member: tarfile.TarInfo, path: PurePosixPath) -> None:
    """A symlink resolves against its folder, a hard link against the archive root; neither may leave
    the package folder."""
    target = PurePosixPath(member.linkname)
    base = path.parent if member.issym() else PurePosixPath()
    depth = len(base.parts)
    for part in target.parts:
        depth = depth - 1 if part == ".." else depth if part == "." else depth + 1
        if depth < 1:
            break
    if target.is_absolute() or member.linkname.startswith("/") or depth < 1:
        kind = "symlink" if member.issym() else "hard link"
        raise PackageError(f"unsafe package entry {member.name!r}: {kind} to {member.linkname!r} points out of "
                           "the package", hint="the package is not trustworthy")


def _members(tar: tarfile.TarFile) -> tuple:
    """``(root name, {relative path: member})`` after checking every entry's safety and uniqueness."""
    roots, files = set(), {}
    for member in tar.getmembers():
        path = check_member(member)
        roots.add(path.parts[0])
        rel = "/".join(path.parts[1:])
        if member.isdir():
            continue
        if not rel or rel in files:
            raise PackageError(f"package entry {member.name!r} is duplicated or outside the package folder",
                               hint="the package is not trustworthy")
        files[rel] = member
    if len(roots) != 1:
        raise PackageError(f"package has {len(roots)} top-level folders, expected one",
                           hint="build it with `edgebuild package`")
    return roots.pop(), files


def _read_index(tar: tarfile.TarFile, files: dict) -> dict:
    if INDEX not in files or not files[INDEX].isfile():
        raise PackageError(f"package has no {INDEX}", hint="build it with `edgebuild package`")
    try:
        index = json.loads(tar.extractfile(files[INDEX]).read())
        claimed = index.pop("sha256")
    except (ValueError, KeyError, AttributeError) as e:
        raise PackageError(f"package {INDEX} is unreadable: {e}", hint="the package is corrupt") from None
    if hashlib.sha256(_canonical(index)).hexdigest() != claimed:
        raise PackageError(f"package {INDEX} does not match its own sha256", hint="the package is corrupt")
    if index.get("format") != FORMAT:
        raise PackageError(f"package format {index.get('format')!r} is not supported (expected {FORMAT})",
                           hint="use the edgebuild release that built it")
    return index


def _inspect(tar: tarfile.TarFile) -> tuple:
    """``(root, {rel: member}, index)`` once every entry is safe and the listing matches the entries."""
    root, files = _members(tar)
    index = _read_index(tar, files)
    if index.get("name") != root:
        raise PackageError(f"package folder {root!r} does not match its name {index.get('name')!r}",
                           hint="the package is not trustworthy")
    listed, present = set(index.get("files", {})), set(files) - {INDEX}
    if listed - present:
        raise PackageError(f"package is missing {', '.join(sorted(listed - present))}", hint="the package is corrupt")
    if present - listed:
        raise PackageError(f"package has unlisted entries {', '.join(sorted(present - listed))}",
                           hint="the package is not trustworthy")
    for rel in listed:
        if not files[rel].isfile():
            raise PackageError(f"package entry {rel!r} is a link, expected a file", hint="the package is not trustworthy")
    return root, files, index


def _stream(tar: tarfile.TarFile, rel: str, member: tarfile.TarInfo, want: dict, out: Path | None = None) -> None:
    """Hash one file (writing it to ``out`` as it goes); PackageError when it does not match ``want``."""
    h = hashlib.sha256()
    src = tar.extractfile(member)
    with open(out, "wb") if out else contextlib.nullcontext() as dst:
        for chunk in iter(lambda: src.read(1 << 20), b""):
            h.update(chunk)
            if dst:
                dst.write(chunk)
    if member.size != want["bytes"] or h.hexdigest() != want["sha256"]:
        raise PackageError(f"package file {rel!r} does not match its sha256 in {INDEX}", hint="the package is corrupt")


def _open(pkg_path: Path) -> tarfile.TarFile:
    if not Path(pkg_path).is_file():
        raise UsageError(f"no package at {pkg_path}", hint="pass the .tar.gz written by `edgebuild package`")
    return tarfile.open(pkg_path, mode="r:gz")


def _unpack(pkg_path: Path, work: Path | None) -> dict:
    """Check the whole package, writing its files under ``work`` when given; return its summary."""
    try:
        with _open(pkg_path) as tar:
            root, files, index = _inspect(tar)
            for rel, want in sorted(index["files"].items()):
                out = work / rel if work else None
                if out:
                    out.parent.mkdir(parents=True, exist_ok=True)
                _stream(tar, rel, files[rel], want, out)
            if work:
                (work / INDEX).write_bytes(tar.extractfile(files[INDEX]).read())
    except (tarfile.TarError, EOFError, zlib.error) as e:
        raise PackageError(f"package {pkg_path} is not a readable tar.gz: {e}", hint="the package is corrupt") from None
    except gzip.BadGzipFile as e:
        raise PackageError(f"package {pkg_path} is not a valid gzip file: {e}", hint="the package is corrupt") from None
    return {"name": root, "files": len(index["files"]) + 1,
            "bytes": sum(f["bytes"] for f in index["files"].values())}


def verify(pkg_path: Path) -> dict:
    """Check a package: safe entries, ``PACKAGE.json`` intact, every file present, listed and matching.

    Returns ``{"name", "files", "bytes"}``; raises PackageError naming the first problem found.
    """
    return _unpack(Path(pkg_path), None)


def extract(pkg_path: Path, dest: Path, overwrite: bool = False) -> Path:
    """Install a package as ``dest/<name>/`` atomically, checking it as it is written; return that folder.

    Unsafe entries (absolute paths, ``..``, links out of the tree), unlisted or missing files raise
    PackageError before anything is written; a file that does not match its sha256 leaves nothing behind.
    """
    dest = Path(dest)
    dest.mkdir(parents=True, exist_ok=True)
    work = Path(tempfile.mkdtemp(prefix=".install-", dir=dest))
    try:
        info = _unpack(Path(pkg_path), work)
        final = dest / info["name"]
        if final.exists() and not overwrite:
            raise PackageError(f"{final} already exists", hint="remove it first")
        if final.exists():
            shutil.rmtree(final)
        os.replace(work, final)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    return final


# -- model card ------------------------------------------------------------------------------------

def _final(m: dict) -> dict:
    return {st["stage"]: st for st in m.get("stages", [])}


def _chain(m: dict) -> list:
    """The shipped stage and the stages it was compressed from, baseline first."""
    last, out = _final(m), []
    name = m.get("compression_level")
    while name and name in last and name not in [s["stage"] for s in out]:
        out.insert(0, last[name])
        name = last[name].get("source")
    return out


def _how(m: dict) -> list:
    lines = []
    for st in _chain(m):
        if st["stage"] == "baseline":
            lines.append(f"- `baseline`: the uncompressed weights ({st.get('bytes')} bytes)")
            continue
        ref = " (reference method)" if st.get("reference_method") else ""
        bits = st.get("bits_per_weight")
        lines.append(f"- `{st['stage']}`: method `{st.get('method')}`{ref}, knobs "
                     f"`{json.dumps(st.get('knobs') or {}, sort_keys=True)}`, from `{st.get('source')}`; "
                     f"{st.get('bytes')} bytes" + (f", {bits:.2f} bits/weight" if bits is not None else ""))
    return lines or ["- (no stage record in the manifest)"]


def _retention_lines(m: dict) -> list:
    st = _final(m).get(m.get("compression_level"), {})
    checks = {c["name"].split("/", 1)[-1]: c for c in (st.get("gate") or {}).get("checks", [])
              if c.get("group") in ("core", "expert")}
    lines = []
    for task, score in sorted((st.get("scores") or {}).items()):
        base = (m.get("benchmarks", {}).get("baseline") or {}).get(task)
        ret = (st.get("retention_vs_baseline") or {}).get(task)
        c = checks.get(task, {})
        ci = c.get("ci")
        gate = f"; gate {c.get('verdict')}" + (f" (interval {ci[0]:.3f}–{ci[1]:.3f})" if ci else "") if c else ""
        ret_s = f"{ret * 100:.1f}%" if ret is not None else "n/a"
        lines.append(f"- {task}: {score:.3f} vs baseline {_fmt(base)} — retention {ret_s}{gate}")
    return lines or ["- no benchmark results"]


def _fmt(v, spec=".3f") -> str:
    return "n/a" if v is None else format(v, spec)


def _latency_lines(m: dict) -> list:
    lat = m.get("latency") or {}
    if not lat.get("measured"):
        return [f"- not measured on the device ({lat.get('status', 'not run')})"]
    return [f"- decode: {_fmt(lat.get('decode_ms_per_token_p50'), '.2f')} ms/token p50, "
            f"{_fmt(lat.get('decode_ms_per_token_p95'), '.2f')} p95 "
            f"({_fmt(lat.get('decode_tokens_per_s'), '.1f')} tokens/s)",
            f"- prefill: {_fmt(lat.get('prefill_ms_p50'), '.1f')} ms p50; peak RSS "
            f"{_fmt(lat.get('peak_rss_mb'), '.0f')} MB"]


def _limits(m: dict) -> list:
    st = _final(m).get(m.get("compression_level"), {})
    uninformative = [c["name"] for c in (st.get("gate") or {}).get("checks", []) if c.get("verdict") == "uninformative"]
    lines = [f"- Scores come from the `{m.get('profile')}` benchmark profile (a fixed sample); small samples give "
             "wide intervals.",
             f"- Latency and memory were measured on target `{m.get('target')}` only; other hardware will differ."]
    if uninformative:
        lines.append(f"- These checks could not gate (reference not above chance): {', '.join(uninformative)}.")
    if m.get("exit_code") not in (0, None):
        lines.append(f"- This is a fallback: the build path was {' → '.join(m.get('fallback_path') or [])}.")
    for key in ("edge_of_chaos", "eudaimonia"):
        section = m.get(key) or {}
        if section.get("measured") is False:
            lines.append(f"- {key.replace('_', ' ')}: not measured ({section.get('reason', '')}).")
    return lines


def model_card(m: dict) -> str:
    """``MODEL_CARD.md``: what was compressed and how, measured retention and latency, and limits."""
    ratio = m.get("compression_ratio")
    size = (f"{m.get('size_bytes')} bytes ({m['size_mb']:.2f} MB) from {m.get('original_size_bytes')} bytes; "
            f"ratio {ratio:.2f}×" if ratio else f"{m.get('size_bytes')} bytes")
    qg = m.get("quality_gates") or {}
    lines = [f"# {m['model']} — {m['compression_level']} for {m['target']}", "",
             f"Built by edgebuild {m.get('edgebuild_version')}; model fingerprint `{m.get('model_fingerprint')}`.", "",
             "## What was compressed, and how", "", *_how(m), "",
             f"Size: {size}. Bits per weight (compressed tensors): {_fmt(m.get('bits_per_weight'), '.2f')}.", "",
             "## Measured retention", "", *_retention_lines(m), "",
             f"Quality gates passed: {qg.get('passed')} (retries: {qg.get('retries', 0)}); ready for edge "
             f"deployment: {m.get('ready_for_edge_deployment')}.", "",
             f"## Latency on {m['target']}", "", *_latency_lines(m), "",
             "## Limits", "", *_limits(m), ""]
    return "\n".join(lines)
