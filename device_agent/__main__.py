"""Command line of the device agent.

    python -m edgebuild.device_agent serve --stdio --root DIR   # JSON lines on stdin/stdout
    python -m edgebuild.device_agent info --root DIR            # device facts as JSON
    python -m edgebuild.device_agent generate --package PKG "prompt"   # stream a continuation
    python -m edgebuild.device_agent measure --dir STAGE        # one stage, this process alone

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
    gen = sub.add_parser("generate", help="stream a continuation of PROMPT from a runtime package")
    gen.add_argument("--package", required=True, type=Path,
                     help="runtime package: its folder, an extracted release, or a release .tar.gz")
    gen.add_argument("prompt")
    gen.add_argument("--max-new-tokens", type=int, default=128)
    gen.add_argument("--threads", type=int, default=None, help="onnxruntime intra-op threads")
    measure = sub.add_parser("measure", help="load one stage folder in this fresh process, time it "
                                             "and print its memory and timing as one JSON line")
    measure.add_argument("--dir", required=True, type=Path, help="the stage folder")
    measure.add_argument("--threads", type=int, default=None)
    for name, default in (("prompt-len", 64), ("decode-tokens", 32), ("warmup", 2), ("repeats", 5)):
        measure.add_argument(f"--{name}", type=int, default=default)
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


def _fail(err) -> int:
    print(f"edgebuild-agent: {' '.join(str(err).split())}", file=sys.stderr)
    return 1


def _generate(args) -> int:
    from edgebuild.device_agent import release
    from edgebuild.device_agent.runtime import RuntimeLoadError

    if args.max_new_tokens < 1:
        return _fail("--max-new-tokens must be at least 1")
    try:
        stats = release.generate(args.package, args.prompt, args.max_new_tokens, args.threads)
    except (RuntimeLoadError, ValueError) as err:
        return _fail(err)
    print(f"\n[{stats['new_tokens']} tokens, {stats['decode_tok_s']:.1f} tokens/s decode, "
          f"{stats['tok_s']:.1f} tokens/s overall]", file=sys.stderr)
    return 0


def _measure(args) -> int:
    from edgebuild.device_agent import isolated
    from edgebuild.device_agent.runtime import RuntimeLoadError

    out = _protocol_stdout()     # onnxruntime's own output must not mix with the JSON line
    try:
        result = isolated.measure_here(args.dir, args.threads, prompt_len=args.prompt_len,
                                       decode_tokens=args.decode_tokens, warmup=args.warmup,
                                       repeats=args.repeats)
    except (RuntimeLoadError, ValueError, OSError) as err:
        return _fail(err)
    out.write(protocol.encode_line(result))
    return 0


def main(argv=None) -> int:
    """Entry point of ``edgebuild-agent`` and ``python -m edgebuild.device_agent``."""
    args = _parser().parse_args(argv)
    commands = {"serve": _serve, "info": _info, "generate": _generate, "measure": _measure}
    return commands[args.command](args)


if __name__ == "__main__":
    sys.exit(main())
