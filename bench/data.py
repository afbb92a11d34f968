"""Local benchmark data: reading the data dir, writing lm-eval task folders into a cache.

The data dir holds the files described in its ``SOURCES.md`` (ARC, PIQA, MMLU CSVs, ...). Each
benchmark's converter reads them with the helpers here, which turn a missing or malformed file
into a ``DataError`` naming the file and the ``--data-dir`` option. ``write_task`` then writes the
converted documents as JSONL (content-addressed, so a cache is shared by runs and never stale)
and a YAML that ``include:``s the built-in lm-eval task and points it at those files, with any
overrides (generation length, samples per item, metric); ``inline`` copies the built-in's keys
instead of including it (see ``edgebuild.bench.base.Generation``).
"""
from __future__ import annotations

import csv
import gzip
import hashlib
import importlib.util
import io
import json
import logging
import zlib
from pathlib import Path
from typing import Callable, Iterable

from edgebuild.bench.base import FunctionRef
from edgebuild.core.errors import ConfigError, DataError
from edgebuild.core.files import write_text_atomic

log = logging.getLogger(__name__)

DATA_HINT = "point --data-dir at the benchmark data folder described in its SOURCES.md"
EVAL_SPLIT = "test"
FEWSHOT_SPLIT = "dev"


# ----------------------------------------------------------------------------- reading


def data_file(data_dir, relative: str) -> Path:
    """``data_dir / relative``, or ``DataError`` naming the expected file when it is missing."""
    if data_dir is None or not Path(data_dir).is_dir():
        raise DataError(f"benchmark data folder {data_dir} does not exist", hint=DATA_HINT)
    path = Path(data_dir) / relative
    if not path.is_file():
        raise DataError(f"benchmark data file {path} is missing", hint=DATA_HINT)
    return path


def read_text(path: Path) -> str:
    """The UTF-8 text of ``path`` (gunzipped when it ends in ``.gz``)."""
    try:
        raw = path.read_bytes()
        if path.suffix == ".gz":
            raw = gzip.decompress(raw)
        return raw.decode("utf-8")
    except (OSError, UnicodeDecodeError, EOFError, zlib.error) as err:
        raise DataError(f"cannot read benchmark data file {path}: {err}", hint=DATA_HINT) from err


def read_lines(path: Path) -> list[str]:
    """Lines of a text file, without line endings; a trailing empty line is dropped."""
    lines = read_text(path).split("\n")
    if lines and lines[-1] == "":
        lines.pop()
    return [line.rstrip("\r") for line in lines]


def read_jsonl(path: Path) -> list[dict]:
    """Records of a JSON-lines file; blank lines are skipped."""
    records = []
    for number, line in enumerate(read_lines(path), start=1):
        if not line.strip():
            continue
        try:
            records.append(json.loads(line))
        except json.JSONDecodeError as err:
            raise DataError(f"{path}: line {number} is not valid JSON ({err.msg})",
                            hint=DATA_HINT) from err
    return records


def read_json(path: Path):
    """The parsed content of a JSON file."""
    try:
        return json.loads(read_text(path))
    except json.JSONDecodeError as err:
        raise DataError(f"{path} is not valid JSON ({err.msg} at line {err.lineno})",
                        hint=DATA_HINT) from err


def read_csv(path: Path, columns: int) -> list[list[str]]:
    """Rows of a header-less CSV file, each checked to have ``columns`` fields."""
    try:
        rows = list(csv.reader(io.StringIO(read_text(path), newline="")))
    except csv.Error as err:
        raise DataError(f"{path} is not valid CSV ({err})", hint=DATA_HINT) from err
    for number, row in enumerate(rows, start=1):
        if len(row) != columns:
            raise DataError(f"{path}: row {number} has {len(row)} fields, expected {columns}",
                            hint=DATA_HINT)
    return rows


def convert_records(path: Path, records: Iterable, convert: Callable[[object], dict]) -> list[dict]:
    """``[convert(r) for r in records]``; a record lacking a field becomes a ``DataError``."""
    out = []
    for number, record in enumerate(records, start=1):
        try:
            out.append(convert(record))
        except (KeyError, IndexError, TypeError, ValueError, AttributeError) as err:
            raise DataError(f"{path}: record {number} is malformed ({type(err).__name__}: {err})",
                            hint=DATA_HINT) from err
    if not out:
        raise DataError(f"{path} holds no records", hint=DATA_HINT)
    return out


# ----------------------------------------------------------------------------- writing


def lm_eval_tasks_dir() -> Path:
    """The ``lm_eval/tasks`` folder of the installed lm-eval (found without importing it)."""
    spec = importlib.util.find_spec("lm_eval")
    if spec is None or not spec.submodule_search_locations:
        raise DataError("lm-eval is not installed", hint="pip install lm-eval")
    return Path(list(spec.submodule_search_locations)[0]) / "tasks"


def write_jsonl(docs: list[dict], cache_dir) -> Path:
    """Write ``docs`` as JSONL under ``cache_dir/data/`` named by the content's sha256.

    An existing file with that name is reused; a new one is written to a temp file and renamed.
    """
    text = "".join(json.dumps(doc, ensure_ascii=False, sort_keys=True) + "\n" for doc in docs)
    digest = hashlib.sha256(text.encode("utf-8")).hexdigest()[:24]
    path = Path(cache_dir) / "data" / f"{digest}.jsonl"
    if path.is_file():
        return path
    write_text_atomic(path, text)
    log.debug("wrote %d documents to %s", len(docs), path)
    return path


def read_task_yaml(path: Path) -> dict:
    """A built-in lm-eval task YAML with its ``include:``s merged (the including file's keys win,
    as in lm-eval), each ``!function`` kept as a ``FunctionRef`` (nothing is imported)."""
    import yaml

    class Loader(yaml.SafeLoader):
        pass

    def function_ref(loader, node):
        return FunctionRef(loader.construct_scalar(node), str(path.parent))

    Loader.add_constructor("!function", function_ref)
    config = yaml.load(path.read_text(encoding="utf-8"), Loader=Loader)  # noqa: S506 (safe)
    includes = config.pop("include", [])
    merged: dict = {}
    for include in includes if isinstance(includes, list) else [includes]:
        merged.update(read_task_yaml(path.parent / include))
    merged.update(config)
    return merged


def dump_task_yaml(config: dict) -> str:
    """YAML text of a task config; ``FunctionRef`` values become ``!function`` tags."""
    import yaml

    class Dumper(yaml.SafeDumper):
        pass

    def function_ref(dumper, ref: FunctionRef):
        return dumper.represent_scalar("!function", ref.spec)

    Dumper.add_representer(FunctionRef, function_ref)
    return yaml.dump(config, Dumper=Dumper, sort_keys=False)


def _relative_refs(value) -> list[str]:
    """Specs of the ``FunctionRef``s in ``value`` that point next to a built-in YAML."""
    if isinstance(value, FunctionRef):
        return [value.spec] if value.base is not None else []
    if isinstance(value, dict):
        return [spec for item in value.values() for spec in _relative_refs(item)]
    if isinstance(value, list):
        return [spec for item in value for spec in _relative_refs(item)]
    return []


def _base_config(task_name: str, builtin_yaml: Path, overrides: dict, inline: bool) -> dict:
    """``include:`` of the built-in, or (``inline``) a copy of its keys with ``overrides``."""
    if not inline:
        return {"include": str(builtin_yaml)}
    config = read_task_yaml(builtin_yaml)
    config.pop("tag", None)              # the copy must not join the built-in task's groups
    config.update(overrides)
    left = _relative_refs(config)
    if left:
        raise ConfigError(f"{task_name}: the built-in task {builtin_yaml.name} needs helper "
                          f"functions {left} that an inline copy cannot reach; override them")
    return config


def task_config(task_name: str, builtin_yaml: Path, data_files: dict, num_fewshot: int,
                cache_dir, overrides: dict | None = None, inline: bool = False) -> dict:
    """The YAML content of one generated lm-eval task.

    It includes the built-in YAML (prompt, choices, target, metrics, process_docs) and overrides
    where the data comes from: local JSON files, evaluated split ``test``, few-shot split
    ``dev`` when there is one, and the few-shot count; then the given ``overrides`` (generation
    length, samples per item, metric). With ``inline`` the built-in's keys are copied in.
    """
    overrides = dict(overrides or {})
    config = _base_config(task_name, builtin_yaml, overrides, inline)
    config.update({
        "task": task_name,
        "dataset_path": "json",
        "dataset_name": None,
        "dataset_kwargs": {
            "data_files": {split: str(path) for split, path in data_files.items()},
            "cache_dir": str(Path(cache_dir) / "hf_datasets"),
        },
        "training_split": None,
        "validation_split": None,
        "test_split": EVAL_SPLIT,
        "num_fewshot": num_fewshot,
    })
    if FEWSHOT_SPLIT in data_files:
        config["fewshot_split"] = FEWSHOT_SPLIT
    config.update(overrides)
    return config


def write_task(task_dir: Path, task_name: str, builtin_yaml: Path, eval_docs: list[dict],
               fewshot_docs: list[dict], num_fewshot: int, cache_dir,
               overrides: dict | None = None, inline: bool = False,
               inline_fewshot: bool = False) -> Path:
    """Write the JSONL files and ``<task_dir>/<task_name>.yaml`` for one lm-eval task.

    Few-shot documents go to a ``dev`` split, or (``inline_fewshot``) into the YAML's
    ``fewshot_config.samples``; either way lm-eval takes them in order (``first_n``), so every
    item gets the same examples and the prompt's few-shot part is a prefix shared by all items
    (the host scorer computes it once). The caller chooses which examples (a seeded draw).
    """
    if not builtin_yaml.is_file():
        raise DataError(f"lm-eval has no built-in task file {builtin_yaml}",
                        hint="install the lm-eval version named in pyproject.toml")
    data_files = {EVAL_SPLIT: write_jsonl(eval_docs, cache_dir)}
    overrides = dict(overrides or {})
    if fewshot_docs and inline_fewshot:
        overrides["fewshot_config"] = {**overrides.get("fewshot_config", {}),
                                       "sampler": "first_n", "samples": list(fewshot_docs)}
    elif fewshot_docs:
        data_files[FEWSHOT_SPLIT] = write_jsonl(fewshot_docs, cache_dir)
        overrides["fewshot_config"] = {**overrides.get("fewshot_config", {}), "sampler": "first_n"}
    config = task_config(task_name, builtin_yaml, data_files, num_fewshot, cache_dir,
                         overrides, inline)
    path = Path(task_dir) / f"{task_name}.yaml"
    path.write_text(dump_task_yaml(config), encoding="utf-8")
    return path
