"""The content-addressed step cache."""
import pytest

from edgebuild.core.cache import StepCache, code_version, digest


def test_digest_is_stable_and_sensitive():
    assert digest("a", {"x": 1, "y": 2}) == digest("a", {"y": 2, "x": 1})
    assert digest("a", {"x": 1}) != digest("a", {"x": 2})


def test_miss_then_hit(tmp_path):
    cache = StepCache(tmp_path)
    key = digest("step", 1)
    assert cache.get("pack", key) is None
    with cache.build("pack", key) as work:
        (work / "out.txt").write_text("hello")
    entry = cache.get("pack", key)
    assert entry is not None and (entry / "out.txt").read_text() == "hello"
    assert cache.misses == ["pack"] and cache.hits == ["pack"]


def test_other_key_misses(tmp_path):
    cache = StepCache(tmp_path)
    with cache.build("pack", digest(1)) as work:
        (work / "x").write_text("1")
    assert cache.get("pack", digest(2)) is None


def test_force_ignores_entries(tmp_path):
    key = digest(1)
    with StepCache(tmp_path).build("pack", key) as work:
        (work / "x").write_text("1")
    assert StepCache(tmp_path, force=True).get("pack", key) is None


def test_failed_step_leaves_no_entry_and_keeps_work_dir(tmp_path):
    cache = StepCache(tmp_path)
    key = digest(3)
    with pytest.raises(RuntimeError):
        with cache.build("pack", key) as work:
            (work / "partial.bin").write_text("half")
            raise RuntimeError("boom")
    assert cache.get("pack", key) is None
    kept = list(cache.failed_dir().iterdir())
    assert len(kept) == 1 and (kept[0] / "partial.bin").read_text() == "half"


def test_code_version_changes_with_package():
    assert code_version("build") != code_version("build", "compress")
    assert code_version("compress") == code_version("compress")


def test_code_version_ignores_hidden_build_folders(tmp_path, monkeypatch):
    """A build's Ray tasks compute keys in other processes: what setuptools builds beside the
    sources meanwhile (``.setuptools-build``) must not change them."""
    import importlib.util
    from types import SimpleNamespace
    from edgebuild.core import cache
    (tmp_path / "__init__.py").write_text("")
    monkeypatch.setattr(importlib.util, "find_spec", lambda name: SimpleNamespace(origin=str(tmp_path / "__init__.py")))

    def version():
        monkeypatch.setattr(cache, "_CODE_DIRS", {})
        return code_version("sources")
    before = version()
    (tmp_path / ".setuptools-build" / "lib").mkdir(parents=True)
    (tmp_path / ".setuptools-build" / "lib" / "copy.py").write_text("x = 1\n")
    assert version() == before
    (tmp_path / "module.py").write_text("x = 1\n")
    assert version() != before


# --- content checks: every hit re-hashes what was recorded at commit -----------------------------

import json
import logging
import os
import stat
import time
from pathlib import Path

from edgebuild.core.cache import DONE, QUARANTINE
from edgebuild.core.steps import BuildContext, StageRun, Step, execute


def _entry(cache, step="pack", key=None, files=None):
    key = key or digest(step, files)
    with cache.build(step, key) as work:
        for name, data in (files or {"weights.bin": b"\x01" * 4096}).items():
            (work / name).parent.mkdir(parents=True, exist_ok=True)
            (work / name).write_bytes(data)
    return key, cache.path(step, key)


def _tamper(path: Path, data: bytes | None = None) -> None:
    os.chmod(path, 0o644)
    blob = bytearray(path.read_bytes())
    blob[len(blob) // 2] ^= 0xFF
    path.write_bytes(bytes(blob) if data is None else data)


def test_commit_records_every_file_and_makes_them_read_only(tmp_path):
    cache = StepCache(tmp_path)
    key, entry = _entry(cache, files={"a.bin": b"a" * 10, "sub/b.json": b"{}"})
    done = json.loads((entry / DONE).read_text())
    assert set(done["files"]) == {"a.bin", "sub/b.json"}
    assert done["files"]["a.bin"]["bytes"] == 10 and len(done["files"]["a.bin"]["sha256"]) == 64
    for rel in done["files"]:
        assert not os.stat(entry / rel).st_mode & (stat.S_IWUSR | stat.S_IWGRP | stat.S_IWOTH)


@pytest.mark.parametrize("how, words", [
    ("flip", "weights.bin does not match its recorded sha256"),
    ("same size", "weights.bin does not match its recorded sha256"),
    ("truncate", "weights.bin does not match its recorded sha256"),
    ("delete", "weights.bin is missing"),
    ("add", "extra.bin was added after the entry was written"),
])
def test_an_altered_entry_is_quarantined_with_one_line_naming_the_file(tmp_path, caplog, how, words):
    cache = StepCache(tmp_path)
    key, entry = _entry(cache)
    assert cache.get("pack", key) == entry
    target = entry / "weights.bin"
    if how == "flip":
        _tamper(target)
    elif how == "same size":
        _tamper(target, b"\x02" * 4096)
    elif how == "truncate":
        _tamper(target, b"\x01" * 100)
    elif how == "delete":
        target.unlink()
    else:
        (entry / "extra.bin").write_bytes(b"x")
    with caplog.at_level(logging.WARNING, logger="edgebuild.core.cache"):
        assert cache.get("pack", key) is None
    (line,) = [r.getMessage() for r in caplog.records]
    assert words in line and "quarantine" in line and "\n" not in line
    assert not entry.exists() and len(list((tmp_path / QUARANTINE).iterdir())) == 1
    assert cache.hits == ["pack"] and cache.corrupt == [f"pack/{key[:12]}: {words}"]


def test_an_entry_without_content_hashes_is_built_again_not_trusted(tmp_path):
    cache = StepCache(tmp_path)
    key, entry = _entry(cache)
    (entry / DONE).write_text(json.dumps({"step": "pack", "key": key, "seconds": 1.0}))
    assert cache.get("pack", key) is None and entry.exists()      # replaced by the next commit
    _entry(cache, key=key)
    assert cache.get("pack", key) == entry


def test_commit_replaces_an_entry_whole(tmp_path):
    cache = StepCache(tmp_path)
    key, entry = _entry(cache, files={"old.bin": b"1"})
    _entry(cache, key=key, files={"new.bin": b"2"})
    assert sorted(p.name for p in entry.iterdir()) == [DONE, "new.bin"]
    assert [p.name for p in entry.parent.iterdir()] == [key]


def test_a_second_writer_of_a_key_keeps_the_entry_the_first_committed(tmp_path):
    build, task = StepCache(tmp_path), StepCache(tmp_path)        # a build and a Ray task, one cache
    key = digest("both")
    first, second = build.begin("pack", key), task.begin("pack", key)
    (first / "x.bin").write_bytes(b"late")                      # one key is one content; these differ
    (second / "x.bin").write_bytes(b"first")                    # only to tell the writers apart
    entry = task.commit(second, "pack", key)
    assert build.commit(first, "pack", key) == entry and build.get("pack", key) == entry
    assert (entry / "x.bin").read_bytes() == b"first"
    assert [p.name for p in entry.parent.iterdir()] == [key]     # the second work dir is gone


class _Counting(Step):
    """A step that writes one file and counts its runs."""

    name = "pack"
    runs = 0

    def key(self, ctx, run):
        return digest("counting")

    def run(self, ctx, run, work):
        type(self).runs += 1
        (work / "weights.bin").write_bytes(b"\x07" * 1000)
        return {"bytes": 1000}

    def apply(self, ctx, run, record, entry):
        pass


def test_execute_rebuilds_a_tampered_entry_and_never_calls_it_cached(tmp_path, caplog):
    ctx = BuildContext(config=None, ref=None, target=None, data_dir=None, out=tmp_path,
                       cache=StepCache(tmp_path), progress=None)
    run = StageRun("baseline", "raw", {}, 0, None)
    _Counting.runs = 0
    record, entry = execute(_Counting(), ctx, run)
    assert execute(_Counting(), ctx, run) == (record, entry) and _Counting.runs == 1
    _tamper(entry / "weights.bin")
    with caplog.at_level(logging.WARNING):
        again, entry2 = execute(_Counting(), ctx, run)
    assert _Counting.runs == 2 and again == record and (entry2 / "weights.bin").read_bytes() == b"\x07" * 1000
    assert ctx.cache.misses == ["pack", "pack"] and ctx.cache.hits == ["pack"]
    assert any("weights.bin does not match its recorded sha256" in r.getMessage() for r in caplog.records)


def test_an_adopted_entry_is_reused_even_when_forced(tmp_path):
    def ctx(cache):
        return BuildContext(config=None, ref=None, target=None, data_dir=None, out=tmp_path, cache=cache,
                            progress=None)
    run = StageRun("baseline", "raw", {}, 0, None)
    _Counting.runs = 0
    _, entry = execute(_Counting(), ctx(StepCache(tmp_path)), run)      # built by a task of this build
    forced = ctx(StepCache(tmp_path, force=True))
    assert forced.cache.get("pack", digest("counting")) is None
    forced.cache.adopt("pack", digest("counting"))
    assert execute(_Counting(), forced, run, forced=True)[1] == entry and _Counting.runs == 1


def test_execute_quarantines_a_record_it_cannot_read(tmp_path):
    ctx = BuildContext(config=None, ref=None, target=None, data_dir=None, out=tmp_path,
                       cache=StepCache(tmp_path), progress=None)
    run = StageRun("baseline", "raw", {}, 0, None)
    _Counting.runs = 0
    _, entry = execute(_Counting(), ctx, run)
    os.chmod(entry / "record.json", 0o644)
    (entry / "record.json").write_text("{half")
    done = json.loads((entry / DONE).read_text())                  # the record itself re-signed:
    done["files"]["record.json"] = {"sha256": __import__("hashlib").sha256(b"{half").hexdigest(), "bytes": 5}
    (entry / DONE).write_text(json.dumps(done))
    execute(_Counting(), ctx, run)
    assert _Counting.runs == 2 and any("record.json is unreadable" in c for c in ctx.cache.corrupt)


# --- verify and prune the whole cache -------------------------------------------------------------

def test_verify_all_moves_every_corrupt_entry_aside(tmp_path):
    cache = StepCache(tmp_path)
    keys = [_entry(cache, "pack", files={"w": bytes([i]) * 64})[0] for i in range(3)]
    _tamper(cache.path("pack", keys[1]) / "w")
    sound, bad, unrecorded = StepCache(tmp_path).verify_all()
    assert len(sound) == 2 and bad == [f"pack/{keys[1][:12]}: w does not match its recorded sha256"]
    assert not unrecorded and not cache.path("pack", keys[1]).exists()


def test_prune_by_age_then_size_least_recently_used_first_keeping_what_is_asked(tmp_path):
    cache = StepCache(tmp_path)
    now = time.time()
    made = {}
    for i, age_days in enumerate([40, 20, 10, 1]):
        key, entry = _entry(cache, "pack", files={"w": bytes([i]) * 1000})
        os.utime(entry / DONE, (now - age_days * 86400,) * 2)
        made[age_days] = entry
    keep = {json.loads((made[40] / DONE).read_text())["files"]["w"]["sha256"]}
    removed = cache.prune(older_than_s=30 * 86400, keep=keep, now=now)
    assert removed == [] and made[40].exists()                 # the only old one is kept
    removed = cache.prune(max_bytes=2600, keep=keep, now=now)  # 4 entries of ~1.26 kB
    assert [e.path for e in removed] == [made[20], made[10]]
    assert made[40].exists() and made[1].exists()


def test_a_hit_marks_the_entry_used(tmp_path):
    cache = StepCache(tmp_path)
    key, entry = _entry(cache)
    os.utime(entry / DONE, (1, 1))
    cache.get("pack", key)
    assert time.time() - (entry / DONE).stat().st_mtime < 60


def test_cache_verify_command_exits_8_naming_the_corrupt_entry(tmp_path, capsys):
    from edgebuild.build.cli import main
    from edgebuild.core.errors import ExitCode
    cache = StepCache(tmp_path / "out" / "cache")
    good, _ = _entry(cache, "graph", files={"model.onnx": b"g" * 100})
    assert main(["cache", "verify", "--out", str(tmp_path / "out")]) == 0
    assert capsys.readouterr().out.startswith("ok: 1 cache entries")
    bad, entry = _entry(cache, "pack", files={"weights.ebpk": b"w" * 100})
    _tamper(entry / "weights.ebpk")
    assert main(["cache", "verify", "--out", str(tmp_path / "out")]) == ExitCode.PACKAGE
    out, err = capsys.readouterr()
    assert out.strip() == f"corrupt: pack/{bad[:12]}: weights.ebpk does not match its recorded sha256"
    assert len(err.strip().splitlines()) == 1 and "1 of 2 cache entries were corrupt" in err
    assert main(["cache", "verify", "--out", str(tmp_path / "out")]) == 0     # quarantined: gone


def test_cache_prune_command_keeps_what_the_manifest_ships(tmp_path, capsys):
    from edgebuild.build.cli import main
    cache = StepCache(tmp_path / "out" / "cache")
    _, shipped = _entry(cache, "pack", files={"weights.ebpk": b"s" * 5000})
    _, other = _entry(cache, "pack", files={"weights.ebpk": b"o" * 5000})
    sha = json.loads((shipped / DONE).read_text())["files"]["weights.ebpk"]["sha256"]
    (tmp_path / "out" / "local").mkdir()
    (tmp_path / "out" / "local" / "manifest.json").write_text(json.dumps(
        {"artifacts": {"seedlm": [{"path": "stages/seedlm/weights.ebpk", "sha256": sha}]}}))
    assert main(["cache", "prune", "--out", str(tmp_path / "out"), "--max-size", "1K"]) == 0
    assert "pruned 1 entries" in capsys.readouterr().out
    assert shipped.exists() and not other.exists()
    assert main(["cache", "prune", "--out", str(tmp_path / "out"), "--max-size", "1K", "--include-current"]) == 0
    assert not shipped.exists()
    assert main(["cache", "prune", "--out", str(tmp_path / "out"), "--older-than", "soon"]) == 2
