"""A build's connection to every board of a labgrid group: one ``BoardPool``, used by the device
step through the interface of ``session.DeviceSession``.

First contact acquires every place of the group (``labgrid.connect_group``) and greets each
board's agent; ``on_unreachable`` decides, as for one device, whether a group that cannot be had
stops the build or lets every device step report that it did not run. A stage is deployed and
loaded on every board, measured on the primary one and its device benchmark requests are sharded
across all of them (``pool.score_sharded``). A board whose connection is lost is dropped from the
pool at once, its work done by the others, and named in the step's record (``boards``); boards are
not reconnected one by one. When every board is lost the session is *lost*, exactly as a single
device's after its retries: the step records ``status = "lost"`` with the phase, the places are
released, each later device step makes one quick attempt to acquire the group again, and the
build exits 13 when the shipped stage is not validated. Closing the session releases the places.
"""
from __future__ import annotations

import logging

from edgebuild.core.errors import EdgebuildError
from edgebuild.targets.client import ConnectionLost
from edgebuild.targets.session import DeviceSession

log = logging.getLogger(__name__)


class PoolSession(DeviceSession):
    """``DeviceSession`` over the boards of a labgrid group; ``client`` is their ``BoardPool``."""

    def __init__(self, target, policy=None):
        super().__init__(target, policy)
        self.pool = None        # the latest pool, kept after it is lost: what its boards did

    def _open(self, quick: bool = False) -> None:
        """Acquire the group's places and greet every board's agent (``labgrid.connect_group``)."""
        from edgebuild.targets.labgrid import connect_group
        self.client = self.pool = connect_group(self.target)

    def attempt(self, phase: str, fn):
        """``fn(pool)`` for one phase of a device step. A board lost on the way is dropped by the
        pool; when none is left, the session is lost and ``ConnectionLost`` raised."""
        try:
            return fn(self.client)
        except ConnectionLost as err:
            self._lose(phase, err)
            raise

    def _lose(self, phase: str, err: ConnectionLost) -> None:
        self.lost = {"after": phase, "error": err.one_line()}
        self.state = self._lost_text()
        log.warning("every board of %s is lost (%s); its remaining checks are reported as not run",
                    self.target.name, self.state)
        self._drop()

    def _drop(self) -> None:
        """Close the pool, releasing its places."""
        pool, self.client = self.client, None
        if pool is not None:
            try:
                pool.close()
            except EdgebuildError as e:
                log.debug("closing a lost pool: %s", e.one_line())

    def deploy(self, client, name: str, version: str, files: dict, budget_bytes: int | None = None,
               progress=None) -> dict:
        """Upload and install stage ``name/version`` on every board of the pool ``client``."""
        return client.deploy(name, version, files, budget_bytes=budget_bytes, progress=progress)

    def boards(self, since: dict | None = None) -> dict | None:
        """``{"places", "items", "lost"}``: the boards in the pool, the requests each has scored and
        the boards lost (board -> why). With ``since`` (an earlier answer), what happened after it:
        the boards that were in the pool then, the requests each scored since, the boards lost since."""
        pool = self.pool
        if pool is None:
            return None
        if since is None:
            return {"places": pool.boards, "items": {b: pool.scored[b] for b in pool.boards},
                    "lost": dict(pool.lost)}
        places = since["places"]
        return {"places": places, "items": {b: pool.scored[b] - since["items"][b] for b in places},
                "lost": {b: why for b, why in pool.lost.items() if b not in since["lost"]}}
