"""Command line of the device agent.

    python -m edgebuild.device_agent serve --stdio --root DIR   # JSON lines on stdin/stdout
    python -m edgebuild.device_agent info --root DIR            # device facts as JSON

The agent never opens a listening port: the host starts it as a subprocess or as the remote
command of an SSH session and talks over its stdin and stdout. Logging goes to stderr or to a
file under the root, never to stdout, which carries only protocol lines.
"""
from __future__ import annotations

import argparse
import json
import logging
import os
import sys
from pathlib import Path

from edgebuild.device_agent import protocol

log = logging.getLogger("edgebuild.device_agent")


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="edgebuild-agent", description=__doc__.split("\n")[0])
    parser.add_argument("--version", action="version",
                        version=f"edgebuild-agent {protocol.AGENT_VERSION} "
                                f"(protocol {protocol.PROTOCOL_VERSION})")
    sub = parser.add_subparsers(dest="command", required=True)
    serve = sub.add_parser("serve", help="answer protocol requests on stdin/stdout")
    serve.add_argument("--stdio", action="store_true",
                       help="talk over stdin/stdout (the only mode: the agent never listens)")
    serve.add_argument("--root", required=True, type=Path, help="folder holding uploads and stages")
    serve.add_argument("--log-file", help="log to this file (relative to the root) instead of stderr")
    serve.add_argument("--log-level", default="INFO",
                       choices=["DEBUG", "INFO", "WARNING", "ERROR"])
    info = sub.add_parser("info", help="print the facts the 'info' command reports, as JSON")
    info.add_argument("--root", required=True, type=Path)
    return parser


def _configure_logging(root: Path, log_file: str | None, level: str) -> None:
    if log_file:
        path = root / log_file
        path.parent.mkdir(parents=True, exist_ok=True)
        handler = logging.FileHandler(path, encoding="utf-8")
    else:
        handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s"))
    logging.basicConfig(level=level, handlers=[handler])


def _protocol_stdout():
    """Keep the real stdout for protocol lines and point fd 1 at stderr.

    Native libraries (onnxruntime) and stray prints then land on stderr instead of corrupting
    the reply stream.
    """
    sys.stdout.flush()
    out = os.fdopen(os.dup(1), "wb", buffering=0)
    os.dup2(2, 1)
    sys.stdout = sys.stderr
    return out


def _serve(args) -> int:
    from edgebuild.device_agent.server import Agent

    if not args.stdio:
        print("edgebuild-agent: serve needs --stdio (the agent only talks over stdin/stdout)",
              file=sys.stderr)
        return 2
    root = args.root.expanduser()
    try:
        agent = Agent(root)
    except OSError as err:
        print(f"edgebuild-agent: cannot use root {root}: {err}", file=sys.stderr)
        return 2
    _configure_logging(root, args.log_file, args.log_level)
    out = _protocol_stdout()
    try:
        agent.serve(sys.stdin.buffer, out)
    except (BrokenPipeError, KeyboardInterrupt):
        log.info("host went away")
    return 0


def _info(args) -> int:
    from edgebuild.device_agent import sysinfo

    root = args.root.expanduser()
    root.mkdir(parents=True, exist_ok=True)
    print(json.dumps(sysinfo.collect(root), indent=2))
    return 0


def main(argv=None) -> int:
    """Entry point of ``edgebuild-agent`` and ``python -m edgebuild.device_agent``."""
    args = _parser().parse_args(argv)
    return {"serve": _serve, "info": _info}[args.command](args)


if __name__ == "__main__":
    sys.exit(main())
