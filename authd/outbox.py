"""A connection's writer: replies queued by any task leave together, in queue order.

Request tasks finish at different moments of one trio scheduling round; sending each
reply on its own costs a send() per request. Instead they queue their bytes and wake
the writer task, which runs once the tasks that were ready alongside have had their
turn and sends everything queued so far with one send_all. Nothing waits for a
timer: a reply goes out in the next scheduling round at the latest.
"""

from __future__ import annotations

from collections.abc import Callable

import trio

#: Dovecot's OUTBUF_THROTTLE_SIZE: while a peer has this many bytes of replies unsent
#: (it does not read them), its connection is not read from, so it cannot make authd
#: buffer without bounds.
THROTTLE_SIZE = 50 * 1024


class Outbox:
    """Queues bytes for one stream; `run()` is the only task that writes to it.

    `pending` returns (and clears) the protocol object's own output queue, which is
    always older than anything queued here after it.
    """

    def __init__(self, stream: trio.abc.SendStream, pending: Callable[[], bytes]) -> None:
        self._stream = stream
        self._pending = pending
        self._queued = bytearray()
        self._lot = trio.lowlevel.ParkingLot()
        #: Readers waiting in throttle(), and the bytes the writer is sending right now.
        self._space = trio.lowlevel.ParkingLot()
        self._unsent = 0
        self._closing = False
        self._done = trio.Event()
        #: The peer stopped reading (or the stream was closed): nothing is sent any more.
        self.broken = False

    def wake(self) -> None:
        """Have the writer send what the protocol queued (cheap when it is already awake)."""
        if self._lot:
            self._lot.unpark_all()

    def send(self, data: bytes) -> None:
        """Queue bytes produced outside the protocol's queue (delayed FAIL lines)."""
        if self.broken:
            return
        self._queued += self._pending()
        self._queued += data
        self.wake()

    async def throttle(self) -> None:
        """Wait while THROTTLE_SIZE bytes or more wait for the peer to read them."""
        while not self.broken and not self._closing:
            self._queued += self._pending()
            if self._unsent + len(self._queued) < THROTTLE_SIZE:
                return
            await self._space.park()

    def _take(self) -> bytes:
        if not self._queued:
            return self._pending()
        self._queued += self._pending()
        data = bytes(self._queued)
        self._queued.clear()
        return data

    async def run(self) -> None:
        """The writer task: send whatever is queued, sleep until woken, until `drain()`."""
        try:
            while True:
                data = self._take()
                if data:
                    self._unsent = len(data)
                    try:
                        await self._stream.send_all(data)
                    except (trio.BrokenResourceError, trio.ClosedResourceError):
                        self.broken = True
                        return
                    self._unsent = 0
                    if self._space:
                        self._space.unpark_all()
                elif self._closing:
                    return
                else:
                    await self._lot.park()
        finally:
            self._space.unpark_all()
            self._done.set()

    async def drain(self) -> None:
        """Send everything queued so far, then stop the writer (the connection is ending)."""
        self._closing = True
        self.wake()
        await self._done.wait()
