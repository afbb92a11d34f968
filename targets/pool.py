"""Several boards of one target as one: device benchmark requests sharded across them.

    pool = BoardPool({"pi4-a": client_a, "pi4-b": client_b}, transports)
    pool.deploy("rtn", version, files)          # every board gets the stage
    pool.load("rtn", version, threads=4)
    scores = pool.score(requests)                # the same list ``AgentClient.score`` returns
    pool.last.items, pool.lost                   # requests per board, boards dropped and why

``score_sharded(requests, clients)`` cuts the requests into exactly the batches one board would be
sent (``client.context_batches``), so every batch reaches the agent with the same contents whichever
board scores it, and the merged scores equal one board's. Boards pull batches from one queue (a
faster board takes more); a board that fails is dropped, its batch goes back into the queue for
the others, and it is named in ``ShardedScores.lost``. Only when every board is lost does it raise.
"""
from __future__ import annotations

import logging
import queue
import threading
from dataclasses import dataclass, field

from edgebuild.core.errors import DeviceError
from edgebuild.targets.client import SCORE_BATCH, context_batches, deploy_stage

log = logging.getLogger(__name__)


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
        self.lock = threading.Lock()
        self.done = 0

    def finished(self) -> bool:
        return self.done == len(self.pairs)

    def record(self, board: str, batch: list, scores: list) -> None:
        with self.lock:
            for index, score in zip(batch, scores):
                self.results[index] = score
            self.items[board] += len(batch)
            self.done += len(batch)
            if self.progress is not None:
                self.progress(self.done, len(self.pairs))


def _work(board: str, client, shards: _Shards, kwargs: dict) -> None:
    """Score batches from the queue on ``board`` until it is empty or the board fails."""
    while not shards.finished():
        try:
            batch = shards.todo.get(timeout=0.2)
        except queue.Empty:
            continue            # the rest is in flight: a board that fails puts its batch back
        try:
            scores = client.score([shards.pairs[i] for i in batch], **kwargs)
        except DeviceError as err:
            shards.todo.put(batch)
            with shards.lock:
                shards.lost[board] = err.one_line()
            log.warning("board %s lost; its requests go to the other boards: %s", board,
                        err.one_line())
            return
        shards.record(board, batch, scores)


def score_sharded(requests, clients: dict, *, timeout_s: float | None = None,
                  max_batch_tokens: int | None = None, progress=None) -> ShardedScores:
    """Score ``[(context_ids, continuation_ids), ...]`` on ``clients`` (``{board: AgentClient}``
    with the same stage loaded), in parallel; return the merged ``ShardedScores``.

    Raises ``DeviceError`` naming every board when all of them are lost.
    """
    if not clients:
        raise DeviceError("no boards to score on: the pool is empty")
    pairs = [(list(ctx), list(cont)) for ctx, cont in requests]
    shards = _Shards(pairs, list(clients), progress)
    kwargs = {"timeout_s": timeout_s, "max_batch_tokens": max_batch_tokens}
    threads = [threading.Thread(target=_work, args=(board, client, shards, kwargs),
                                name=f"score-{board}", daemon=True)
               for board, client in clients.items()]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    if not shards.finished():
        why = "; ".join(f"{b}: {e}" for b, e in shards.lost.items())
        raise DeviceError(f"every board was lost before the requests were scored ({why})")
    return ShardedScores(shards.results, shards.items, shards.lost)


class BoardPool:
    """Connected agents of several boards of one target, used like one ``AgentClient``.

    ``clients`` maps a board's name to its ``AgentClient``; ``transports`` to the transport that
    client runs on (for uploads). The first board still connected is the primary: ``info`` and
    ``time`` run there. ``on_close`` runs after every client is closed (e.g. releasing lab places).
    """

    def __init__(self, clients: dict, transports: dict, on_close=None):
        self.clients, self.transports, self._on_close = dict(clients), dict(transports), on_close
        self.lost: dict = {}
        self.last: ShardedScores | None = None

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
            raise DeviceError(f"every board of the pool was lost: {self.lost}")
        return self.boards[0]

    def _each(self, what: str, call) -> dict:
        """``call(board, client)`` on every board still in the pool; a failing board is dropped."""
        out = {}
        for board in self.boards:
            try:
                out[board] = call(board, self.clients[board])
            except DeviceError as err:
                self.lost[board] = err.one_line()
                log.warning("board %s lost during %s: %s", board, what, err.one_line())
        if not out:
            raise DeviceError(f"every board was lost during {what}: {self.lost}")
        return out

    def info(self) -> dict:
        """The primary board's facts, with every board's under ``boards``."""
        infos = self._each("info", lambda b, c: c.info())
        return {**infos[self.primary], "boards": infos}

    def deploy(self, name: str, version: str, files: dict) -> dict:
        """Upload and install stage ``name/version`` on every board (``client.deploy_stage``)."""
        return self._each("deploy", lambda b, c: deploy_stage(c, self.transports[b], name, version,
                                                              files))

    def stage(self, name: str, version: str, files: list) -> dict:
        return self._each("stage", lambda b, c: c.stage(name, version, files))[self.primary]

    def load(self, *args, **kwargs) -> dict:
        return self._each("load", lambda b, c: c.load(*args, **kwargs))[self.primary]

    def activate(self, name: str, version: str) -> dict:
        return self._each("activate", lambda b, c: c.activate(name, version))[self.primary]

    def time(self, **kwargs) -> dict:
        """Latency samples from the primary board (boards of a pool are one class)."""
        return dict(self.clients[self.primary].time(**kwargs), board=self.primary)

    def score(self, requests, timeout_s: float | None = None, max_batch_tokens: int | None = None,
              progress=None) -> list:
        """``AgentClient.score`` over every board (``score_sharded``); lost boards stay out."""
        live = {b: self.clients[b] for b in self.boards}
        self.last = score_sharded(requests, live, timeout_s=timeout_s,
                                  max_batch_tokens=max_batch_tokens, progress=progress)
        self.lost.update(self.last.lost)
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
