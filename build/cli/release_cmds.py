"""``edgebuild methods``, ``report`` and ``package``."""
from __future__ import annotations

import json
from pathlib import Path

import click

from edgebuild.build.cli.options import out_option, target_option


@click.command("methods")
def methods_cmd():
    """List the compression methods and their knobs."""
    from edgebuild.compress import method_info
    for m in method_info():
        label = " (reference)" if m.get("reference") else ""
        state = "" if m.get("available", True) else f"  [unavailable: {m.get('reason')}]"
        click.echo(f"{m['name']}{label}: {m.get('doc', '')}{state}")
        for k, v in (m.get("knobs") or {}).items():
            click.echo(f"    {k} = {v!r}")


@click.command("report")
@out_option
@target_option
def report_cmd(out, target):
    """Print the build report of OUT/TARGET (written by `edgebuild all`)."""
    from edgebuild.build.errors import UsageError
    path = Path(out) / target / "report.md"
    if not path.exists():
        raise UsageError(f"no report at {path}", hint="run `edgebuild all` with the same --out and --target")
    click.echo(path.read_text())


@click.command("package")
@out_option
@target_option
@click.option("--dest", type=click.Path(file_okay=False, path_type=Path), default=None,
              help="Where to write the release (default OUT/TARGET/release).")
def package_cmd(out, target, dest):
    """Package the shipped stage of a finished build as a reproducible tar.gz."""
    from edgebuild.build.package import build_package
    path = build_package(Path(out) / target, dest)
    click.echo(str(path))


def register(group) -> None:
    for cmd in (methods_cmd, report_cmd, package_cmd):
        group.add_command(cmd)
