"""Facts about the device the agent runs on, read from the standard library, /proc and /sys.

Every reader returns ``None`` for what the platform does not expose, so ``collect`` works on a
Raspberry Pi, a Jetson, a laptop or a CI container alike.
"""
from __future__ import annotations

import glob
import importlib.metadata
import logging
import os
import platform
import re
import shutil
import subprocess
import sys

log = logging.getLogger(__name__)

_ARCH_ALIASES = {"arm64": "aarch64", "amd64": "x86_64", "x64": "x86_64"}
# Bits of `vcgencmd get_throttled` (Raspberry Pi firmware documentation).
_THROTTLE_BITS = {
    0: "under-voltage", 1: "arm-frequency-capped", 2: "throttled", 3: "soft-temperature-limit",
    16: "under-voltage-occurred", 17: "arm-frequency-capping-occurred", 18: "throttling-occurred",
    19: "soft-temperature-limit-occurred",
}


def collect(root) -> dict:
    """Everything ``info`` reports: hardware, memory, disk at ``root``, thermals, software."""
    total, available = memory_mb()
    return {
        "arch": arch(),
        "machine": machine_model(),
        "platform": platform.platform(),
        "cpu_model": cpu_model(),
        "cores": os.cpu_count() or 1,
        "cores_available": len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else None,
        "cpu_max_mhz": _cpufreq_mhz("cpuinfo_max_freq"),
        "cpu_cur_mhz": _cpufreq_mhz("scaling_cur_freq"),
        "ram_total_mb": total,
        "ram_available_mb": available,
        "disk_free_mb": shutil.disk_usage(root).free // 2**20,
        "cpu_temp_c": cpu_temperature_c(),
        "throttled": throttling(),
        "python": platform.python_version(),
        "python_executable": sys.executable,
        "onnxruntime": package_version("onnxruntime", "onnxruntime-gpu", "onnxruntime-silicon"),
        "numpy": package_version("numpy"),
    }


def arch() -> str:
    """Normalised CPU architecture: ``aarch64``, ``x86_64``, ``armv7l``, ..."""
    name = platform.machine().lower()
    return _ARCH_ALIASES.get(name, name)


def _read(path: str) -> str | None:
    try:
        with open(path, "rb") as f:
            return f.read().decode("utf-8", "replace").strip("\x00 \n")
    except OSError:
        return None


def machine_model() -> str | None:
    """Board name from the device tree (e.g. "Raspberry Pi 4 Model B Rev 1.4"), else DMI."""
    for path in ("/proc/device-tree/model", "/sys/class/dmi/id/product_name"):
        text = _read(path)
        if text:
            return text
    return None


def cpu_model() -> str | None:
    """CPU model name from /proc/cpuinfo, falling back to ``platform.processor()``."""
    text = _read("/proc/cpuinfo") or ""
    match = re.search(r"^(?:model name|Model|Hardware)\s*:\s*(.+)$", text, re.MULTILINE)
    return match.group(1).strip() if match else (platform.processor() or None)


def memory_mb() -> tuple:
    """``(total, available)`` RAM in MiB from /proc/meminfo, else from ``os.sysconf``."""
    text = _read("/proc/meminfo") or ""
    fields = dict(re.findall(r"^(\w+):\s+(\d+) kB", text, re.MULTILINE))
    if "MemTotal" in fields:
        available = fields.get("MemAvailable", fields.get("MemFree"))
        return int(fields["MemTotal"]) // 1024, int(available) // 1024 if available else None
    try:
        page = os.sysconf("SC_PAGE_SIZE")
        return os.sysconf("SC_PHYS_PAGES") * page // 2**20, None
    except (ValueError, OSError, AttributeError):
        return None, None


def _cpufreq_mhz(name: str) -> int | None:
    text = _read(f"/sys/devices/system/cpu/cpu0/cpufreq/{name}")
    return int(text) // 1000 if text and text.isdigit() else None


def cpu_temperature_c() -> float | None:
    """Temperature of the CPU thermal zone (or the first zone) in degrees Celsius."""
    zones = sorted(glob.glob("/sys/class/thermal/thermal_zone*"))
    preferred = [z for z in zones if re.search(r"cpu|soc|x86_pkg", _read(z + "/type") or "", re.I)]
    for zone in preferred + zones:
        text = _read(zone + "/temp")
        if text and text.lstrip("-").isdigit():
            return round(int(text) / 1000.0, 1)
    return None


def throttling() -> dict | None:
    """Raspberry Pi firmware throttling state from ``vcgencmd get_throttled``, when present."""
    exe = shutil.which("vcgencmd")
    if exe is None:
        return None
    try:
        out = subprocess.run([exe, "get_throttled"], capture_output=True, text=True, timeout=5).stdout
    except (OSError, subprocess.SubprocessError) as err:
        log.warning("vcgencmd get_throttled failed: %s", err)
        return None
    return parse_throttled(out)


def parse_throttled(text: str) -> dict | None:
    """Decode ``throttled=0x50005`` into the raw value and the names of the set bits."""
    match = re.search(r"throttled=(0x[0-9a-fA-F]+)", text)
    if not match:
        return None
    value = int(match.group(1), 16)
    flags = [name for bit, name in sorted(_THROTTLE_BITS.items()) if value >> bit & 1]
    return {"raw": match.group(1), "flags": flags, "throttled_now": bool(value & 0xF)}


def package_version(*dists: str) -> str | None:
    """Version of the first installed distribution among ``dists``, without importing it."""
    for dist in dists:
        try:
            return importlib.metadata.version(dist)
        except importlib.metadata.PackageNotFoundError:
            continue
    return None
