"""The import rule (docs/architecture.md): the bottom layer ← the components ← the orchestrator.

Every ``import edgebuild.X`` / ``from edgebuild.X import ...`` in the source folders is checked,
including imports inside functions: ``core`` imports only itself, the device agent only itself,
a component (compress, export, bench, targets) the bottom layer, the agent's library and the one
peer it is allowed, and nothing imports the orchestrator (``build``) but itself.
"""
import ast
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
FOLDERS = ("core", "device_agent", "compress", "export", "bench", "targets", "build")
ALLOWED = {
    "core": {"core"},
    "device_agent": {"device_agent"},
    "compress": {"core", "device_agent"},
    "export": {"core", "device_agent"},
    "bench": {"core", "device_agent"},
    "targets": {"core", "device_agent", "bench", "export"},  # a device runs benchmark tasks on exported stages
    "build": set(FOLDERS),
}


def imported_folders(source: str) -> set:
    """The ``edgebuild.<folder>`` names a module's source imports, anywhere in it."""
    found = set()
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            names = [node.module] if node.module != "edgebuild" else [f"edgebuild.{a.name}" for a in node.names]
        elif isinstance(node, ast.Import):
            names = [a.name for a in node.names]
        else:
            continue
        found |= {n.split(".")[1] for n in names if n.startswith("edgebuild.")}
    return found


def violations(folder: str, files) -> list:
    """``(file, imported folder)`` for each import ``folder``'s files may not make."""
    allowed = ALLOWED[folder] | {folder}
    return [(str(p.relative_to(REPO)), imported) for p in files
            for imported in sorted(imported_folders(p.read_text(encoding="utf-8")) - allowed)]


def source_files(folder: str) -> list:
    return [p for p in (REPO / folder).rglob("*.py") if ".setuptools-build" not in p.parts]


@pytest.mark.parametrize("folder", FOLDERS)
def test_each_folder_imports_only_what_the_rule_allows(folder):
    files = source_files(folder)
    assert files, f"no sources found in {folder}/"
    assert violations(folder, files) == []


def test_the_check_catches_a_component_importing_the_orchestrator(tmp_path):
    bad = tmp_path / "bad.py"
    bad.write_text("def f():\n    from edgebuild.build.pipeline import Pipeline\n")
    assert imported_folders(bad.read_text()) == {"build"}
    assert ALLOWED["bench"] & {"build"} == set()
    agent = tmp_path / "agent.py"
    agent.write_text("import edgebuild.core.errors\nfrom edgebuild import compress\n")
    assert imported_folders(agent.read_text()) == {"core", "compress"}
    assert not ({"core", "compress"} <= ALLOWED["device_agent"])


def test_every_registered_step_is_a_step_in_its_subjects_folder():
    from edgebuild.build.steps import ORDER, plan, steps
    from edgebuild.core.steps import Step

    assert sorted(ORDER) == steps.names()
    homes = {"pack": "compress", "quality": "bench", "runtime": "export", "graph": "export", "verify": "export", "host": "bench",
             "device": "targets", "gate": "build"}
    for name in ORDER:
        cls = steps.get(name)
        assert issubclass(cls, Step) and cls.name == name
        assert cls.__module__.split(".")[1] == homes[name]
        assert set(cls.needs) <= set(ORDER[:ORDER.index(name)])
    assert plan(["device"]) == ("pack", "runtime", "device")
    assert plan(["gate", "host"]) == ("pack", "runtime", "host", "gate")
