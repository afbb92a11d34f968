"""``edgebuild cache verify | prune``: the step cache of an output directory, checked or trimmed."""
from __future__ import annotations

import json
import re
from pathlib import Path

import click

from edgebuild.build.cli.options import out_option

UNITS = {"": 1, "B": 1, "K": 10**3, "M": 10**6, "G": 10**9, "T": 10**12}
SECONDS = {"s": 1, "m": 60, "h": 3600, "d": 86400, "w": 7 * 86400}


def parse_size(text: str) -> int:
    """``20G``, ``500M``, ``1.5T``, ``123456`` (bytes; powers of 1000) as bytes."""
    from edgebuild.core.errors import UsageError
    match = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([KMGT]?)B?\s*", text.upper())
    if not match:
        raise UsageError(f"--max-size {text!r} is not a size", hint="write it like 20G, 500M or 1.5T")
    return int(float(match.group(1)) * UNITS[match.group(2)])


def parse_age(text: str) -> float:
    """``30d``, ``12h``, ``90m``, ``2w``, ``45s`` as seconds."""
    from edgebuild.core.errors import UsageError
    match = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([smhdw])\s*", text.lower())
    if not match:
        raise UsageError(f"--older-than {text!r} is not an age", hint="write it like 30d, 12h or 2w")
    return float(match.group(1)) * SECONDS[match.group(2)]


def manifest_hashes(out: Path) -> set:
    """sha256 of every artifact the manifests under ``out`` (``<out>/<target>/manifest.json``) list."""
    hashes = set()
    for path in sorted(Path(out).glob("*/manifest.json")):
        try:
            artifacts = json.loads(path.read_text()).get("artifacts") or {}
        except (OSError, ValueError, AttributeError):
            continue
        hashes |= {a.get("sha256") for files in artifacts.values() for a in files if isinstance(a, dict)}
    return hashes - {None}


def _cache(out: Path):
    from edgebuild.core.cache import StepCache
    from edgebuild.core.errors import UsageError
    root = Path(out) / "cache"
    if not root.is_dir():
        raise UsageError(f"no cache at {root}", hint="pass the --out of a build")
    return StepCache(root)


def _lock(out: Path, what: str, no_wait: bool):
    from edgebuild.core.lock import OutputLock
    return OutputLock(out, what).hold(wait=not no_wait, on_wait=lambda msg: click.echo(msg, err=True))


def _mb(n: int) -> str:
    return f"{n / 1e6:.1f} MB"


@click.group("cache")
def cache_group():
    """Check or trim the step cache of an output directory (OUT/cache)."""


@cache_group.command("verify")
@out_option
@click.option("--no-wait", "no_wait", is_flag=True, help="Stop at once (exit 14) when a build holds --out.")
def verify_cmd(out, no_wait):
    """Hash every cache entry's files against what was recorded when it was written. A corrupt
    entry is moved to OUT/cache/_quarantine and built again on its next use; exits 8 naming it."""
    from edgebuild.core.errors import PackageError
    cache = _cache(out)
    with _lock(out, "edgebuild cache verify", no_wait):
        sound, bad, unrecorded = cache.verify_all()
    for line in bad:
        click.echo(f"corrupt: {line}")
    size = sum(e.bytes for e in sound)
    old = f"; {len(unrecorded)} written without content hashes (built again on next use)" if unrecorded else ""
    if bad:
        raise PackageError(f"{len(bad)} of {len(sound) + len(bad)} cache entries were corrupt, first "
                           f"{bad[0]}; moved to {cache.root / '_quarantine'}",
                           hint="the next build rebuilds them")
    click.echo(f"ok: {len(sound)} cache entries ({_mb(size)}) match their recorded sha256{old}")


@cache_group.command("prune")
@out_option
@click.option("--max-size", "max_size", default=None, help="Trim the cache to at most this size (20G, 500M).")
@click.option("--older-than", "older_than", default=None, help="Remove entries unused for this long (30d, 12h).")
@click.option("--include-current", is_flag=True,
              help="Also remove entries holding the artifacts of the manifests in OUT (kept by default).")
@click.option("--no-wait", "no_wait", is_flag=True, help="Stop at once (exit 14) when a build holds --out.")
def prune_cmd(out, max_size, older_than, include_current, no_wait):
    """Remove cache entries, least recently used first: those unused for --older-than, then more
    until the cache fits in --max-size. Entries the current manifests' artifacts come from stay
    unless --include-current."""
    from edgebuild.core.errors import UsageError
    if max_size is None and older_than is None:
        raise UsageError("cache prune needs --max-size or --older-than", hint="e.g. --max-size 20G --older-than 30d")
    max_bytes = parse_size(max_size) if max_size is not None else None
    age = parse_age(older_than) if older_than is not None else None
    cache = _cache(out)
    with _lock(out, "edgebuild cache prune", no_wait):
        keep = set() if include_current else manifest_hashes(out)
        removed = cache.prune(max_bytes=max_bytes, older_than_s=age, keep=keep)
        left = sum(e.bytes for e in cache.entries())
    for e in removed:
        click.echo(f"removed {e.step}/{e.key[:12]} ({_mb(e.bytes)})")
    click.echo(f"pruned {len(removed)} entries ({_mb(sum(e.bytes for e in removed))}); {_mb(left)} left")


def register(group) -> None:
    group.add_command(cache_group)
