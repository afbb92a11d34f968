"""Release packages: reproducible bytes, a model card, verification and safe extraction."""
import gzip
import io
import json
import tarfile

import pytest

from edgebuild.build.cli import main
from edgebuild.core.errors import ExitCode, PackageError
from edgebuild.build.package import build_package, extract, model_card, verify
from test_report_html import make_build


@pytest.fixture
def pkg(tmp_path):
    build_dir, manifest = make_build(tmp_path, nasty=False)
    return build_package(build_dir, tmp_path / "rel"), build_dir, manifest


def members(path) -> dict:
    """``{name: (TarInfo, bytes or None)}`` of a package."""
    with tarfile.open(path, "r:gz") as tar:
        return {m.name: (m, tar.extractfile(m).read() if m.isfile() else None) for m in tar.getmembers()}


def rewrite(path, entries: dict) -> None:
    """Write a tar.gz holding ``entries`` ({name: (TarInfo, bytes or None)}) in order."""
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w", format=tarfile.PAX_FORMAT) as tar:
        for info, data in entries.values():
            tar.addfile(info, io.BytesIO(data) if data is not None else None)
    path.write_bytes(gzip.compress(buf.getvalue(), mtime=0))


def add_entry(entries: dict, name: str, *, data: bytes | None = None, link: str | None = None, hard=False) -> dict:
    info = tarfile.TarInfo(name)
    if link is not None:
        info.type, info.linkname = (tarfile.LNKTYPE if hard else tarfile.SYMTYPE), link
    else:
        info.size = len(data)
    return {**entries, name: (info, data)}


def test_two_builds_of_a_package_are_byte_identical(pkg, tmp_path):
    path, build_dir, _ = pkg
    again = build_package(build_dir, tmp_path / "again")
    assert path.name == again.name and path.read_bytes() == again.read_bytes()


def test_package_contents_and_verify(pkg):
    path, _, manifest = pkg
    root = path.name.removesuffix(".tar.gz")
    names = sorted(members(path))
    assert names == sorted(f"{root}/{n}" for n in ("MODEL_CARD.md", "PACKAGE.json", "SHA256SUMS", "build-manifest.json",
                                                   "stage/graph.json", "stage/model.onnx", "stage/weights.ebpk"))
    info = verify(path)
    assert info == {"name": root, "files": 7, "bytes": info["bytes"]} and info["bytes"] > 3500
    index = json.loads(members(path)[f"{root}/PACKAGE.json"][1])
    assert index["files"]["stage/weights.ebpk"]["bytes"] == manifest["size_bytes"]


def test_model_card_says_what_how_measured_and_limits(pkg):
    path, _, manifest = pkg
    card = model_card(manifest)
    assert card == members(path)[f"{path.name.removesuffix('.tar.gz')}/MODEL_CARD.md"][1].decode()
    assert "`seedlm`: method `seedlm`" in card and '`vptq`: method `vptq`, knobs `{"vector_len": 2}`' in card
    assert "`hyper`" not in card.split("## Measured")[0]           # hyper is not part of what shipped
    assert "- piqa: " in card and "retention 100.0%" in card and "gate pass" in card
    assert "ms/token p50" in card and "## Limits" in card and "fallback" in card


def test_flipped_byte_is_caught(pkg, tmp_path):
    path, _, _ = pkg
    entries = members(path)
    name = next(n for n in entries if n.endswith("weights.ebpk"))
    info, data = entries[name]
    entries[name] = (info, data[:100] + bytes([data[100] ^ 1]) + data[101:])
    rewrite(path, entries)
    with pytest.raises(PackageError, match="stage/weights.ebpk.*does not match its sha256"):
        verify(path)
    with pytest.raises(PackageError):
        extract(path, tmp_path / "inst")
    assert list((tmp_path / "inst").iterdir()) == []                 # nothing left behind


def test_flipped_byte_in_the_compressed_stream_is_caught(pkg):
    path, _, _ = pkg
    raw = bytearray(path.read_bytes())
    raw[len(raw) // 2] ^= 0xFF
    path.write_bytes(bytes(raw))
    with pytest.raises(PackageError):
        verify(path)


def test_tampered_index_is_caught(pkg):
    path, _, _ = pkg
    entries = members(path)
    name = next(n for n in entries if n.endswith("PACKAGE.json"))
    index = json.loads(entries[name][1])
    index["files"]["stage/graph.json"]["bytes"] += 1
    data = json.dumps(index).encode()
    info = entries[name][0]
    info.size = len(data)
    entries[name] = (info, data)
    rewrite(path, entries)
    with pytest.raises(PackageError, match="PACKAGE.json does not match its own sha256"):
        verify(path)


@pytest.mark.parametrize("bad, message", [
    ("../evil.txt", "path leaves the package"),
    ("ROOT/../../evil.txt", "path leaves the package"),
    ("/etc/evil.txt", "absolute path"),
])
def test_traversal_entries_are_refused(pkg, tmp_path, bad, message):
    path, _, _ = pkg
    root = path.name.removesuffix(".tar.gz")
    rewrite(path, add_entry(members(path), bad.replace("ROOT", root), data=b"owned"))
    with pytest.raises(PackageError, match=message):
        verify(path)
    with pytest.raises(PackageError, match=message):
        extract(path, tmp_path / "inst")
    assert not (tmp_path / "evil.txt").exists() and not (tmp_path.parent / "evil.txt").exists()


@pytest.mark.parametrize("target, hard", [("../../../../etc/passwd", False), ("/etc/passwd", False),
                                          ("../../x", False), ("../../etc/passwd", True), ("/etc/passwd", True)])
def test_links_pointing_out_are_refused(pkg, tmp_path, target, hard):
    path, _, _ = pkg
    root = path.name.removesuffix(".tar.gz")
    rewrite(path, add_entry(members(path), f"{root}/stage/escape", link=target, hard=hard))
    with pytest.raises(PackageError, match="points out of the package"):
        verify(path)
    with pytest.raises(PackageError, match="points out of the package"):
        extract(path, tmp_path / "inst")


def test_extra_and_missing_files_are_caught(pkg, tmp_path):
    path, _, _ = pkg
    root = path.name.removesuffix(".tar.gz")
    original = members(path)
    rewrite(path, add_entry(original, f"{root}/stage/extra.bin", data=b"x"))
    with pytest.raises(PackageError, match="unlisted entries stage/extra.bin"):
        verify(path)
    rewrite(path, add_entry(original, f"{root}/stage/inside", link="weights.ebpk"))
    with pytest.raises(PackageError, match="unlisted entries stage/inside"):
        verify(path)
    rewrite(path, {n: e for n, e in original.items() if not n.endswith("graph.json")})
    with pytest.raises(PackageError, match="missing stage/graph.json"):
        verify(path)


def test_extract_installs_verified_files_atomically(pkg, tmp_path):
    path, build_dir, _ = pkg
    dest = extract(path, tmp_path / "inst")
    assert dest.parent == tmp_path / "inst" and dest.name == path.name.removesuffix(".tar.gz")
    assert (dest / "stage" / "weights.ebpk").read_bytes() == (build_dir / "stages" / "vptq" / "weights.ebpk").read_bytes()
    with pytest.raises(PackageError, match="already exists"):
        extract(path, tmp_path / "inst")
    assert extract(path, tmp_path / "inst", overwrite=True) == dest
    assert [p.name for p in (tmp_path / "inst").iterdir()] == [dest.name]


def test_verify_command_exit_codes(pkg, capsys):
    path, _, _ = pkg
    assert main(["verify", str(path)]) == 0
    assert capsys.readouterr().out.startswith("ok: ")
    rewrite(path, add_entry(members(path), "../evil", data=b"x"))
    assert main(["verify", str(path)]) == ExitCode.PACKAGE
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and err.startswith("error: unsafe package entry '../evil'")


def test_verify_command_extracts(pkg, tmp_path, capsys):
    path, _, _ = pkg
    assert main(["verify", str(path), "--extract", str(tmp_path / "inst")]) == 0
    assert "installed" in capsys.readouterr().out and (tmp_path / "inst").is_dir()


@pytest.mark.parametrize("how", ["flip", "delete", "manifest"])
def test_package_refuses_an_artifact_changed_after_the_build_in_one_line(tmp_path, capsys, how):
    build_dir, manifest = make_build(tmp_path, nasty=False)
    art = manifest["artifacts"][manifest["compression_level"]][0]
    path = build_dir / art["path"]
    if how == "flip":
        data = bytearray(path.read_bytes())
        data[len(data) // 2] ^= 1
        path.write_bytes(bytes(data))
        words = f"artifact {path} does not match the manifest"
    elif how == "delete":
        path.unlink()
        words = f"artifact {path} cannot be read"
    else:
        (build_dir / "manifest.json").write_text("{not json")
        words = "manifest.json is unreadable"
    code = main(["package", "--out", str(build_dir.parent), "--target", build_dir.name])
    err = capsys.readouterr().err.strip()
    assert code == ExitCode.PACKAGE and len(err.splitlines()) == 1 and words in err
    assert not (build_dir / "release").exists() or not list((build_dir / "release").iterdir())
