"""Emulated board profiles: which real board's spec, which CPU qemu-user emulates, what the
board's ``/proc/cpuinfo`` says, and its usual network link. Registered in ``boards``::

    board = boards.get("rpi4")
    board.spec, board.qemu_cpu, board.cpuinfo(), board.wifi
"""
from __future__ import annotations

from dataclasses import dataclass

from edgebuild.core.errors import TargetError
from edgebuild.core.registry import Registry
from edgebuild.targets import emulate_rootfs as rootfs
from edgebuild.targets.emulate_net import LinkShape


@dataclass(frozen=True)
class Board:
    """An emulated board's profile: its target spec, CPU, what ``/proc/cpuinfo`` says, its link."""

    name: str                          # "rpi4"
    spec: str                          # the real board's target spec
    qemu_cpu: str                      # qemu-user's -cpu model (QEMU_CPU)
    model: str                         # the "Model" line of /proc/cpuinfo
    revision: str                      # the board revision code
    cpu_part: str                      # MIDR part number (0xd08: Cortex-A72)
    cpu_variant: str
    cpu_revision: int
    features: str
    wifi: LinkShape                    # the board's usual link, both directions
    hardware: str | None = None        # the "Hardware" line (Pi 4 kernels print one)
    cores: int = 4
    release: rootfs.Release = rootfs.BOOKWORM_ARM64

    def cpuinfo(self) -> str:
        """``/proc/cpuinfo`` as the board's 64-bit kernel prints it."""
        core = ("processor\t: {n}\nBogoMIPS\t: 108.00\nFeatures\t: {features}\n"
                "CPU implementer\t: 0x41\nCPU architecture: 8\nCPU variant\t: {variant}\n"
                "CPU part\t: {part}\nCPU revision\t: {revision}\n\n")
        text = "".join(core.format(n=n, features=self.features, variant=self.cpu_variant,
                                   part=self.cpu_part, revision=self.cpu_revision)
                       for n in range(self.cores))
        if self.hardware:
            text += f"Hardware\t: {self.hardware}\n"
        return text + f"Revision\t: {self.revision}\nSerial\t\t: 1000000000000000\nModel\t\t: {self.model}\n"


RPI4 = Board(name="rpi4", spec="rpi4", qemu_cpu="cortex-a72", model="Raspberry Pi 4 Model B Rev 1.4",
             revision="c03114", cpu_part="0xd08", cpu_variant="0x0", cpu_revision=3,
             features="fp asimd evtstrm crc32 cpuid", hardware="BCM2835",
             wifi=LinkShape(rate_mbit=40, burst_kib=32, latency_ms=50))
RPI5 = Board(name="rpi5", spec="rpi5", qemu_cpu="cortex-a76", model="Raspberry Pi 5 Model B Rev 1.0",
             revision="d04170", cpu_part="0xd0b", cpu_variant="0x4", cpu_revision=1,
             features="fp asimd evtstrm aes pmull sha1 sha2 crc32 atomics fphp asimdhp cpuid "
                      "asimdrdm lrcpc dcpop asimddp",
             wifi=LinkShape(rate_mbit=60, burst_kib=48, latency_ms=40))

boards: Registry = Registry("emulated board", error=TargetError)
boards.register("rpi4", RPI4)
boards.register("rpi5", RPI5)
