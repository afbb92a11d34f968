"""``edgebuild targets`` and ``edgebuild device``: target specs and device connectivity."""
from __future__ import annotations

import json

import click


@click.group("targets")
def targets_group():
    """List and show target specs (devices and their budgets)."""


@targets_group.command("list")
def list_cmd():
    """List the known targets."""
    from edgebuild.targets import load_target, targets
    for name in targets.names():
        t = load_target(name)
        click.echo(f"{name:<20} {t.arch:<8} {t.description}")


@targets_group.command("show")
@click.argument("name")
def show_cmd(name):
    """Show a target's full spec as JSON (a name or a .toml path)."""
    from edgebuild.targets import load_target
    click.echo(json.dumps(load_target(name).to_dict(), indent=2))


@click.group("device")
def device_group():
    """Talk to a target's device agent."""


@device_group.command("check")
@click.option("--target", default="local", show_default=True, help="Target name or .toml file.")
def check_cmd(target):
    """Connect to the device agent, say hello and print what the device reports."""
    from edgebuild.targets import load_target, transports
    from edgebuild.targets.client import AgentClient
    t = load_target(target)
    transport = transports.get(t.connection.transport)(t)
    client = AgentClient(transport, timeout_s=t.connection.timeout_s)
    try:
        hello = client.hello(target=t.name)
        info = client.info()
    finally:
        client.close()
    click.echo(json.dumps({"hello": hello, "info": info}, indent=2))


def register(group) -> None:
    group.add_command(targets_group)
    group.add_command(device_group)
