"""``edgebuild targets`` and ``edgebuild device``: target specs, device connectivity and setup."""
from __future__ import annotations

import json
import tempfile
from pathlib import Path

import click


@click.group("targets")
def targets_group():
    """List, show and check target specs (devices and their budgets)."""


@targets_group.command("list")
def list_cmd():
    """List the known targets."""
    from edgebuild.targets import load_target
    from edgebuild.targets.spec import target_names
    for name in target_names():
        t = load_target(name)
        click.echo(f"{name:<20} {t.arch:<8} {t.description}")


@targets_group.command("show")
@click.argument("name")
def show_cmd(name):
    """Show a target's full spec as JSON (a name or a .toml path)."""
    from edgebuild.targets import load_target
    click.echo(json.dumps(load_target(name).to_dict(), indent=2))


@targets_group.command("check")
@click.argument("file")
def check_spec_cmd(file):
    """Validate a target spec FILE (or a registered name): print `ok: ...` or the one-line
    error (exit code 5)."""
    from edgebuild.targets import load_target
    t = load_target(file)
    where = f"{t.connection.transport}" + (f" to {t.connection.host}" if t.connection.host else "")
    click.echo(f"ok: {file}: target {t.name} ({t.arch}, {t.cores} cores, {t.ram_mb} MiB RAM), "
               f"transport {where}")


@targets_group.command("docs")
@click.option("--write", "dest", type=click.Path(dir_okay=False, path_type=Path), default=None,
              help="Write the Markdown here (atomically) instead of printing it.")
def docs_cmd(dest):
    """Print the reference of every target spec key (docs/targets.md), from the schema."""
    from edgebuild.build.cli.config_cmds import emit
    from edgebuild.targets.spec import reference
    emit(reference(), dest)


@click.group("device")
def device_group():
    """Talk to a target's device agent, or set a device up for it."""


@device_group.command("check")
@click.option("--target", default="local", show_default=True, help="Target name or .toml file.")
def check_cmd(target):
    """Connect to the device agent, say hello and print what the device reports.

    A board whose Python or glibc differs from its spec's [runtime] is an error (exit code 5).
    """
    from edgebuild.targets import load_target
    from edgebuild.targets.client import connect
    from edgebuild.targets.spec import measurement_label
    from edgebuild.targets.transport import transport_for
    t = load_target(target)
    transport = transport_for(t)
    try:
        board = _check_platform(t, transport)
    except BaseException:
        transport.close()
        raise
    with connect(t, transport) as client:
        hello, info = client.agent_hello, client.info()
    result = {"hello": hello, "info": info, "timings": measurement_label(t)}
    if board:
        result["platform"] = board
    click.echo(json.dumps(result, indent=2))


def _check_platform(t, transport) -> dict | None:
    """The board's Python and glibc, checked against the spec (when it names them)."""
    if not (t.runtime.python_version or t.runtime.glibc):
        return None
    from edgebuild.targets.provision import check_platform
    from edgebuild.targets.spec import resolve_connection
    return check_platform(t, transport, resolve_connection(t).agent_python or "python3")


@device_group.command("setup")
@click.option("--target", default="local-ssh", show_default=True, help="Target name or .toml file.")
@click.option("--wheelhouse", type=click.Path(file_okay=False, exists=True, path_type=Path),
              help="Folder of numpy/onnxruntime wheels for the device (skips the download).")
@click.option("--device-python", default="python3", show_default=True,
              help="The device's interpreter that creates the agent's venv.")
@click.option("--no-runtime", is_flag=True, help="Install the agent without numpy and onnxruntime.")
@click.option("--port", type=int, help="local-ssh: the loopback sshd's port (default: a free one).")
@click.option("--start-sshd", is_flag=True, help="local-ssh: start the loopback sshd if it is not running.")
@click.option("--install", is_flag=True,
              help="local-ssh: install the agent into a venv over SSH too, as on a board.")
def setup_cmd(target, wheelhouse, device_python, no_runtime, port, start_sshd, install):
    """Set a device up: install the agent and its runtime, offline, into a venv on the device.

    \b
    The host builds the agent wheel, downloads numpy and onnxruntime wheels for the target's
    platform and Python, pushes them over the target's transport and installs them with
    `pip install --no-index`; the venv's interpreter is recorded for the target in
    $EDGEBUILD_HOME/devices/<target>.json.
    For local-ssh it first makes a key pair, a private sshd config on 127.0.0.1 and the
    known_hosts entry under $EDGEBUILD_HOME/local-ssh/, and records them.
    A labgrid group (--target labgrid:TAG=VALUE) sets up every board of the group, each place
    acquired for its turn. A board whose Python or glibc differs from the spec: exit code 5.
    """
    from edgebuild.targets import load_target
    t = load_target(target)
    result = {"target": t.name}
    if t.name == "local-ssh":
        result["loopback"] = _setup_loopback(t, port, start_sshd)
        if not install:
            return _report(result)
    if t.connection.transport == "local" and not install:
        result["note"] = "the local target runs the agent with this interpreter; nothing to install"
        return _report(result)
    if t.labgrid is not None:
        from edgebuild.targets.labgrid import each_place
        result["installed"] = {p.labgrid.place: _install(p, wheelhouse, device_python, not no_runtime)
                               for p in each_place(t)}
        return _report(result)
    result["installed"] = _install(t, wheelhouse, device_python, not no_runtime)
    _report(result)


def _setup_loopback(t, port, start) -> dict:
    from edgebuild.core.paths import edgebuild_home
    from edgebuild.targets.provision import setup_local_ssh
    loopback = setup_local_ssh(t, edgebuild_home() / "local-ssh", port=port, start=start)
    if not loopback["listening"]:
        loopback["next"] = (f"start the loopback sshd: {' '.join(loopback['sshd_command'])} "
                            f"(or rerun with --start-sshd)")
    return loopback


def _install(t, wheelhouse, device_python, with_runtime) -> dict:
    from edgebuild.targets.provision import provision
    from edgebuild.targets.transport import transport_for
    transport = transport_for(t)
    try:
        with tempfile.TemporaryDirectory(prefix="edgebuild-wheels-") as work:
            return provision(t, transport, work, wheelhouse=wheelhouse,
                             device_python=device_python, with_runtime=with_runtime)
    finally:
        transport.close()


def _report(result: dict) -> None:
    click.echo(json.dumps(result, indent=2))


def register(group) -> None:
    from edgebuild.build.cli import emulate_cmds
    emulate_cmds.register(device_group)
    group.add_command(targets_group)
    group.add_command(device_group)
