"""What the agent keeps on the device's storage: two versions of each stage, within a byte budget.

For every stage name the agent keeps the newest staged version and the one before it (so a new
version can be rolled back), plus, whatever their names, the active version and the one a
``rollback`` would return to. Everything else is pruned. With a storage budget (bytes, from the
target spec, sent by the host), the kept "previous" versions that are neither active nor the
rollback target go too, oldest first, while the stages exceed the budget; what is left over the
budget is reported, and ``stage`` refuses a new version that does not fit.
"""
from __future__ import annotations

import json
import logging
import shutil
from pathlib import Path

log = logging.getLogger(__name__)

STAGES = "stages"
MANIFEST = "stage.json"
ACTIVE = "active"
KEEP_PER_STAGE = 2


def _folder_bytes(folder: Path) -> int:
    return sum(p.stat().st_size for p in folder.rglob("*") if p.is_file() and not p.is_symlink())


def _staged_at(folder: Path) -> float:
    try:
        return float(json.loads((folder / MANIFEST).read_text()).get("staged_at", 0.0))
    except (OSError, ValueError):
        return 0.0


def versions(root) -> dict:
    """``{name: [version folders, newest first]}`` of the installed stages."""
    out: dict = {}
    for manifest in (Path(root) / STAGES).glob(f"*/*/{MANIFEST}"):
        folder = manifest.parent
        if not folder.name.startswith("."):
            out.setdefault(folder.parent.name, []).append(folder)
    return {name: sorted(found, key=_staged_at, reverse=True) for name, found in out.items()}


def pinned(root) -> set:
    """(name, version) of the active version and of the rollback target."""
    try:
        state = json.loads((Path(root) / ACTIVE).read_text())
    except (OSError, ValueError):
        return set()
    entries = [state.get("active")] + (state.get("history") or [])[-1:]
    return {(e["name"], e["version"]) for e in entries if isinstance(e, dict)}


def required_bytes(root, folder) -> int:
    """Bytes that must stay on the device with ``folder`` installed: it, the active version and the
    rollback target (what no pruning may remove)."""
    keep = {Path(folder)} | {Path(root) / STAGES / name / version for name, version in pinned(root)}
    return sum(_folder_bytes(f) for f in keep if f.is_dir())


def stored_bytes(root) -> int:
    """Bytes of every installed stage."""
    return sum(_folder_bytes(f) for found in versions(root).values() for f in found)


def _remove(folder: Path, pruned: list) -> None:
    shutil.rmtree(folder, ignore_errors=True)
    pruned.append(f"{folder.parent.name}/{folder.name}")
    try:
        folder.parent.rmdir()
    except OSError:
        pass


def prune(root, budget_bytes: int | None = None) -> dict:
    """Prune to two versions per stage (plus the active and rollback ones), then to the budget.

    Returns ``{"pruned": ["name/version", ...], "stored_bytes", "budget_bytes", "over_budget"}``.
    """
    pinned_set, pruned, spare = pinned(root), [], []
    for name, found in versions(root).items():
        for index, folder in enumerate(found):
            if (name, folder.name) in pinned_set:
                continue
            if index >= KEEP_PER_STAGE:
                _remove(folder, pruned)
            elif index > 0:
                spare.append(folder)
    stored = stored_bytes(root)
    for folder in sorted(spare, key=_staged_at):
        if budget_bytes is None or stored <= budget_bytes:
            break
        stored -= _folder_bytes(folder)
        _remove(folder, pruned)
    if pruned:
        log.info("pruned %s", ", ".join(pruned))
    over = budget_bytes is not None and stored > budget_bytes
    return {"pruned": pruned, "stored_bytes": stored, "budget_bytes": budget_bytes, "over_budget": over}
