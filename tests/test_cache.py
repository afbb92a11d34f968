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
