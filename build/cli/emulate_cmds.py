"""``edgebuild device emulate``: start, stop and inspect emulated boards (``targets/emulate.py``)."""
from __future__ import annotations

import json

import click


@click.group("emulate")
def emulate_group():
    """Run an emulated board (a Raspberry Pi's OS and CPU under qemu-user) on this machine.

    \b
    `start rpi4` builds (once, minutes; cached under $EDGEBUILD_HOME/emulate) a Debian bookworm
    arm64 root filesystem, starts the board's own sshd in a network namespace behind a Wi-Fi-like
    link, and writes the target spec `rpi4-emu` (emulated = true), so that
    `edgebuild device setup --target rpi4-emu` and `edgebuild all --target rpi4-emu` run the
    real board's path. Needs root, qemu-user-static, binfmt-support and debootstrap.
    """


@emulate_group.command("start")
@click.argument("board", default="rpi4")
@click.option("--name", help="Target name of the board (default: BOARD-emu); run several boards "
                             "side by side under different names.")
@click.option("--fresh", is_flag=True, help="Discard what the board wrote before (its venv, stages).")
def start_cmd(board, name, fresh):
    """Start emulated BOARD (rpi4, rpi5) and write its target spec."""
    from edgebuild.targets import emulate
    emulate.prepare_host(board)
    if not emulate.rootfs_cached(board):
        click.echo(f"building the {board} root filesystem (once; minutes) ...", err=True)
    run = emulate.start(board, name, fresh=fresh)
    click.echo(json.dumps(emulate.status(run.name), indent=2))


@emulate_group.command("stop")
@click.argument("name", default="rpi4-emu")
@click.option("--reset", is_flag=True, help="Also discard the board's disk (its venv, stages).")
def stop_cmd(name, reset):
    """Stop emulated board NAME: its processes, namespace, link and target spec go."""
    from edgebuild.targets import emulate
    was = emulate.stop(name, reset=reset)
    click.echo(json.dumps({"name": name, "stopped": was, "reset": reset}))


@emulate_group.command("status")
@click.argument("name", required=False)
def status_cmd(name):
    """Show emulated board NAME (default: every running board)."""
    from edgebuild.targets import emulate
    names = [name] if name else emulate.running_boards()
    click.echo(json.dumps([emulate.status(n) for n in names], indent=2))


def register(device_group) -> None:
    device_group.add_command(emulate_group)
