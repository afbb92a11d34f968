"""``edgebuild methods``, ``report``, ``package`` and ``verify``."""
from __future__ import annotations

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
        if m.get("order"):
            walk = ", then ".join(f"{k} {m['space'][k]}" for k in m["order"])
            click.echo(f"    search: {walk}")


@click.command("report")
@out_option
@target_option
@click.option("--html", "as_html", is_flag=True,
              help="(Re)write OUT/TARGET/report.html from the manifest and print its path.")
def report_cmd(out, target, as_html):
    """Print the build report of OUT/TARGET (written by `edgebuild all`)."""
    from edgebuild.core.errors import UsageError
    build_dir = Path(out) / target
    if as_html:
        from edgebuild.build.report_html import write_html_report
        click.echo(str(write_html_report(build_dir)))
        return
    path = build_dir / "report.md"
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


@click.command("verify")
@click.argument("pkg", type=click.Path(dir_okay=False, path_type=Path))
@click.option("--extract", "extract_to", type=click.Path(file_okay=False, path_type=Path), default=None,
              help="Also install the verified package as DIR/<package name>/.")
def verify_cmd(pkg, extract_to):
    """Check a release package: every file's sha256, the package index, no missing, extra or unsafe
    entries. Exits 8 when the package is corrupt or unsafe."""
    from edgebuild.build.package import extract, verify
    if extract_to is not None:
        click.echo(f"ok: installed {extract(pkg, extract_to)}")
        return
    info = verify(pkg)
    click.echo(f"ok: {info['name']} ({info['files']} files, {info['bytes']} bytes verified)")


def register(group) -> None:
    for cmd in (methods_cmd, report_cmd, package_cmd, verify_cmd):
        group.add_command(cmd)
