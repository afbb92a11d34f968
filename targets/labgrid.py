"""Boards of a labgrid lab: places acquired from the coordinator, reached over SSH, released after.

Needs ``edgebuild[lab]`` (labgrid). A lab exports each board's SSH address as a ``NetworkService``
resource; a place matches it and carries the tag ``target=<edgebuild target spec>`` (the board
class: ``rpi4``, ``rpi5``, ``rpi4-emu``, ...). Then::

    edgebuild all --target labgrid:pi4-a ...              # that place
    edgebuild all --target labgrid:target=rpi4 ...        # every idle place carrying these tags

``load_target("labgrid:...")`` reads the place's tags from the coordinator and returns the tagged
spec with ``connection.transport = "labgrid"`` and a ``[labgrid]`` table (a spec file may carry
such a table itself). The labgrid transport acquires its place on first use (a named place
directly, a group through a labgrid reservation: the coordinator allocates), reads the SSH address
from the place's resource, talks SSH to it (``ssh.SSHTransport``) and releases the place on
``close`` — on success, on error and on Ctrl-C alike. A place someone else holds is a ``BusyError``
(exit code 14) naming the place and the holder.

``connect_group(target)`` acquires every place of a group (one reservation per place, so labgrid
does the allocation) and returns a ``pool.BoardPool`` over their agents: device benchmark
requests are sharded across the boards, a board lost mid-run has its requests re-run on the others.
A build on a group uses it (``pool_session.PoolSession``); ``LabgridTransport`` (one place) serves
a build on one place and the ``edgebuild device`` commands.

The coordinator's address: ``[labgrid] coordinator``, else ``$LG_COORDINATOR`` (labgrid's own
variable), else ``127.0.0.1:20408``. SSH key, user and known_hosts come from the spec's
``[connection]``, overridable by ``EDGEBUILD_LAB_KEY``, ``EDGEBUILD_LAB_USER``,
``EDGEBUILD_LAB_KNOWN_HOSTS`` (for ``labgrid:`` targets); the resource's ``username`` and ``port``
win over the spec's.
"""
from __future__ import annotations

import dataclasses
import logging
import os
import re
import time

from edgebuild.core.errors import BusyError, ConfigError, DeviceError, TargetError
from edgebuild.targets.transport import Transport

log = logging.getLogger(__name__)

TARGET_TAG = "target"                   # the place tag naming the board's target spec
DEFAULT_COORDINATOR = "127.0.0.1:20408"
ENV_PREFIX = "EDGEBUILD_LAB_"
_TAG = re.compile(r"^[a-z][a-z0-9_-]*$")        # labgrid's tag key syntax
_VALUE = re.compile(r"^[a-z0-9][a-z0-9._-]*$")


def _labgrid():
    """labgrid's client modules, or a ``ConfigError`` saying how to install them."""
    try:
        from labgrid.remote import client
        from labgrid.remote.generated import labgrid_coordinator_pb2 as pb2
    except ImportError:
        raise ConfigError("labgrid targets need labgrid; install edgebuild[lab] "
                          "(pip install 'labgrid>=26,<27')") from None
    return client, pb2


# ------------------------------------------------------------------------ selectors

def parse_selector(text: str):
    """``PLACE`` or ``TAG=VALUE[,TAG=VALUE...]`` (a group) as a ``spec.LabgridSpec``."""
    from edgebuild.targets.spec import LabgridSpec
    text = text.strip()
    if not text:
        raise TargetError("labgrid: needs a place name or TAG=VALUE tags, e.g. labgrid:pi4-a or "
                          "labgrid:target=rpi4")
    if "=" not in text:
        return LabgridSpec(place=text)
    tags = {}
    for part in text.split(","):
        key, sep, value = (s.strip() for s in part.partition("="))
        if not sep or not _TAG.match(key) or not _VALUE.match(value):
            raise TargetError(f"labgrid:{text}: {part!r} is not TAG=VALUE (lowercase tag, value of "
                              f"letters, digits, '.', '_', '-'), e.g. labgrid:target=rpi4")
        tags[key] = value
    return LabgridSpec(tags=tags)


def coordinator_address(spec) -> str:
    """Where the coordinator listens: the spec's, ``$LG_COORDINATOR``, or labgrid's default."""
    return spec.coordinator or os.environ.get("LG_COORDINATOR") or DEFAULT_COORDINATOR


def describe(spec) -> str:
    """``place pi4-a`` or ``places tagged target=rpi4``."""
    if spec.place:
        return f"place {spec.place}"
    return "places tagged " + ",".join(f"{k}={v}" for k, v in spec.tags.items())


# ------------------------------------------------------------------------ the coordinator

_SESSIONS: dict = {}       # coordinator address -> [labgrid ClientSession, open Lab handles]


def _open_session(address: str):
    """The process's session with the coordinator at ``address`` (gRPC shares one connection per
    address within a process, and the coordinator takes one session per connection)."""
    entry = _SESSIONS.get(address)
    if entry is None:
        client, _ = _labgrid()
        try:
            session = client.start_session(address)
        except Exception as err:        # noqa: BLE001 - labgrid raises grpc and its own errors
            raise DeviceError(f"cannot reach the labgrid coordinator at {address}: "
                              f"{str(err) or type(err).__name__}; start it (labgrid-coordinator) "
                              f"or set LG_COORDINATOR") from None
        entry = _SESSIONS[address] = [session, 0]
    entry[1] += 1
    return entry[0]


def _close_session(address: str) -> None:
    entry = _SESSIONS[address]
    entry[1] -= 1
    if entry[1] == 0:
        del _SESSIONS[address]
        session = entry[0]
        session.loop.run_until_complete(session.stop())
        session.loop.run_until_complete(session.close())


class Lab:
    """What this process does at a labgrid coordinator (labgrid's ``ClientSession``, driven
    synchronously; handles to one coordinator share its session).

    Use from one thread. ``close`` cancels reservations it made and releases what it acquired.
    """

    def __init__(self, address: str):
        _, self._pb2 = _labgrid()
        self.address = address
        self.session = _open_session(address)
        self.acquired: list[str] = []
        self.reservations: list[str] = []
        self._closed = False

    @property
    def user(self) -> str:
        """Who this session acquires as (``host/user``, as labgrid records it)."""
        return f"{self.session.gethostname()}/{self.session.getuser()}"

    def _call(self, rpc: str, request):
        import grpc
        loop = self.session.loop
        try:
            reply = loop.run_until_complete(getattr(self.session.stub, rpc)(request))
            loop.run_until_complete(self.session.sync_with_coordinator())
        except grpc.aio.AioRpcError as err:
            raise DeviceError(f"labgrid coordinator {self.address}: {rpc} failed: "
                              f"{err.details()}") from None
        return reply

    def places(self) -> dict:
        """``{name: labgrid Place}`` as the coordinator knows them now."""
        return dict(self.session.places)

    def place(self, name: str):
        places = self.places()
        if name not in places:
            raise TargetError(f"labgrid coordinator {self.address} has no place {name!r} "
                              f"(places: {', '.join(sorted(places)) or 'none'})")
        return places[name]

    def matching(self, tags: dict) -> list[str]:
        """Names of the places carrying every tag of ``tags``."""
        return sorted(n for n, p in self.places().items()
                      if all(p.tags.get(k) == v for k, v in tags.items()))

    def acquire(self, name: str) -> None:
        """Acquire place ``name``; ``BusyError`` naming the holder when someone has it."""
        holder = self.place(name).acquired
        if holder:
            raise BusyError(f"labgrid place {name} is already acquired by {holder}; wait for it "
                            f"to be released (labgrid-client -p {name} release, by {holder})")
        self._call("AcquirePlace", self._pb2.AcquirePlaceRequest(placename=name))
        self.acquired.append(name)

    def release(self, name: str) -> None:
        """Release place ``name`` (acquired by this session)."""
        if name in self.acquired:
            self.acquired.remove(name)
            self._call("ReleasePlace", self._pb2.ReleasePlaceRequest(placename=name))

    def reserve(self, tags: dict, count: int, wait_s: float) -> list[str]:
        """Places allocated by the coordinator to ``count`` reservations for ``tags``, waiting
        up to ``wait_s``; reservations not allocated by then are cancelled."""
        tokens = [self._call("CreateReservation", self._pb2.CreateReservationRequest(
            filters={"main": self._pb2.Reservation.Filter(filter=tags)}, prio=0.0)).reservation.token
            for _ in range(count)]
        self.reservations += tokens
        deadline = time.monotonic() + wait_s
        while True:
            places = {t: self._allocated(t) for t in tokens}
            if all(places.values()) or time.monotonic() >= deadline:
                break
            time.sleep(0.5)
        for token, place in places.items():
            if not place:
                self._cancel(token)
        return sorted(p for p in places.values() if p)

    def _allocated(self, token: str) -> str | None:
        reply = self._call("PollReservation", self._pb2.PollReservationRequest(token=token))
        return reply.reservation.allocations.get("main") or None

    def _cancel(self, token: str) -> None:
        if token in self.reservations:
            self.reservations.remove(token)
            self._call("CancelReservation", self._pb2.CancelReservationRequest(token=token))

    def ssh_address(self, name: str, resource: str = "NetworkService") -> dict:
        """``{address, username, port}`` of place ``name``'s ``resource`` (acquired by us)."""
        place = self.place(name)
        for path in place.acquired_resources:
            exporter, group, cls, res = path
            if cls == resource:
                entry = self.session.resources[exporter][group][res]
                return {"address": entry.args["address"], "username": entry.args.get("username"),
                        "port": int(entry.args.get("port") or 22)}
        raise TargetError(f"labgrid place {name} has no {resource} resource (it matches "
                          f"{', '.join('/'.join(p) for p in place.acquired_resources) or 'nothing'});"
                          f" export the board's SSH address as a {resource} and add a match for it")

    def close(self) -> None:
        """Release what this session acquired, cancel its reservations, end the session."""
        errors = []
        for step, items in ((self.release, list(self.acquired)), (self._cancel, list(self.reservations))):
            for item in items:
                try:
                    step(item)
                except DeviceError as err:
                    errors.append(err.one_line())
        if not self._closed:
            self._closed = True
            _close_session(self.address)
        if errors:
            log.warning("labgrid cleanup at %s: %s", self.address, "; ".join(errors))


# ------------------------------------------------------------------------ targets

def board_group(target) -> list:
    """``[sorted tags]`` of a target that is a labgrid group (a ``[labgrid]`` table naming tags, not
    one place), else ``[]``: a group's device records name the boards that served them."""
    spec = getattr(target, "labgrid", None)
    return [sorted(spec.tags.items())] if spec is not None and spec.tags else []


def target_for(selector: str):
    """The ``Target`` of ``labgrid:SELECTOR``: the spec named by the places' ``target`` tag,
    reached through the labgrid transport."""
    spec = parse_selector(selector)
    spec = dataclasses.replace(spec, coordinator=coordinator_address(spec))
    lab = Lab(spec.coordinator)
    try:
        names = [spec.place] if spec.place else lab.matching(spec.tags)
        if spec.place:
            lab.place(spec.place)
        if not names:
            raise TargetError(f"no labgrid place at {spec.coordinator} carries the tags of "
                              f"labgrid:{selector}")
        specs = {n: lab.places()[n].tags.get(TARGET_TAG) for n in names}
    finally:
        lab.close()
    return lab_target(spec, _one_spec(specs, selector))


def _one_spec(specs: dict, selector: str) -> str:
    untagged = [n for n, s in specs.items() if not s]
    if untagged:
        raise TargetError(f"labgrid place {untagged[0]} has no '{TARGET_TAG}' tag naming its board's "
                          f"edgebuild target spec; set it (labgrid-client -p {untagged[0]} "
                          f"set-tags {TARGET_TAG}=rpi4)")
    kinds = sorted(set(specs.values()))
    if len(kinds) > 1:
        raise TargetError(f"the places of labgrid:{selector} are different boards ({', '.join(kinds)}); "
                          f"add {TARGET_TAG}=... to the tags to pick one kind")
    return kinds[0]


def lab_target(spec, spec_name: str):
    """Target spec ``spec_name`` reached through the labgrid places of ``spec``."""
    from edgebuild.targets.spec import load_target
    base = load_target(spec_name)
    if base.connection.transport not in ("ssh", "labgrid"):
        raise TargetError(f"target {spec_name} is reached by {base.connection.transport!r}; a lab "
                          f"board's spec must use SSH")
    connection = dataclasses.replace(base.connection, transport="labgrid",
                                     env_prefix=base.connection.env_prefix or ENV_PREFIX)
    return dataclasses.replace(base, connection=connection, labgrid=spec).validate()


def _ssh_transport(target, found: dict):
    from edgebuild.targets.spec import resolve_connection
    from edgebuild.targets.ssh import SSHTransport
    c = resolve_connection(target)
    return SSHTransport(found["address"], found["username"] or c.user, found["port"],
                        key=target.path_of(c.key) if c.key else None,
                        known_hosts=target.path_of(c.known_hosts),
                        trust_on_first_use=c.trust_on_first_use, agent_python=c.agent_python,
                        root=c.root, connect_timeout_s=c.connect_timeout_s, retries=c.retries)


class LabgridTransport(Transport):
    """SSH to the board of a labgrid place, acquired on first use and released on ``close``."""

    def __init__(self, target, wait_s: float = 0.0):
        self.target, self.wait_s = target, wait_s
        self.place: str | None = None
        self._lab: Lab | None = None
        self._ssh = None
        self._progress = None

    @property
    def progress(self):
        return self._progress

    @progress.setter
    def progress(self, value) -> None:
        self._progress = value
        if self._ssh is not None:
            self._ssh.progress = value

    @property
    def root(self):
        return self._board().root

    def _board(self):
        """The SSH transport of the acquired board (acquiring it first)."""
        if self._ssh is None:
            spec = self.target.labgrid
            self._lab = Lab(coordinator_address(spec))
            try:
                self.place = acquire_places(self._lab, spec, 1, self.wait_s)[0]
                found = self._lab.ssh_address(self.place, spec.resource)
                self._ssh = _ssh_transport(self.target, found)
            except BaseException:
                self._release()
                raise
            self._ssh.progress = self._progress
            log.info("acquired labgrid place %s (%s:%s)", self.place, found["address"], found["port"])
        return self._ssh

    def open(self):
        return self._board().open()

    def upload(self, local_path, remote_name: str) -> str:
        return self._board().upload(local_path, remote_name)

    def run(self, argv, timeout_s: float = 600.0):
        return self._board().run(argv, timeout_s)

    def device_root(self) -> str:
        return self._board().device_root()

    def stderr_tail(self, lines: int = 20) -> list[str]:
        return self._ssh.stderr_tail(lines) if self._ssh is not None else []

    def exit_status(self):
        return self._ssh.exit_status() if self._ssh is not None else None

    def close(self) -> None:
        """Close the SSH connections, then release the place. Safe to call twice."""
        try:
            if self._ssh is not None:
                self._ssh.close()
        finally:
            self._release()

    def _release(self) -> None:
        if self._lab is not None:
            lab, self._lab = self._lab, None
            lab.close()


def acquire_places(lab: Lab, spec, count: int | None, wait_s: float) -> list[str]:
    """Acquire ``spec``'s place, or up to ``count`` (None: all) places of its group through
    reservations; ``BusyError`` naming the holders when none can be had."""
    if spec.place:
        lab.acquire(spec.place)
        return [spec.place]
    names = lab.matching(spec.tags)
    if not names:
        raise TargetError(f"no labgrid place at {lab.address} carries the tags of {describe(spec)}")
    allocated = lab.reserve(spec.tags, min(count or len(names), len(names)), wait_s)
    if not allocated:
        held = ", ".join(f"{n} by {lab.places()[n].acquired or 'a reservation'}" for n in names)
        raise BusyError(f"every labgrid place tagged {describe(spec)[len('places tagged '):]} is "
                        f"already acquired ({held}); retry when one is released")
    for name in allocated:
        lab.acquire(name)
    return allocated


def each_place(target) -> list:
    """One target per place of ``target``'s labgrid group (the target itself for one place),
    e.g. to set every board of a group up."""
    spec = target.labgrid
    if spec.place:
        return [target]
    lab = Lab(coordinator_address(spec))
    try:
        names = lab.matching(spec.tags)
    finally:
        lab.close()
    return [dataclasses.replace(target, labgrid=dataclasses.replace(spec, place=n, tags=None))
            for n in names]


def from_target(target) -> LabgridTransport:
    """The transport of a target with a ``[labgrid]`` table."""
    return LabgridTransport(target)


def connect_group(target, *, count: int | None = None, wait_s: float = 0.0):
    """Acquire the places of ``target``'s labgrid group (or its one place), connect to every
    board's agent and return a ``pool.BoardPool``; closing it releases the places."""
    from edgebuild.targets.client import connect
    from edgebuild.targets.pool import BoardPool
    lab = Lab(coordinator_address(target.labgrid))
    clients, transports = {}, {}
    try:
        for place in acquire_places(lab, target.labgrid, count, wait_s):
            transports[place] = _ssh_transport(target, lab.ssh_address(place, target.labgrid.resource))
            clients[place] = connect(target, transports[place])
    except BaseException:
        for client in clients.values():
            client.close()
        lab.close()
        raise
    return BoardPool(clients, transports, on_close=lab.close)
