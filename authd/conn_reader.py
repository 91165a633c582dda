"""A connection's reader: a sans-IO protocol's events, with [limits] requests_per_connection.

At the cap the reader does not read (the socket fills like a TCP window) until a request step ends.
"""

from __future__ import annotations

import select
from collections.abc import Callable
from typing import Generic, Protocol, TypeVar

import trio

from authd.outbox import Outbox

RECEIVE_SIZE = 65536
#: While a connection is at its [limits] requests_per_connection, authd does not read it, so it
#: would not see the peer hang up: it looks this often (poll's POLLRDHUP, pending data or not).
HANGUP_CHECK_SECS = 0.5
_HANGUP = select.POLLRDHUP | select.POLLHUP | select.POLLERR

E = TypeVar("E")


def hung_up(stream: trio.abc.Stream) -> bool:
    """Has the peer of a connection that is not being read hung up (or reset it)?"""
    if not isinstance(stream, trio.SocketStream):
        return False
    poller = select.poll()
    poller.register(stream.socket.fileno(), _HANGUP)
    return bool(poller.poll(0))


class _Protocol(Protocol[E]):
    def feed(self, data: bytes | bytearray) -> None: ...

    def next_events(self) -> list[E] | None: ...


class ConnectionReader(Generic[E]):
    """Reads `stream` into `proto` and hands out its events batch by batch.

    `steps` counts the connection's request steps running as tasks (`step_started`,
    `step_ended`); while it is at `cap()` no further event is taken. `stopped()` says the
    connection ended on the caller's side (replies would go nowhere).
    """

    def __init__(
        self,
        stream: trio.abc.Stream,
        outbox: Outbox,
        proto: _Protocol[E],
        cap: Callable[[], int],
        stopped: Callable[[], bool],
    ) -> None:
        self._stream = stream
        self._outbox = outbox
        self._proto = proto
        self._cap = cap
        self._stopped = stopped
        self._fed = False
        self.steps = 0
        self._room = trio.lowlevel.ParkingLot()

    def step_started(self) -> None:
        self.steps += 1

    def step_ended(self) -> None:
        self.steps -= 1
        if self._room:
            self._room.unpark_all()

    async def next_events(self) -> list[E] | None:
        """The next batch of events; None at EOF, or once the peer hung up or stopped
        reading for good. Raises the protocol's PeerError."""
        while True:
            if self._fed:
                if self.steps >= self._cap() and not await self._wait_for_room():
                    return None  # the peer hung up while it had to wait
                events = self._proto.next_events()
                if events is not None:
                    return events
                self._fed = False
                self._outbox.wake()
            try:
                await self._outbox.throttle()  # a peer that does not read is not read from
                if self._outbox.broken:
                    return None  # it stopped reading for good
                data = await self._stream.receive_some(RECEIVE_SIZE)
            except (trio.BrokenResourceError, trio.ClosedResourceError):
                return None
            if not data:
                return None
            self._proto.feed(data)
            self._fed = True

    async def _wait_for_room(self) -> bool:
        """At the cap the next line waits until a step ends. False if the peer hung up meanwhile."""
        self._outbox.wake()  # what was answered at once goes out meanwhile
        while self.steps >= self._cap():
            with trio.move_on_after(HANGUP_CHECK_SECS):
                await self._room.park()
            if self._stopped() or hung_up(self._stream):
                return False
        return True
