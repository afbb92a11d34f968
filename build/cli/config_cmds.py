"""``edgebuild config``: check a build config file, print the reference of every key."""
from __future__ import annotations

from pathlib import Path

import click


@click.group("config")
def config_group():
    """Check build config files; print the reference of every key."""


@config_group.command("check")
@click.argument("file", type=click.Path(path_type=Path))
def check_cmd(file):
    """Validate a build config FILE: print `ok: ...` or the one-line error (exit code 3)."""
    from edgebuild.build.config import load_config
    cfg = load_config(file)
    tables = f"; [stage] tables: {', '.join(cfg.stage)}" if cfg.stage else ""
    tasks = ", ".join(cfg.tasks) if cfg.tasks is not None else "the core suite and expert benchmarks"
    click.echo(f"ok: {file}: stages {' -> '.join(cfg.stages)}; profile {cfg.profile}; "
               f"tasks {tasks}{tables}")


@config_group.command("docs")
@click.option("--write", "dest", type=click.Path(dir_okay=False, path_type=Path), default=None,
              help="Write the Markdown here (atomically) instead of printing it.")
def docs_cmd(dest):
    """Print the reference of every build config key (docs/config.md), from the schema."""
    from edgebuild.build.config import reference
    emit(reference(), dest)


def emit(text: str, dest: Path | None) -> None:
    """``text`` on stdout, or written atomically to ``dest``."""
    if dest is None:
        click.echo(text, nl=False)
        return
    from edgebuild.core.errors import UsageError
    from edgebuild.core.files import write_text_atomic
    try:
        write_text_atomic(dest, text)
    except OSError as e:
        raise UsageError(f"cannot write {dest}: {e.strerror or e}", hint="pass a writable --write path") from None
    click.echo(f"wrote {dest}")


def register(group) -> None:
    group.add_command(config_group)
