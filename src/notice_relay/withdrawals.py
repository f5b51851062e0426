"""Whether a declaration was withdrawn, as the deliver stage needs to know it.

An opt-out not yet delivered when its declaration is withdrawn is superseded: the
deliver stage asks, for every opt-out task it is about to send, whether the store has
recorded that declaration as withdrawn. It asks by primary key (one row read, however
many declarations the store holds) and keeps the answer for ``ttl`` seconds in a small
LRU, so that the tasks of one declaration (one per developer, which arrive together)
cost one read between them.

Reading every withdrawn key once a second instead, as a set, costs a scan of the whole
``declarations`` table per poll (its ``status`` has no index, and an index would only
move the problem to a set that grows with every withdrawal ever made): CPU and I/O per
second that grow with the store, for ever.

While the store cannot be read the answer is "not withdrawn": the opt-out goes out, and
the withdrawal, which waits for it, reaches the developer after it (the same end state
as a withdrawal made just after the delivery). That is logged once per outage. A read
gets ``timeout`` seconds, and after a failed one the store is not asked again for
``retry_after`` seconds, so a database that hangs instead of refusing never holds up
the deliveries.
"""

from __future__ import annotations

import asyncio
import time
from collections import OrderedDict
from collections.abc import Awaitable, Callable

import structlog

from notice_relay.audit import worker_queries
from notice_relay.audit.store import DB_ERRORS, AuditStore, db_reason
from notice_relay.errors import StoreError

log = structlog.get_logger("notice_relay.withdrawals")

#: What a read raises while the store cannot be opened or reached.
_UNREADABLE: tuple[type[Exception], ...] = (StoreError, *DB_ERRORS, TimeoutError)


class Withdrawals:
    """Point reads of the store's declaration status, with a short-lived cache."""

    def __init__(self, store: Callable[[], Awaitable[AuditStore]], *, ttl: float = 1.0,
                 size: int = 4096, timeout: float = 2.0, retry_after: float = 5.0,
                 clock: Callable[[], float] = time.monotonic) -> None:
        self._store = store
        self.ttl = ttl
        self.size = size
        self.timeout = timeout
        self.retry_after = retry_after
        self._clock = clock
        self._answers: OrderedDict[str, tuple[float, bool]] = OrderedDict()
        #: Until when the store is left alone after a failed read (None: it is up).
        self._down_until: float | None = None
        #: Store reads made (for tests and figures).
        self.reads = 0

    async def withdrawn(self, declaration_key: str) -> bool:
        """True when the store records ``declaration_key`` as withdrawn."""
        now = self._clock()
        cached = self._answers.get(declaration_key)
        if cached is not None and now - cached[0] < self.ttl:
            self._answers.move_to_end(declaration_key)
            return cached[1]
        if self._down_until is not None and now < self._down_until:
            return False
        try:
            self.reads += 1
            async with asyncio.timeout(self.timeout):
                answer = await worker_queries.is_withdrawn(await self._store(), declaration_key)
        except _UNREADABLE as exc:
            if self._down_until is None:
                reason = (f"no answer within {self.timeout:g} s" if isinstance(exc, TimeoutError)
                          else db_reason(exc))
                log.warning("withdrawals.store_unavailable", error=reason[:300],
                            consequence="opt-outs are sent; their withdrawals follow them")
            self._down_until = self._clock() + self.retry_after
            return False
        if self._down_until is not None:
            self._down_until = None
            log.info("withdrawals.store_available")
        self._answers[declaration_key] = (now, answer)
        self._answers.move_to_end(declaration_key)
        while len(self._answers) > self.size:
            self._answers.popitem(last=False)
        return answer
