"""Combining: one statement at a time per counter row, and what arrives meanwhile goes in the next one.

Used by the PostgreSQL back-end for reservations and settlements (proxy.gateway.ledger.postgres).
"""
import asyncio
import logging

log = logging.getLogger("qwenhub.gateway")


class Combiner:
    """One statement at a time per key (a counter row); what arrives meanwhile goes together in the next one.

    Statements on one counter row queue on its row lock in PostgreSQL anyway; combining
    them turns a burst of N into a few statements and leaves the pool's other
    connections free. A lone call never waits: `single(key, item)` runs at once. Calls
    that find their key busy wait, and are then handed together to `many(key, items)`,
    which returns one result per item. An exception fails every call of its statement.
    A result whose caller was cancelled while it waited goes to `orphan(key, item, result)`
    (a reservation nobody will settle must be given back).
    """

    def __init__(self, single, many, orphan=None) -> None:
        self.single, self.many, self.orphan = single, many, orphan
        self.waiting: dict = {}  # key -> [(item, future)] of the calls waiting for the key's statement
        self._tasks: set[asyncio.Task] = set()  # the loop keeps only weak references to tasks

    async def submit(self, key, item):
        queue = self.waiting.get(key)
        if queue is not None:
            future = asyncio.get_running_loop().create_future()
            queue.append((item, future))
            return await future
        self.waiting[key] = []
        try:
            return await self.single(key, item)
        finally:
            if self.waiting[key]:
                task = asyncio.ensure_future(self._drain(key))
                self._tasks.add(task)
                task.add_done_callback(self._tasks.discard)
            else:
                del self.waiting[key]

    async def _drain(self, key) -> None:
        queue = self.waiting[key]
        try:
            while queue:
                batch = queue[:]
                queue.clear()
                try:
                    results = await self.many(key, [item for item, _ in batch])
                except BaseException as exc:
                    cancelled = isinstance(exc, asyncio.CancelledError)
                    for _, future in batch:
                        if not future.done():
                            future.cancel() if cancelled else future.set_exception(exc)
                    if cancelled:
                        raise
                else:
                    for (item, future), result in zip(batch, results, strict=True):
                        if not future.done():
                            future.set_result(result)
                        elif self.orphan is not None:
                            try:
                                await self.orphan(key, item, result)
                            except Exception:  # noqa: BLE001 - the others of the batch are answered already
                                log.exception("could not give back an orphaned result")
        finally:
            del self.waiting[key]
            for _, future in queue:
                future.cancel()
