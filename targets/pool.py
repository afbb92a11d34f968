"""Several boards of one target as one: device benchmark requests sharded across them.

    pool = BoardPool({"pi4-a": client_a, "pi4-b": client_b}, transports)
    pool.deploy("rtn", version, files)          # every board gets the stage
    pool.measure("rtn", version, threads=4)     # on the primary board, named under "board"
    pool.load("rtn", version, threads=4)
    scores = pool.score(requests)                # the same list ``AgentClient.score`` returns
    pool.last.items, pool.scored, pool.lost      # requests per board (last call, all calls), drops

``score_sharded(requests, clients)`` cuts the requests into exactly the batches one board would be
sent (``client.context_batches``), so every batch reaches the agent with the same contents whichever
board scores it, and the merged scores equal one board's. Boards pull batches from one queue (a
faster board takes more); a board whose connection is lost (``ConnectionLost``: its agent died, its
link dropped or stopped answering) is dropped, its batch goes back into the queue for the others,
and it is named in ``ShardedScores.lost``. When every board is lost it raises ``BoardsLost``. An
error the agent reports (a refused request) is no reason to drop a board, since every board would
refuse the same: it stops the work and is raised as it is, as with one board.
"""
from __future__ import annotations

import logging
import queue
import threading
from dataclasses import dataclass, field

from edgebuild.core.errors import DeviceError
from edgebuild.targets.client import SCORE_BATCH, ConnectionLost, context_batches, deploy_stage

log = logging.getLogger(__name__)


class BoardsLost(ConnectionLost):
    """Every board of a pool was lost; ``lost`` says why each one was (board -> one line)."""

    def __init__(self, message: str, lost: dict):
        super().__init__(message)
        self.lost = dict(lost)


@dataclass
class ShardedScores:
    """Merged scores (in request order), requests scored per board, boards lost and why."""

    results: list
    items: dict = field(default_factory=dict)
    lost: dict = field(default_factory=dict)


class _Shards:
    """The batches still to score, the results so far, and who scored what."""

    def __init__(self, pairs: list, boards, progress):
        self.pairs, self.progress = pairs, progress
        self.todo: queue.Queue = queue.Queue()
        for batch in context_batches(pairs, SCORE_BATCH):
            self.todo.put(batch)
        self.results: list = [None] * len(pairs)
        self.items = {board: 0 for board in boards}
        self.lost: dict = {}
        self.failed: BaseException | None = None     # an error that stops every board
        self.lock = threading.Lock()
        self.done = 0

    def finished(self) -> bool:
        return self.done == len(self.pairs)

    def stopped(self) -> bool:
        """Nothing left for a board to do: every request scored, or an error stopped the work."""
        return self.finished() or self.failed is not None

    def record(self, board: str, batch: list, scores: list) -> None:
        with self.lock:
            for index, score in zip(batch, scores):
                self.results[index] = score
            self.items[board] += len(batch)
            self.done += len(batch)
            if self.progress is not None:
                self.progress(self.done, len(self.pairs))


def _work(board: str, client, shards: _Shards, kwargs: dict) -> None:
    """Score batches from the queue on ``board`` until every request is scored, the board is
    lost (its batch goes back to the queue) or an error stops the work (kept in ``failed``)."""
    while not shards.stopped():
        try:
            batch = shards.todo.get(timeout=0.2)
        except queue.Empty:
            continue            # the rest is in flight: a board that is lost puts its batch back
        try:
            shards.record(board, batch, client.score([shards.pairs[i] for i in batch], **kwargs))
        except ConnectionLost as err:
            shards.todo.put(batch)
            with shards.lock:
                shards.lost[board] = err.one_line()
            log.warning("board %s lost; its requests go to the other boards: %s", board,
                        err.one_line())
            return
        except Exception as err:      # noqa: BLE001 - raised again by score_sharded, in its thread
            shards.failed = err
            return


def score_sharded(requests, clients: dict, *, timeout_s: float | None = None,
                  max_batch_tokens: int | None = None, progress=None) -> ShardedScores:
    """Score ``[(context_ids, continuation_ids), ...]`` on ``clients`` (``{board: AgentClient}``
    with the same stage loaded), in parallel; return the merged ``ShardedScores``.

    Raises ``BoardsLost`` naming every board when all of them are lost, and the first error a
    board's agent reported (a ``DeviceError`` that is not a lost connection) as it is.
    """
    if not clients:
        raise BoardsLost("no boards to score on: every board of the pool was lost", {})
    pairs = [(list(ctx), list(cont)) for ctx, cont in requests]
    shards = _Shards(pairs, list(clients), progress)
    kwargs = {"timeout_s": timeout_s, "max_batch_tokens": max_batch_tokens}
    threads = [threading.Thread(target=_work, args=(board, client, shards, kwargs),
                                name=f"score-{board}", daemon=True)
               for board, client in clients.items()]
    for thread in threads:
        thread.start()
    try:
        for thread in threads:
            thread.join()
    except BaseException as err:      # Ctrl-C: the boards stop after the batch they are scoring
        shards.failed = err
        raise
    if shards.failed is not None:
        raise shards.failed
    if not shards.finished():
        raise BoardsLost(f"every board was lost before the requests were scored ({_why(shards.lost)})",
                         shards.lost)
    return ShardedScores(shards.results, shards.items, shards.lost)


class BoardPool:
    """Connected agents of several boards of one target, used like one ``AgentClient``.

    ``clients`` maps a board's name to its ``AgentClient``; ``transports`` to the transport that
    client runs on (for uploads). The first board still connected is the primary: ``info``,
    ``measure``, ``time`` and ``call`` run there (boards of a pool are one class); ``stage``,
    ``deploy``, ``load`` and ``activate`` run on every board; ``score`` is sharded across them. A
    board whose connection is lost is dropped (``lost``: board -> why) and the work goes on with
    the others; ``BoardsLost`` once none is left. ``on_close`` runs after every client is closed
    (e.g. releasing lab places).
    """

    def __init__(self, clients: dict, transports: dict, on_close=None):
        self.clients, self.transports, self._on_close = dict(clients), dict(transports), on_close
        self.lost: dict = {}
        self.last: ShardedScores | None = None
        self.scored: dict = {board: 0 for board in self.clients}    # requests, over every score call

    def __enter__(self) -> "BoardPool":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    @property
    def boards(self) -> list[str]:
        """Boards still in the pool."""
        return [b for b in self.clients if b not in self.lost]

    @property
    def primary(self) -> str:
        if not self.boards:
            raise BoardsLost(f"every board of the pool was lost ({_why(self.lost)})", self.lost)
        return self.boards[0]

    def _drop(self, board: str, what: str, err: ConnectionLost) -> None:
        self.lost[board] = err.one_line()
        log.warning("board %s lost during %s; the others go on: %s", board, what, err.one_line())

    def _each(self, what: str, call) -> dict:
        """``call(board, client)`` on every board still in the pool; a board that is lost is dropped."""
        out = {}
        for board in self.boards:
            try:
                out[board] = call(board, self.clients[board])
            except ConnectionLost as err:
                self._drop(board, what, err)
        if not out:
            raise BoardsLost(f"every board was lost during {what} ({_why(self.lost)})", self.lost)
        return out

    def _on_primary(self, what: str, call) -> dict:
        """``call(board, client)`` on the primary board; when it is lost, on the next one."""
        while True:
            board = self.primary
            try:
                return call(board, self.clients[board])
            except ConnectionLost as err:
                self._drop(board, what, err)

    def info(self) -> dict:
        """The primary board's facts, with every board's under ``boards``."""
        infos = self._each("info", lambda b, c: c.info())
        return {**infos[self.primary], "boards": infos}

    def supports(self, cmd: str) -> bool:
        """Whether every board's agent announced ``cmd``."""
        return all(self.clients[b].supports(cmd) for b in self.boards)

    def call(self, cmd: str, args: dict | None = None, timeout_s: float | None = None) -> dict:
        """One request to the primary board's agent (e.g. ``ops``: the boards are one class)."""
        return self._on_primary(cmd, lambda b, c: c.call(cmd, args, timeout_s))

    def deploy(self, name: str, version: str, files: dict, budget_bytes: int | None = None,
               progress=None) -> dict:
        """Upload and install stage ``name/version`` on every board (``client.deploy_stage``, within
        ``budget_bytes``); ``progress(done, total)`` follows each board's upload in turn."""
        return self._each("deploy", lambda b, c: deploy_stage(c, self.transports[b], name, version, files,
                                                              budget_bytes, progress))

    def stage(self, name: str, version: str, files: list) -> dict:
        return self._each("stage", lambda b, c: c.stage(name, version, files))[self.primary]

    def load(self, *args, **kwargs) -> dict:
        return self._each("load", lambda b, c: c.load(*args, **kwargs))[self.primary]

    def activate(self, name: str, version: str) -> dict:
        return self._each("activate", lambda b, c: c.activate(name, version))[self.primary]

    def measure(self, name: str, version: str, **kwargs) -> dict:
        """``AgentClient.measure`` on the primary board, which it names under ``board``."""
        return self._on_primary("measure", lambda b, c: dict(c.measure(name, version, **kwargs), board=b))

    def time(self, **kwargs) -> dict:
        """Latency samples from the primary board, which it names under ``board``."""
        return self._on_primary("time", lambda b, c: dict(c.time(**kwargs), board=b))

    def score(self, requests, timeout_s: float | None = None, max_batch_tokens: int | None = None,
              progress=None) -> list:
        """``AgentClient.score`` over every board (``score_sharded``); lost boards stay out."""
        live = {b: self.clients[b] for b in self.boards}
        try:
            self.last = score_sharded(requests, live, timeout_s=timeout_s,
                                      max_batch_tokens=max_batch_tokens, progress=progress)
        except BoardsLost as err:
            self.lost.update(err.lost)
            raise
        self.lost.update(self.last.lost)
        for board, count in self.last.items.items():
            self.scored[board] += count
        return self.last.results

    def close(self) -> None:
        """Close every client, then run ``on_close``."""
        try:
            for client in self.clients.values():
                try:
                    client.close()
                except DeviceError as err:
                    log.debug("closing: %s", err)
        finally:
            if self._on_close is not None:
                on_close, self._on_close = self._on_close, None
                on_close()


def _why(lost: dict) -> str:
    return "; ".join(f"{board}: {why}" for board, why in lost.items()) or "no boards"
