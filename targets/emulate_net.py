"""The network of an emulated board: its own network namespace, joined to the host by a veth pair
shaped like the board's usual link (``tc tbf``: a rate, a burst and a queueing latency).

A token-bucket filter shapes what leaves an interface, so each end of the pair gets one: the host
end shapes the downlink (host to board: stage uploads), the board end the uplink. The namespace has
no route beyond its /30 link, so nothing on the board reaches the internet.

Slot ``n`` (1-250) of a board gives its names and addresses: namespace ``edgebuild-<n>``,
interfaces ``ebh<n>`` (host) and ``ebd<n>`` (board), addresses ``10.213.<n>.1`` and ``.2``.
The functions here only build command lines (``link_up_commands``, ``link_down_commands``);
``run_commands`` runs them.
"""
from __future__ import annotations

import logging
import os
import signal
import subprocess
import time
from dataclasses import dataclass
from pathlib import Path

from edgebuild.core.errors import DeviceError, HostError

log = logging.getLogger(__name__)

NETNS_DIR = Path("/run/netns")
SUBNET = "10.213"                  # 10.213.<slot>.0/30 per board
MAX_SLOT = 250


@dataclass(frozen=True)
class LinkShape:
    """A link's rate (Mbit/s), token-bucket burst (KiB) and longest queueing delay (ms)."""

    rate_mbit: float
    burst_kib: int = 32
    latency_ms: int = 50

    def tbf_args(self) -> list[str]:
        """``tc qdisc ... tbf`` arguments for this shape."""
        return ["tbf", "rate", f"{self.rate_mbit:g}mbit", "burst", f"{self.burst_kib}kb",
                "latency", f"{self.latency_ms}ms"]


@dataclass(frozen=True)
class Link:
    """One board's namespace, interfaces and addresses."""

    slot: int

    def __post_init__(self):
        if not 1 <= self.slot <= MAX_SLOT:
            raise DeviceError(f"emulated board slot {self.slot} is outside 1-{MAX_SLOT}")

    @property
    def netns(self) -> str:
        return f"edgebuild-{self.slot}"

    @property
    def host_if(self) -> str:
        return f"ebh{self.slot}"

    @property
    def board_if(self) -> str:
        return f"ebd{self.slot}"

    @property
    def host_addr(self) -> str:
        return f"{SUBNET}.{self.slot}.1"

    @property
    def board_addr(self) -> str:
        return f"{SUBNET}.{self.slot}.2"


def link_up_commands(link: Link, down: LinkShape, up: LinkShape) -> list[list[str]]:
    """Commands that create ``link``: namespace, veth pair, addresses, and a tbf on each end
    (``down`` shapes host to board, ``up`` board to host)."""
    ns = ["ip", "-n", link.netns]
    return [
        ["ip", "netns", "add", link.netns],
        ["ip", "link", "add", link.host_if, "type", "veth", "peer", "name", link.board_if,
         "netns", link.netns],
        ["ip", "addr", "add", f"{link.host_addr}/30", "dev", link.host_if],
        ["ip", "link", "set", link.host_if, "up"],
        [*ns, "link", "set", "lo", "up"],
        [*ns, "addr", "add", f"{link.board_addr}/30", "dev", link.board_if],
        [*ns, "link", "set", link.board_if, "up"],
        ["tc", "qdisc", "replace", "dev", link.host_if, "root", *down.tbf_args()],
        ["tc", "-n", link.netns, "qdisc", "replace", "dev", link.board_if, "root", *up.tbf_args()],
    ]


def link_down_commands(link: Link) -> list[list[str]]:
    """Commands that remove ``link`` (deleting the namespace deletes the veth pair)."""
    return [["ip", "netns", "delete", link.netns], ["ip", "link", "delete", link.host_if]]


def run_commands(commands: list[list[str]], *, check: bool = True) -> None:
    """Run each command; with ``check``, the first failure raises ``HostError``."""
    for argv in commands:
        done = subprocess.run(argv, capture_output=True, text=True, stdin=subprocess.DEVNULL,
                              timeout=30, check=False)
        if done.returncode != 0 and check:
            raise HostError(f"`{' '.join(argv)}` failed: {done.stderr.strip() or done.returncode}; "
                            f"network namespaces, veth and tc tbf need root and iproute2")
        if done.returncode != 0:
            log.debug("ignored: %s: %s", " ".join(argv), done.stderr.strip())


def exists(link: Link) -> bool:
    """Whether ``link``'s namespace exists."""
    return (NETNS_DIR / link.netns).exists()


def in_namespace(pid: int, link: Link) -> bool:
    """Whether process ``pid`` lives in ``link``'s network namespace."""
    try:
        return os.stat(f"/proc/{pid}/ns/net").st_ino == os.stat(NETNS_DIR / link.netns).st_ino
    except OSError:
        return False


def taken_slots() -> set[int]:
    """Slots whose namespace or host interface exists (used by us or anyone else)."""
    taken = set()
    if NETNS_DIR.is_dir():
        taken |= {int(n.rsplit("-", 1)[1]) for n in os.listdir(NETNS_DIR)
                  if n.startswith("edgebuild-") and n.rsplit("-", 1)[1].isdigit()}
    for name in os.listdir("/sys/class/net"):
        if name.startswith("ebh") and name[3:].isdigit():
            taken.add(int(name[3:]))
    return taken


def free_slot(avoid: set[int] = frozenset()) -> int:
    """The lowest slot no board uses."""
    busy = taken_slots() | set(avoid)
    for slot in range(1, MAX_SLOT + 1):
        if slot not in busy:
            return slot
    raise HostError(f"all {MAX_SLOT} emulated board slots are in use; stop a board first")


def namespace_pids(link: Link) -> list[int]:
    """Processes running inside ``link``'s namespace."""
    done = subprocess.run(["ip", "netns", "pids", link.netns], capture_output=True, text=True,
                          timeout=30, check=False)
    return [int(p) for p in done.stdout.split() if p.isdigit()]


def kill_namespace(link: Link, grace_s: float = 5.0) -> None:
    """Stop every process inside ``link``'s namespace (SIGTERM, then SIGKILL after ``grace_s``)."""
    for sig in (signal.SIGTERM, signal.SIGKILL):
        pids = namespace_pids(link) if exists(link) else []
        for pid in pids:
            try:
                os.kill(pid, sig)
            except ProcessLookupError:
                pass
        deadline = time.monotonic() + grace_s
        while pids and time.monotonic() < deadline:
            time.sleep(0.1)
            pids = namespace_pids(link)
        if not pids:
            return
