"""Domain exceptions and the exit codes they map to.

Every error a user can cause is an ``EdgebuildError`` subclass. The CLI boundary
(``edgebuild.build.cli.main``) turns each into a one-line message on stderr and
its exit code; nothing else in the code base calls ``sys.exit``.
"""
from __future__ import annotations

import enum


class ExitCode(enum.IntEnum):
    """Process exit codes. Documented in the README; CI systems act on them."""

    OK = 0                 # every stage passed; a compressed stage shipped
    INTERNAL = 1           # a bug: please report it with the traceback (--debug)
    USAGE = 2              # bad command line (click's own code)
    CONFIG = 3             # build config file or option values are invalid
    MODEL = 4              # model cannot be found, fetched or loaded
    TARGET = 5             # unknown or invalid target spec
    DATA = 6               # benchmark data missing or malformed
    DEVICE = 7             # device unreachable, agent protocol or transfer failure
    PACKAGE = 8            # packed artifact or release package is corrupt or unsafe
    NETWORK = 9            # a download failed
    FALLBACK = 10          # a less compressed stage shipped (fallback down the ladder)
    BASELINE_ONLY = 11     # no compressed stage passed; the baseline shipped
    GATE_FAILED = 12       # `edgebuild gate`: the examined stage failed its gates
    DEVICE_INCOMPLETE = 13  # the shipped stage's device checks did not run: not validated on the target
    BUSY = 14              # a lab board (labgrid place) or the output directory is held by someone else
    HOST = 15              # this host lacks a tool or kernel feature the command needs
    INTERRUPTED = 130      # interrupted (Ctrl-C); finished steps stay in the cache


EXIT_CODE_HELP = {
    ExitCode.OK: "success (a build: a compressed stage shipped and every stage passed its gates)",
    ExitCode.INTERNAL: "internal error (a bug; rerun with --debug)",
    ExitCode.USAGE: "bad command line",
    ExitCode.CONFIG: "invalid build config or option value",
    ExitCode.MODEL: "model not found, not fetched, or not loadable",
    ExitCode.TARGET: "unknown or invalid target spec",
    ExitCode.DATA: "benchmark data missing or malformed",
    ExitCode.DEVICE: "device unreachable or agent failure",
    ExitCode.PACKAGE: "corrupt or unsafe artifact or package",
    ExitCode.NETWORK: "a download failed",
    ExitCode.FALLBACK: "a compressed stage shipped, but another stage failed its gates (fallback)",
    ExitCode.BASELINE_ONLY: "no compressed stage passed; the baseline shipped",
    ExitCode.GATE_FAILED: "edgebuild gate: the chosen stage failed",
    ExitCode.DEVICE_INCOMPLETE: "the shipped stage's device checks did not run (rerun, or --no-device)",
    ExitCode.BUSY: "a lab board or the output directory is held by someone else; retry later",
    ExitCode.HOST: "this host lacks a tool the command needs (the message names the package)",
    ExitCode.INTERRUPTED: "interrupted (Ctrl-C); finished steps are kept in the cache",
}


class EdgebuildError(Exception):
    """Base class: ``str(err)`` is the one-line message shown to the user."""

    exit_code: ExitCode = ExitCode.INTERNAL
    hint: str = ""

    def __init__(self, message: str, hint: str | None = None):
        super().__init__(message)
        if hint is not None:
            self.hint = hint

    def one_line(self) -> str:
        msg = " ".join(str(self).split())
        return f"{msg} ({self.hint})" if self.hint else msg


class UsageError(EdgebuildError):
    exit_code = ExitCode.USAGE


class ConfigError(EdgebuildError):
    exit_code = ExitCode.CONFIG


class ModelError(EdgebuildError):
    exit_code = ExitCode.MODEL


class TargetError(EdgebuildError):
    exit_code = ExitCode.TARGET


class DataError(EdgebuildError):
    exit_code = ExitCode.DATA


class DeviceError(EdgebuildError):
    exit_code = ExitCode.DEVICE


class PackageError(EdgebuildError):
    exit_code = ExitCode.PACKAGE


class NetworkError(EdgebuildError):
    exit_code = ExitCode.NETWORK


class HostError(EdgebuildError):
    """This machine cannot do what was asked (e.g. run foreign-architecture binaries)."""

    exit_code = ExitCode.HOST


class BusyError(DeviceError):
    """The device exists but someone else holds it (a labgrid place acquired by another user)."""

    exit_code = ExitCode.BUSY


class UnknownNameError(ConfigError):
    """A registry lookup failed; the message carries a did-you-mean suggestion."""

