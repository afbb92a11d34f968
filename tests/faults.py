"""Fault injection (``make faults``): real builds of the tiny model, each with one fault injected,
against a real sshd on 127.0.0.1 reached through a TCP relay that plays the network (it can cut or
stall the link), and against a second sshd inside a network namespace of its own, behind a veth
pair, whose link nftables rules cut (every packet of the SSH port dropped: a pulled cable); the
device agent runs behind a fault switch (``tests/fault_agent.py``) that kills it or holds a request
at a chosen point, also at points drawn at random (``--seed``). Before and after every scenario the build's output
directory is hashed: what earlier builds wrote (cache entries, manifest, report, JUnit, package)
must survive intact, or be replaced by a complete new set.

Prints one table row per scenario: the exit code (and the one expected), the first error line (else
the last warning), whether earlier outputs survived, and what else was checked. Exits 1 when any
scenario's outcome differs from the expected one.

    python tests/faults.py [--work DIR] [--only NAME ...] [--seed N] [--random-kills N]
"""
from __future__ import annotations

import argparse
import hashlib
import json
import os
import random
import re
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

HERE = Path(__file__).resolve().parent
DATA_DIR = Path(os.environ.get("EDGEBUILD_DATA_DIR", HERE.parent.parent / "shared" / "data"))
TARGET = "faulty-ssh"
CONFIG = """[build]
stages = ["baseline", "rtn"]
tasks = ["arc_easy"]
eudaimonia = false
profile = "smoke"
device_profile = "smoke"
"""


# --- the network and the device ---------------------------------------------------------------


class Link:
    """A TCP relay 127.0.0.1:port -> the device's sshd: ``cut`` drops every open connection
    (``down``: and refuses new ones until ``restore``); ``stall`` silently drops every byte of the
    open connections, as a pulled cable does."""

    def __init__(self, to_port: int):
        self.to_port, self.up, self.socks, self.stalled = to_port, True, [], set()
        self.clients, self.sent, self.cut_at, self.cut_when = set(), 0, None, None
        self.server = socket.create_server(("127.0.0.1", 0))
        self.port = self.server.getsockname()[1]
        self.lock = threading.Lock()
        threading.Thread(target=self._accept, daemon=True).start()

    def _accept(self) -> None:
        while True:
            conn, _ = self.server.accept()
            if not self.up:
                conn.close()
                continue
            try:
                dev = socket.create_connection(("127.0.0.1", self.to_port))
            except OSError:
                conn.close()
                continue
            with self.lock:
                self.socks += [conn, dev]
                self.clients.add(conn)
            for a, b in ((conn, dev), (dev, conn)):
                threading.Thread(target=self._pump, args=(a, b), daemon=True).start()

    def _pump(self, a, b) -> None:
        try:
            while data := a.recv(1 << 16):
                if a not in self.stalled:
                    b.sendall(data)
                if a in self.clients:
                    self._count(len(data))
        except OSError:
            pass
        for s in (a, b):
            _shut(s)

    def _take(self) -> list:
        with self.lock:
            socks, self.socks = self.socks, []
        return socks

    def _count(self, n: int) -> None:
        self.sent += n
        if self.cut_at is not None and self.sent >= self.cut_at:
            self.cut_at, self.cut_when = None, self.sent
            self.cut()

    def cut_after(self, n: int) -> None:
        """Cut the link once ``n`` more bytes went from the host to the device."""
        self.cut_at, self.cut_when, self.sent = n, None, 0

    def cut(self, down: bool = False) -> None:
        self.up = not down
        for s in self._take():
            _shut(s)

    def stall(self) -> None:
        self.stalled.update(self._take())

    def restore(self) -> None:
        self.up = True


def _shut(s) -> None:
    try:
        s.shutdown(socket.SHUT_RDWR)
        s.close()
    except OSError:
        pass


class Device:
    """The loopback sshd, the relay in front of it and the fault plan of its agent."""

    def __init__(self, work: Path):
        from edgebuild.targets import provision
        self.layout = provision.setup_loopback(work / "sshd")
        self.sshd = provision.start_sshd(self.layout, foreground=True, log_file=work / "sshd.log")
        self.link = Link(self.layout.port)
        host_key = self.layout.known_hosts.read_text().split(" ", 1)[1]
        self.known_hosts = work / "known_hosts"
        self.known_hosts.write_text(f"[127.0.0.1]:{self.link.port} {host_key}")
        self.plan_file, self.work = work / "fault-plan.json", work

    def spec(self, root: str, via=None) -> Path:
        """A target spec reaching this device through the relay (or ``via``, a ``Namespace``),
        agent folder ``root``."""
        from edgebuild.targets.spec import load_target
        text = load_target("local").source.read_text().split("[connection]")[0]
        text = text.replace('name = "local"', f'name = "{TARGET}"')
        agent = f"{sys.executable} {HERE / 'fault_agent.py'} {self.plan_file}"
        host, port, key, known = (("127.0.0.1", self.link.port, self.layout.key, self.known_hosts) if via is None
                                  else (via.address, via.layout.port, via.layout.key, via.known_hosts))
        text += (f'[connection]\ntransport = "ssh"\nhost = "{host}"\nport = {port}\n'
                 f'key = "{key}"\nknown_hosts = "{known}"\n'
                 f'agent_python = "{agent}"\nroot = "{self.work / "device" / root}"\n'
                 f'connect_timeout_s = 3.0\nretries = 3\nbackoff_s = 0.5\ntimeout_s = 20.0\n')
        path = self.work / f"{root}.toml"
        path.write_text(text)
        return path

    def plan(self, cmd: str | None = None, at: int = 1, action: str = "kill") -> None:
        self.plan_file.write_text(json.dumps({"cmd": cmd, "at": at, "action": action}))

    def fired(self) -> bool:
        try:
            return bool(json.loads(self.plan_file.read_text()).get("fired"))
        except ValueError:              # being rewritten
            return False

    def close(self) -> None:
        self.sshd.terminate()
        self.sshd.wait(timeout=10)


class Namespace:
    """The device's own sshd inside a network namespace, joined to the host by a veth pair
    (``edgebuild.targets.emulate_net``). ``drop`` adds an nftables table there that drops every
    packet to and from the SSH port (open connections stall, new ones time out, as with a pulled
    cable); ``restore`` deletes it."""

    TABLE = "edgebuild_fault"

    def __init__(self, work: Path):
        from edgebuild.targets import emulate_net as net
        from edgebuild.targets import provision
        missing = [tool for tool in ("ip", "nft") if shutil.which(tool) is None]
        if os.geteuid() != 0 or missing:
            raise RuntimeError("a network namespace with nftables needs root, iproute2 and nftables "
                               f"({'missing: ' + ', '.join(missing) if missing else 'not root'})")
        self.net, self.link = net, net.Link(net.free_slot())
        net.run_commands(net.link_up_commands(self.link, net.LinkShape(1000), net.LinkShape(1000)))
        self.address = self.link.board_addr
        self.layout = provision.setup_loopback(work / "sshd-netns")
        config = self.layout.config.read_text().replace("ListenAddress 127.0.0.1", f"ListenAddress {self.address}")
        self.layout.config.write_text(config)
        host_key = self.layout.known_hosts.read_text().split(" ", 1)[1]
        self.known_hosts = work / "known_hosts-netns"
        self.known_hosts.write_text(f"[{self.address}]:{self.layout.port} {host_key}")
        with open(work / "sshd-netns.log", "ab") as log:
            self.sshd = subprocess.Popen(["ip", "netns", "exec", self.link.netns,
                                          *provision.sshd_command(self.layout, True)],
                                         stdout=log, stderr=log, stdin=subprocess.DEVNULL)
        if not _wait_for(self._listening, 10, self.sshd):
            self.close()
            raise RuntimeError(f"sshd in namespace {self.link.netns} did not listen on {self.address}")

    def _listening(self) -> bool:
        try:
            with socket.create_connection((self.address, self.layout.port), timeout=0.5):
                return True
        except OSError:
            return False

    def _nft(self, script: str, check: bool = True) -> None:
        subprocess.run(["ip", "netns", "exec", self.link.netns, "nft", "-f", "-"], input=script,
                       text=True, capture_output=True, check=check, timeout=30)

    def drop(self) -> None:
        port = self.layout.port
        self._nft(f"table inet {self.TABLE} {{\n"
                  f"  chain input {{ type filter hook input priority 0; tcp dport {port} drop; }}\n"
                  f"  chain output {{ type filter hook output priority 0; tcp sport {port} drop; }}\n}}\n")

    def restore(self) -> None:
        self._nft(f"delete table inet {self.TABLE}\n", check=False)

    def close(self) -> None:
        if self.sshd.poll() is None:
            self.sshd.terminate()
            self.sshd.wait(timeout=10)
        self.net.kill_namespace(self.link)
        self.net.run_commands(self.net.link_down_commands(self.link), check=False)


# --- builds and their outputs -----------------------------------------------------------------


@dataclass
class Row:
    scenario: str
    expected: tuple
    code: int | None = None
    line: str = ""
    intact: str = "?"
    notes: list = field(default_factory=list)
    changed_ok: tuple = ()          # files the scenario itself replaces (a rebuilt cache entry)
    manifest: str = "—"             # a build that completed: whether it wrote its manifest

    @property
    def ok(self) -> bool:
        return self.code in self.expected and self.intact.startswith("yes") and self.manifest != "missing"


@dataclass
class Done:
    returncode: int
    stdout: str
    stderr: str


def finish(proc, timeout_s: float = 900) -> Done:
    out, err = proc.communicate(timeout=timeout_s)
    return Done(proc.returncode, out, err)


def snapshot(out: Path) -> dict:
    """sha256 of every file under ``out`` but locks and quarantined entries."""
    sums = {}
    for p in sorted(out.rglob("*")):
        rel = p.relative_to(out).as_posix()
        if p.is_file() and "_quarantine" not in rel and not p.name.endswith(".lock"):
            sums[rel] = hashlib.sha256(p.read_bytes()).hexdigest()
    return sums


def message(done: Done) -> str:
    """The error line; else the last warning about the device or the cache; else stdout's last line."""
    lines = [ln.strip() for ln in done.stderr.splitlines() if ln.strip()]
    errors = [ln for ln in lines if ln.startswith("error:")]
    if errors:
        return errors[0]
    warnings = [ln for ln in lines if any(w in ln for w in ("lost", "reconnect", "quarantin", "held by",
                                                             "interrupted", "unreachable"))]
    out = [ln.strip() for ln in done.stdout.splitlines() if ln.strip()]
    return (warnings or out or lines or [""])[-1]


class Harness:
    def __init__(self, work: Path):
        self.work, self.out = work, work / "out"
        self.env = dict(os.environ, EDGEBUILD_HOME=str(work / "home"), EDGEBUILD_DATA_DIR=str(DATA_DIR),
                        PYTHONUNBUFFERED="1")
        self.config = work / "build.toml"
        self.config.write_text(CONFIG)
        self.device = Device(work)
        self.rows: list[Row] = []
        self.seed, self._namespace = 0, None

    def namespace(self) -> Namespace:
        """The namespaced device (made on first use)."""
        if self._namespace is None:
            self._namespace = Namespace(self.work)
        return self._namespace

    def close(self) -> None:
        self.device.close()
        if self._namespace is not None:
            self._namespace.close()
        _kill_matching(str(self.device.plan_file))


    def edgebuild(self, *args, wait: bool = True):
        """``edgebuild ARGS`` in a process of its own: finished (``Done``), or running (``wait=False``)."""
        cmd = [sys.executable, "-m", "edgebuild.build.cli", *map(str, args)]
        proc = subprocess.Popen(cmd, env=self.env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        return finish(proc) if wait else proc

    def build_args(self, root: str, *extra, out: Path | None = None, via=None):
        return ("all", "--model", "tiny-random", "--target", self.device.spec(root, via), "--config", self.config,
                "--data-dir", DATA_DIR, "--out", out or self.out, "--wandb", "disabled", *extra)

    def build(self, root: str, *extra, wait: bool = True, out: Path | None = None, via=None):
        return self.edgebuild(*self.build_args(root, *extra, out=out, via=via), wait=wait)

    def manifest(self, out: Path | None = None) -> dict:
        return json.loads(((out or self.out) / TARGET / "manifest.json").read_text())

    def survived(self, before: dict, changed_ok=()) -> str:
        """Whether what was there before is there now, byte for byte, or replaced by a complete
        new set of records (a build that finished writes a new manifest, report and JUnit)."""
        after = snapshot(self.out)
        lost = [k for k in before if k not in after and not k.startswith(("cache/device/", "_"))]
        changed = [k for k in before if k in after and before[k] != after[k] and not k.startswith(changed_ok)]
        records = [k for k in changed if k.startswith(f"{TARGET}/")]
        if records:
            try:
                self.manifest()
            except (OSError, ValueError) as err:
                return f"no: manifest unreadable after the run ({err})"
        cache_changed = [k for k in changed if k.startswith("cache/")]
        verify = self.edgebuild("cache", "verify", "--out", self.out)
        if lost:
            return f"no: {len(lost)} file(s) gone, e.g. {lost[0]}"
        if cache_changed:
            return f"no: {len(cache_changed)} cache file(s) changed, e.g. {cache_changed[0]}"
        if verify.returncode != 0:
            return f"no: cache verify exit {verify.returncode}: {message(verify)}"
        return f"yes ({len(before)} files hashed" + (f"; records rewritten whole" if records else "") + ")"

    def manifest_written(self, code: int, since: float) -> str:
        """For a build that completed (a result's exit code, or 13): ``written`` when it left a
        readable manifest newer than the scenario's start, recording that exit code."""
        if code not in BUILT + (13,):
            return "—"
        path = self.out / TARGET / "manifest.json"
        try:
            fresh = path.stat().st_mtime >= time.time() - (time.monotonic() - since)
            recorded = json.loads(path.read_text()).get("exit_code")
        except (OSError, ValueError):
            return "missing"
        return "written" if fresh and recorded in (code, None) else "missing"

    def run(self, name: str, expected, fn) -> Row:
        row = Row(name, tuple(expected))
        before = snapshot(self.out)
        t0 = time.monotonic()
        try:
            proc, row.notes = fn(self, row)
            row.code, row.line = proc.returncode, message(proc)
            log = self.work / "logs" / f"{len(self.rows):02d}.log"
            log.parent.mkdir(exist_ok=True)
            log.write_text(f"$ {name}\n--- stdout\n{proc.stdout}\n--- stderr\n{proc.stderr}")
            row.intact = self.survived(before, row.changed_ok)
            row.manifest = self.manifest_written(proc.returncode, t0)
        except Exception as err:          # a broken scenario is a row, not the end of the run
            row.intact, row.line = f"no: scenario failed: {type(err).__name__}: {err}", ""
        row.notes.append(f"{time.monotonic() - t0:.0f} s")
        self.rows.append(row)
        print(f"  {name}: exit {row.code} ({'as expected' if row.ok else 'UNEXPECTED'})", flush=True)
        return row


def _kill_matching(marker: str) -> None:
    """Kill what the scenarios left running: fault switches held forever and their agents
    (every process whose command line names ``marker``, the plan file)."""
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit() or int(entry.name) == os.getpid():
            continue
        try:
            if marker.encode() in (entry / "cmdline").read_bytes():
                os.killpg(os.getpgid(int(entry.name)), signal.SIGKILL)
        except (OSError, ProcessLookupError):
            pass


# --- the scenarios ----------------------------------------------------------------------------
# Each takes the harness and its row, and returns what ran (``Done``) and notes for the table.

BUILT = (0, 10, 11)          # a build that completed: a stage shipped (exit codes of results)


def _device_notes(h: Harness, out: Path | None = None) -> list:
    stages = h.manifest(out)["stages"]
    notes = []
    for st in stages:
        lat = st.get("latency") or {}
        notes.append(f"{st['stage']}: device {'measured' if lat.get('measured') else lat.get('status')}")
    return notes


def _wait_for(cond, timeout_s: float = 600, proc=None) -> bool:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline and (proc is None or proc.poll() is None):
        if cond():
            return True
        time.sleep(0.1)
    return False


def clean_build(h, row):
    done = h.build("ref", "--junit", h.out / "junit.xml")
    return done, _device_notes(h)


def bad_model(h, row):
    from edgebuild.targets.spec import load_target  # noqa: F401  (the model folder needs no target)
    folder = h.work / "bad-model"
    folder.mkdir(exist_ok=True)
    (folder / "config.json").write_text(json.dumps({
        "model_type": "llama", "architectures": ["LlamaForCausalLM"], "hidden_size": 16,
        "num_hidden_layers": 1, "num_attention_heads": 2, "intermediate_size": 16, "vocab_size": 32}))
    header = json.dumps({"w": {"dtype": "F32", "shape": [64, 64], "data_offsets": [0, 16384]}}).encode()
    (folder / "model.safetensors").write_bytes(len(header).to_bytes(8, "little") + header + bytes(5000))
    args = list(h.build_args("ref"))
    args[args.index("tiny-random")] = folder
    return h.edgebuild(*args), ["safetensors cut short"]


def bad_config(h, row):
    config = h.work / "bad-config.toml"
    config.write_text(CONFIG.replace('"rtn"', '"rnt"'))
    args = list(h.build_args("ref"))
    args[args.index(h.config)] = config
    return h.edgebuild(*args), ["stage name misspelt"]


def bad_target(h, row):
    args = list(h.build_args("bad-target"))
    spec = h.work / "bad-target-cores.toml"
    spec.write_text(h.device.spec("bad-target").read_text().replace("cores = 2", "cores = 0"))
    args[args.index("--target") + 1] = spec
    return h.edgebuild(*args), ["cores = 0"]


def bad_data(h, row):
    data = h.work / "bad-data"
    shutil.rmtree(data, ignore_errors=True)
    data.mkdir()
    for entry in DATA_DIR.iterdir():
        if entry.name != "arc":
            (data / entry.name).symlink_to(entry)
    shutil.copytree(DATA_DIR / "arc", data / "arc")
    path = data / "arc" / "ARC-Easy" / "ARC-Easy-Test.jsonl"
    path.write_bytes(path.read_bytes()[: path.stat().st_size // 2 + 7])
    args = list(h.build_args("ref"))
    args[args.index("--data-dir") + 1] = data
    return h.edgebuild(*args), ["ARC-Easy test file truncated mid-record"]


def corrupt_package(h, row):
    made = h.edgebuild("package", "--out", h.out, "--target", TARGET)
    if made.returncode != 0:
        return made, ["packaging the finished build failed"]
    pkg = Path(made.stdout.strip().splitlines()[-1])
    copy = h.work / pkg.name
    data = bytearray(pkg.read_bytes())
    data[len(data) // 2] ^= 0xFF
    copy.write_bytes(bytes(data))
    return h.edgebuild("verify", copy), [f"one byte flipped in a copy of {pkg.name}"]


def _faulted_build(h, root: str, action, *extra):
    """A build on a fresh device folder; ``action(proc)`` injects the fault while it runs."""
    proc = h.build(root, *extra, wait=False)
    try:
        action(proc)
    finally:
        done = finish(proc)
        h.device.link.restore()
    return done


def _when_fired(h, then):
    def action(proc):
        if not _wait_for(h.device.fired, proc=proc):
            raise RuntimeError("the planned request never came")
        then()
    return action


def _recovered(h, done):
    notes = _device_notes(h) if done.returncode in BUILT + (13,) else []
    reconnects = sum(((st.get("latency") or {}).get("reconnects") or 0) for st in h.manifest()["stages"]) \
        if done.returncode in BUILT else 0
    return done, notes + ([f"{reconnects} reconnect(s) recorded"] if reconnects else [])


def link_cut_mid_upload(h, row):
    h.device.plan()
    h.device.link.cut_after(4_000_000)                 # the baseline's weights are ~13 MB
    done, notes = _recovered(h, _faulted_build(h, "upload", lambda proc: None))
    partial = h.work / "device" / "upload" / "incoming"
    return done, notes + [f"cut after {h.device.link.cut_when:,} bytes sent" if h.device.link.cut_when
                          else "the link was never cut"] + ([] if not list(partial.glob(".*.part-*"))
                                                             else ["a partial file is left"])


def agent_crash_mid_load(h, row):
    h.device.plan("load", 1, "kill")
    return _recovered(h, _faulted_build(h, "load", lambda proc: None))


def link_cut_mid_measurement(h, row):
    h.device.plan("measure", 1, "hold")
    return _recovered(h, _faulted_build(h, "measure", _when_fired(h, h.device.link.cut)))


def link_stall_mid_scoring(h, row):
    h.device.plan("score", 2, "hold")
    return _recovered(h, _faulted_build(h, "stall", _when_fired(h, h.device.link.stall)))


def board_reboot_mid_scoring(h, row):
    h.device.plan("score", 1, "hold")

    def reboot():
        h.device.link.cut(down=True)
        time.sleep(2.5)
        h.device.link.restore()
    return _recovered(h, _faulted_build(h, "reboot", _when_fired(h, reboot)))


def nft_drop_mid_scoring(h, row):
    """The link of the namespaced device cut by nftables while it scores, restored 3 s later."""
    ns = h.namespace()
    h.device.plan("score", 1, "hold")

    def pull_the_cable():
        ns.drop()
        time.sleep(3)
        ns.restore()
    proc = h.build("netns", wait=False, via=ns)
    try:
        _when_fired(h, pull_the_cable)(proc)
    finally:
        done = finish(proc)
        ns.restore()
    done, notes = _recovered(h, done)
    return done, notes + [f"nftables dropped port {ns.layout.port} in namespace {ns.link.netns} for 3 s"]


RANDOM_POINTS = ("stage", "load", "measure", "score", "activate")


def agent_killed_at_random(h, row):
    """The agent killed at the n-th time it receives a request, both drawn from the run's seed."""
    rng = random.Random(f"{h.seed}/{row.scenario}")
    cmd, at = rng.choice(RANDOM_POINTS), rng.randint(1, 2)
    h.device.plan(cmd, at, "kill")
    done, notes = _recovered(h, _faulted_build(h, f"random-{len(h.rows)}", lambda proc: None))
    fired = "killed" if h.device.fired() else "never reached (the build sent fewer)"
    return done, notes + [f"seed {h.seed}: killed at {cmd!r} #{at}: {fired}"]


def device_lost_for_good(h, row):
    h.device.plan("measure", 1, "hold")
    junit = h.work / "lost-junit.xml"
    done = _faulted_build(h, "lost", _when_fired(h, lambda: h.device.link.cut(down=True)),
                          "--junit", junit)
    notes = _device_notes(h) if done.returncode == 13 else []
    return done, notes + ([f"JUnit written ({junit.stat().st_size} bytes)"] if junit.is_file() else ["no JUnit"])


def unreachable_at_start(h, row):
    h.device.link.cut(down=True)
    try:
        return h.build("unreachable"), ["link down before the build"]
    finally:
        h.device.link.restore()


def concurrent_build(h, row):
    h.device.plan("measure", 1, "hold")
    first = h.build("concurrent", wait=False)
    try:
        if not _wait_for(h.device.fired, proc=first):
            raise RuntimeError("the first build never reached its device")
        second = h.build("concurrent", "--no-wait")
    finally:
        h.device.plan()
        h.device.link.cut()                  # the held request: reconnect and go on
        done = finish(first)
    return second, [f"the first build went on: exit {done.returncode}"]


def corrupt_cache_entry(h, row):
    entries = sorted((h.out / "cache" / "pack").glob("*/*.ebpk")) or sorted((h.out / "cache" / "pack").rglob("*.*"))
    victim = entries[-1]
    before = hashlib.sha256(victim.read_bytes()).hexdigest()
    victim.chmod(0o644)
    data = bytearray(victim.read_bytes())
    data[len(data) // 2] ^= 0xFF
    victim.write_bytes(bytes(data))
    entry = victim.parent.relative_to(h.out).as_posix()
    record = json.loads((victim.parent / "record.json").read_text())
    row.changed_ok = (f"{entry}/_done.json", f"{entry}/record.json")    # the rebuild's own records
    done = h.build("ref")
    again = hashlib.sha256(victim.read_bytes()).hexdigest() if victim.is_file() else None
    new = json.loads((victim.parent / "record.json").read_text())
    differ = sorted(k for k in set(record) | set(new) if record.get(k) != new.get(k))
    return done, [f"{victim.relative_to(h.out)} flipped; rebuilt {'identical' if again == before else 'DIFFERENT'}",
                  f"its record differs only in {differ or 'nothing'}"]


def ctrl_c(h, row):
    h.device.plan("score", 1, "watch")
    proc = h.build("ctrl-c", wait=False)
    if not _wait_for(h.device.fired, proc=proc):
        finish(proc)
        raise RuntimeError("the build never reached its device")
    proc.send_signal(signal.SIGINT)
    return finish(proc), ["SIGINT while the device scores"]


SCENARIOS = [  # name, exit codes expected, scenario
    ("clean build (SSH device)", BUILT, clean_build),
    ("bad model (truncated)", (4,), bad_model),
    ("bad config (unknown stage)", (3,), bad_config),
    ("bad target (cores = 0)", (5,), bad_target),
    ("bad data (truncated file)", (6,), bad_data),
    ("corrupt package", (8,), corrupt_package),
    ("device unreachable at start", (7,), unreachable_at_start),
    ("link cut mid-upload", BUILT, link_cut_mid_upload),
    ("agent crash mid-load", BUILT, agent_crash_mid_load),
    ("link cut mid-measurement", BUILT, link_cut_mid_measurement),
    ("link stalls mid-scoring", BUILT, link_stall_mid_scoring),
    ("board reboot mid-scoring", BUILT, board_reboot_mid_scoring),
    ("link cut by nftables mid-scoring (netns)", BUILT, nft_drop_mid_scoring),
    ("device lost for good", (13,), device_lost_for_good),
    ("concurrent build (--no-wait)", (14,), concurrent_build),
    ("corrupt cache entry", BUILT, corrupt_cache_entry),
    ("Ctrl-C mid-build", (130,), ctrl_c),
]


def sandbox_escapes() -> tuple:
    """``(escapes, programs)``: the hostile generated programs of ``tests/test_sandbox.py`` (writes
    outside the temp dir, reads of a user file, fork and memory bombs, loops, network, signals)
    run in the code sandbox; each that is not contained is an escape."""
    proc = subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider",
                           str(Path(__file__).parent / "test_sandbox.py"), "-k",
                           "hostile or bomb or loop or limit"], capture_output=True, text=True)
    tail = proc.stdout.strip().splitlines()[-1] if proc.stdout.strip() else ""
    counts = {word: int(n) for n, word in re.findall(r"(\d+) (passed|failed|error)", tail)}
    return counts.get("failed", 0) + counts.get("error", 0), sum(counts.values())


def table(rows, escapes: tuple = (None, 0)) -> str:
    head = ["scenario", "exit", "expected", "message (one line)", "earlier outputs intact", "manifest", "notes"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for r in rows:
        msg = (r.line[:140] + "…") if len(r.line) > 140 else r.line
        lines.append(f"| {r.scenario} | {r.code} | {'/'.join(map(str, r.expected))} | {msg.replace('|', '/')} "
                     f"| {r.intact} | {r.manifest} | {'; '.join(r.notes)} |")
    ok = sum(r.ok for r in rows)
    lines.append(f"\n{ok} of {len(rows)} scenarios as expected; faults injected: {len(rows) - 1}; "
                 f"builds completed: {sum(r.code in BUILT + (13,) for r in rows)}; "
                 f"artifacts corrupt after the run: {sum(not r.intact.startswith('yes') for r in rows)}; "
                 f"manifests missing: {sum(r.manifest == 'missing' for r in rows)}; "
                 f"sandbox escapes: {escapes[0]} of {escapes[1]} hostile programs")
    return "\n".join(lines)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--work", type=Path, default=Path("out/faults"))
    parser.add_argument("--only", nargs="*", help="scenario names (substrings) to run after the clean build")
    parser.add_argument("--keep", action="store_true", help="start from the work folder of an earlier run")
    parser.add_argument("--seed", type=int, default=None, help="seed of the random kill points (default: from the clock)")
    parser.add_argument("--random-kills", type=int, default=3, help="builds with the agent killed at a random point")
    args = parser.parse_args(argv)
    if not args.keep:
        shutil.rmtree(args.work, ignore_errors=True)
    args.work.mkdir(parents=True, exist_ok=True)
    h = Harness(args.work.resolve())
    h.seed = args.seed if args.seed is not None else int(time.time()) % 100_000
    print(f"random kill points from seed {h.seed} (--seed {h.seed} repeats them)", flush=True)
    scenarios = SCENARIOS + [(f"agent killed at a random point ({i + 1})", BUILT, agent_killed_at_random)
                             for i in range(args.random_kills)]
    try:
        for name, expected, fn in scenarios:
            if fn is clean_build or not args.only or any(o in name for o in args.only):
                h.run(name, expected, fn)
    finally:
        h.close()
    escapes = sandbox_escapes()
    text = table(h.rows, escapes)
    print(text)
    (args.work / "faults.md").write_text(text + "\n")
    return 0 if all(r.ok for r in h.rows) and escapes[0] == 0 else 1


if __name__ == "__main__":
    sys.exit(main())
