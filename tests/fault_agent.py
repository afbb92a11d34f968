"""The device agent behind a fault switch, for ``tests/faults.py``: started over SSH in place of
the device's interpreter (``agent_python``), it runs the real agent as its child and relays the
host's requests to it, line by line. A plan file (``FAULT_PLAN``, JSON) names a request and its
count over every agent started: when that request comes, the relay writes ``fired`` next to the
plan and either kills the agent and itself (``kill``: the agent crashed) or holds the request
unanswered (``hold``: the harness cuts the link or stops the device meanwhile).

    fault_agent.py PLAN_FILE -m edgebuild.device_agent serve --stdio --root DIR
"""
from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path


def _fire(plan_file: Path, cmd: str) -> str | None:
    """Count ``cmd``; the plan's action when this is the planned one (it fires once)."""
    try:
        plan = json.loads(plan_file.read_text())
    except (OSError, ValueError):
        return None
    counts = plan.setdefault("seen", {})
    counts[cmd] = counts.get(cmd, 0) + 1
    fire = not plan.get("fired") and plan.get("cmd") == cmd and counts[cmd] == plan.get("at", 1)
    if fire:
        plan["fired"] = time.time()
    tmp = plan_file.with_name(plan_file.name + f".{os.getpid()}")
    tmp.write_text(json.dumps(plan))
    os.replace(tmp, plan_file)
    return plan.get("action") if fire else None


def main(argv: list[str]) -> int:
    plan_file, command = Path(argv[0]), [sys.executable, *argv[1:]]
    if "serve" not in command:
        os.execv(sys.executable, command)
    child = subprocess.Popen(command, stdin=subprocess.PIPE)
    for line in sys.stdin.buffer:
        try:
            cmd = json.loads(line).get("cmd")
        except ValueError:
            cmd = None
        action = _fire(plan_file, cmd) if cmd else None
        if action == "kill":
            child.send_signal(signal.SIGKILL)
            child.wait()
            return 137
        if action == "hold":
            while True:
                time.sleep(1)
        child.stdin.write(line)
        child.stdin.flush()
    child.stdin.close()
    return child.wait()


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
