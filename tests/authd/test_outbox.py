"""The connection writer: queued replies leave together, byte for byte and in queue order."""

from __future__ import annotations

import trio
import trio.testing

from authd.outbox import Outbox


class Recorder(trio.abc.SendStream):
    """A send stream that keeps every send_all() call."""

    def __init__(self) -> None:
        self.sends: list[bytes] = []
        self.broken = False

    async def send_all(self, data: bytes | bytearray | memoryview) -> None:
        await trio.lowlevel.checkpoint()
        if self.broken:
            raise trio.BrokenResourceError
        self.sends.append(bytes(data))

    async def wait_send_all_might_not_block(self) -> None:
        await trio.lowlevel.checkpoint()

    async def aclose(self) -> None:
        await trio.lowlevel.checkpoint()


class Queue:
    """Stands in for a protocol object's output queue."""

    def __init__(self) -> None:
        self.out = bytearray()

    def take(self) -> bytes:
        data = bytes(self.out)
        self.out.clear()
        return data


async def test_replies_of_one_round_go_out_in_one_send() -> None:
    stream, queue = Recorder(), Queue()
    outbox = Outbox(stream, queue.take)

    async def reply(line: bytes) -> None:
        queue.out += line
        outbox.wake()

    async with trio.open_nursery() as nursery:
        nursery.start_soon(outbox.run)
        await trio.testing.wait_all_tasks_blocked()
        for number in range(1, 6):
            nursery.start_soon(reply, b"OK\t%d\tuser=u\n" % number)
        await trio.testing.wait_all_tasks_blocked()
        await outbox.drain()
    assert len(stream.sends) == 1
    assert sorted(stream.sends[0].splitlines(keepends=True)) == [b"OK\t%d\tuser=u\n" % n for n in range(1, 6)]


async def test_queue_order_is_kept_between_protocol_output_and_extra_lines() -> None:
    stream, queue = Recorder(), Queue()
    outbox = Outbox(stream, queue.take)
    queue.out += b"CONT\t1\t\n"
    outbox.send(b"FAIL\t2\n")  # a delayed FAIL queued after the CONT
    queue.out += b"OK\t3\tuser=u\n"
    outbox.send(b"FAIL\t4\n")
    queue.out += b"CONT\t5\t\n"
    async with trio.open_nursery() as nursery:
        nursery.start_soon(outbox.run)
        await outbox.drain()
    assert stream.sends == [b"CONT\t1\t\nFAIL\t2\nOK\t3\tuser=u\nFAIL\t4\nCONT\t5\t\n"]


async def test_what_is_queued_while_sending_follows_in_the_next_send() -> None:
    stream, queue = Recorder(), Queue()
    outbox = Outbox(stream, queue.take)
    async with trio.open_nursery() as nursery:
        nursery.start_soon(outbox.run)
        queue.out += b"A\n"
        outbox.wake()
        await trio.testing.wait_all_tasks_blocked()
        queue.out += b"B\n"
        outbox.send(b"C\n")
        await outbox.drain()
    assert stream.sends == [b"A\n", b"B\nC\n"]


async def test_drain_sends_everything_then_stops() -> None:
    stream, queue = Recorder(), Queue()
    outbox = Outbox(stream, queue.take)
    async with trio.open_nursery() as nursery:
        nursery.start_soon(outbox.run)
        await trio.testing.wait_all_tasks_blocked()
        queue.out += b"last\n"
        await outbox.drain()
        await outbox.drain()  # twice is harmless
    assert stream.sends == [b"last\n"]


async def test_a_broken_stream_stops_the_writer_quietly() -> None:
    stream, queue = Recorder(), Queue()
    stream.broken = True
    outbox = Outbox(stream, queue.take)
    async with trio.open_nursery() as nursery:
        nursery.start_soon(outbox.run)
        queue.out += b"lost\n"
        outbox.wake()
        await outbox.drain()
    assert outbox.broken
    outbox.send(b"ignored\n")
    assert stream.sends == []


class Stuck(Recorder):
    """A peer that reads nothing until `release` is set."""

    def __init__(self) -> None:
        super().__init__()
        self.release = trio.Event()

    async def send_all(self, data: bytes | bytearray | memoryview) -> None:
        await self.release.wait()
        await super().send_all(data)


async def test_a_peer_that_does_not_read_is_not_read_from() -> None:
    stream, queue = Stuck(), Queue()
    outbox = Outbox(stream, queue.take)
    throttled = []
    async with trio.open_nursery() as nursery:
        nursery.start_soon(outbox.run)
        queue.out += b"x" * 30_000
        outbox.wake()
        await trio.testing.wait_all_tasks_blocked()
        await outbox.throttle()  # 30 000 bytes unsent: still below Dovecot's 50 KiB
        queue.out += b"y" * 30_000  # 60 000 now

        async def reader() -> None:
            await outbox.throttle()
            throttled.append("read again")

        nursery.start_soon(reader)
        await trio.testing.wait_all_tasks_blocked()
        assert throttled == []
        stream.release.set()  # the peer reads
        await trio.testing.wait_all_tasks_blocked()
        assert throttled == ["read again"]
        await outbox.drain()
    assert b"".join(stream.sends) == b"x" * 30_000 + b"y" * 30_000


async def test_a_broken_peer_releases_the_reader() -> None:
    stream, queue = Stuck(), Queue()
    outbox = Outbox(stream, queue.take)
    async with trio.open_nursery() as nursery:
        nursery.start_soon(outbox.run)
        queue.out += b"x" * 60_000
        outbox.wake()
        nursery.start_soon(outbox.throttle)
        await trio.testing.wait_all_tasks_blocked()
        stream.broken = True
        stream.release.set()
    assert outbox.broken
