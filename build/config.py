"""Build configuration: a TOML file (``[build]``, ``[stage.NAME]``, ``[gates]``) loaded into the
schema of ``edgebuild.build.config_schema`` and validated in one place.

Every error is one line naming the file, the key, the value and what is allowed
(``ConfigError``, exit code 3). ``reference()`` renders every key as ``docs/config.md``.
"""
from __future__ import annotations

import dataclasses
import sys
from pathlib import Path

from edgebuild.build.config_schema import (
    DEFAULT_STAGES, LADDER, PROFILES, RETENTION_KINDS, SCOPES, SOURCES, BuildConfig, GateConfig,
    StageConfig, default_stage,
)
from edgebuild.core import schema
from edgebuild.core.errors import ConfigError

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover
    import tomli as tomllib

__all__ = ["BuildConfig", "DEFAULT_STAGES", "GateConfig", "LADDER", "PROFILES", "RETENTION_KINDS",
           "SCOPES", "SOURCES", "StageConfig", "default_stage", "load_config", "reference"]

TABLES = ("stage", "gates")                    # top-level tables besides [build]
NOT_BUILD_KEYS = (*TABLES, "source_file")      # BuildConfig fields that are no [build] keys


@schema.schema
class ConfigFile:
    """The file's top level: three tables."""

    build: dict = dataclasses.field(default_factory=dict)
    stage: dict = dataclasses.field(default_factory=dict)
    gates: dict = dataclasses.field(default_factory=dict)


def config_key(loc: tuple) -> str:
    """The file key of a ``BuildConfig`` location: ``("profile",)`` -> ``build.profile``."""
    if loc and loc[0] in TABLES:
        return schema.dotted(loc)
    return schema.dotted(("build", *loc))


def load_config(path: str | Path | None, **overrides) -> BuildConfig:
    """Load a TOML build config (or the defaults), apply CLI overrides (None: not given), validate."""
    where = "<defaults>" if path is None else str(path)
    raw = {} if path is None else _read_toml(Path(path))
    layout = schema.load(ConfigFile, raw, where, ConfigError)
    _check_tables(layout, where)
    data = {**layout.build, "stage": _stage_tables(layout.stage), "gates": layout.gates,
            "source_file": where}
    cfg = schema.load(BuildConfig, data, where, ConfigError, config_key)
    for key, value in overrides.items():
        if value is not None:
            setattr(cfg, key, value)
    return cfg.validate()


def _read_toml(p: Path) -> dict:
    try:
        with open(p, "rb") as f:
            return tomllib.load(f)
    except FileNotFoundError:
        raise ConfigError(f"config file {p} does not exist", hint="check --config") from None
    except IsADirectoryError:
        raise ConfigError(f"config file {p} is a directory", hint="check --config") from None
    except OSError as e:
        raise ConfigError(f"cannot read config file {p}: {e.strerror}") from None
    except (tomllib.TOMLDecodeError, UnicodeDecodeError) as e:
        raise ConfigError(f"{p}: not valid TOML: {e}") from None


def _check_tables(layout: ConfigFile, where: str) -> None:
    """No table key inside ``[build]``; every ``[stage.NAME]`` names a stage of the file's ladder."""
    keys = [k for k in schema.fields(BuildConfig) if k not in NOT_BUILD_KEYS]
    for key in layout.build:
        if key in NOT_BUILD_KEYS:
            raise ConfigError(f"{where}: unknown key 'build.{key}' (allowed in [build]: "
                              f"{', '.join(keys)}; [{key}] is a table of its own)")
    stages = layout.build.get("stages", list(LADDER))
    stages = stages if isinstance(stages, list) else []
    for name in layout.stage:
        if name == "baseline":
            raise ConfigError(f"{where}: key 'stage.baseline': the baseline stage takes no settings")
        if name not in stages:
            problem = schema.unknown_name(("stage", name), "stage of build.stages", name, stages)
            hint = f"; did you mean {problem.suggestion!r}?" if problem.suggestion else ""
            raise ConfigError(f"{where}: key 'stage.{name}' must {problem.must}, got {name!r}{hint}")


def _stage_tables(tables: dict) -> dict:
    """Each ``[stage.NAME]`` laid over that stage's defaults (a new method starts from its own
    default knobs)."""
    out = {}
    for name, table in tables.items():
        if not isinstance(table, dict):
            out[name] = table
            continue
        base = dataclasses.asdict(default_stage(name))
        if "method" in table and table["method"] != base["method"]:
            base["knobs"] = {}
        out[name] = {**base, **table}
    return out


def check_knobs(cfg: BuildConfig) -> None:
    """Each configured stage's knobs against its method (the method's own checks)."""
    from edgebuild.compress import methods
    for name in cfg.stages[1:]:
        sc = cfg.stage_config(name)
        try:
            methods.get(sc.method).from_knobs(sc.knobs)
        except (KeyError, TypeError, ValueError, ConfigError) as e:
            message = e.args[0] if isinstance(e, KeyError) and e.args else e
            raise ConfigError(f"{cfg.source_file}: key 'stage.{name}.knobs': {message}") from None
        _check_search(cfg.source_file, name, sc, methods.get(sc.method))


def _check_search(where: str, name: str, sc, method) -> None:
    """A stage's own knob space and order, when it sets them, against its method."""
    from edgebuild.compress.search import check_space
    if sc.space is not None or sc.order is not None:
        space = method.knob_space if sc.space is None else sc.space
        order = list(space) if sc.order is None else sc.order
        check_space(method, space, order, f"{where}: stage.{name}")


def reference() -> str:
    """``docs/config.md``: every key of the build config, from the schema."""
    head = ("# Build config reference\n\n"
            "Generated from `edgebuild/build/config_schema.py` by `edgebuild config docs`; do not "
            "edit by hand.\nCheck a file with `edgebuild config check FILE`. Unknown keys are "
            "errors; names are checked against\nthe registries (benchmarks, compression methods, "
            "exporters, expert domains).\n\n")
    example = ("```toml\n[build]\nstages = [\"baseline\", \"seedlm\", \"vptq\", \"hyper\"]\n"
               "tasks = [\"arc_easy\", \"piqa\"]\n\n[stage.seedlm]\nmethod = \"rtn\"\n"
               "knobs = { bits = 4, group_size = 128 }\n\n[gates]\ncore = { seedlm = 0.98 }\n```\n\n")
    return (head + example
            + schema.reference_table(BuildConfig, "`[build]`") + "\n"
            + schema.reference_table(StageConfig, "`[stage.NAME]`: one per stage of `build.stages`")
            + "\nA stage without a table runs its defaults: `seedlm`, `vptq` and `hyper` run the "
              "method they are named after\n(`hyper` with `scope = \"leftovers\"`); a stage named "
              "after another method runs that method.\n\n"
            + schema.reference_table(GateConfig, "`[gates]`")
            + "\nPer-stage tables (`core`, `expert`, `eudaimonia`, `kl_max`) are laid over the "
              "defaults: `core = { seedlm = 0.9 }`\nchanges the seedlm threshold only.\n")
