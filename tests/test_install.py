"""Both a regular and an editable install import every subpackage under its namespaced name."""
import subprocess
import sys
import sysconfig
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
SUBPACKAGES = ["edgebuild.core", "edgebuild.build", "edgebuild.build.cli", "edgebuild.targets", "edgebuild.compress",
               "edgebuild.bench", "edgebuild.export", "edgebuild.device_agent", "edgebuild.device_agent.codecs", "edgebuild.bench.tasks"]
DATA_FOLDERS = ["core", "build", "bench", "targets", "compress", "export"]
PROBE = "import importlib, sys; [print(importlib.import_module(m).__file__) for m in sys.argv[1:]]"


def test_editable_install_imports_from_the_source_folders():
    out = subprocess.run([sys.executable, "-c", PROBE, *SUBPACKAGES], capture_output=True, text=True,
                         cwd="/", check=True).stdout.split()
    assert len(out) == len(SUBPACKAGES)
    assert out[0] == str(REPO / "core" / "__init__.py")
    assert out[1] == str(REPO / "build" / "__init__.py")
    assert out[7] == str(REPO / "device_agent" / "__init__.py")


def test_regular_install_imports_every_subpackage(tmp_path):
    target = tmp_path / "site"
    done = subprocess.run([sys.executable, "-m", "pip", "install", "--quiet", "--no-deps", "--no-build-isolation",
                           "--target", str(target), str(REPO / "device_agent"), str(REPO)],
                          check=True, capture_output=True, text=True)
    assert "Warning" not in done.stdout + done.stderr     # e.g. setuptools' "Package ... is absent"
    # -S: no site processing, so the editable install's finder is not active; dependencies still import.
    code = f"import sys; sys.path[:0] = [{str(target)!r}, {sysconfig.get_paths()['purelib']!r}]; exec({PROBE!r})"
    out = subprocess.run([sys.executable, "-S", "-c", code, *SUBPACKAGES], capture_output=True, text=True,
                         cwd="/", check=True).stdout.split()
    assert len(out) == len(SUBPACKAGES)
    assert all(p.startswith(str(target)) for p in out), out
    assert (target / "edgebuild" / "targets" / "specs").is_dir()
    assert (target / "edgebuild" / "core" / "assets" / "smollm2-tokenizer" / "tokenizer.json").is_file()
    for path in subprocess.run(["git", "ls-files", *DATA_FOLDERS], cwd=REPO, capture_output=True, text=True,
                               check=True).stdout.split():
        if not path.endswith(".py"):
            folder, rest = path.split("/", 1)
            assert (target / "edgebuild" / folder / rest).is_file(), f"{path} is not installed"
    assert not (REPO / "build" / "lib").exists()   # setuptools' output stays out of the source folder
