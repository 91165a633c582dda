"""First come, first served: trio's run queue in the order tasks became ready.

trio runs each batch of ready tasks either in the order they became ready or in the
reverse order, at random (to shake out code that relies on an order; its own comments
call it "the worst of both worlds" and leave fair queueing for later). Under load a
batch holds hundreds of requests and takes tens of milliseconds, and every step of a
request (read, Lua, HTTP send, HTTP answer, reply) lands in a new batch, so a request
might go last at each step while a later one goes first: at 1 000 requests in flight,
requests finishing at the same moment took anywhere from 100 to 340 ms. In arrival
order each step is a FIFO queue, and latency stays close to its median.

trio has no public switch for this; the order comes from one module-level
random.Random whose random() decides the reversal. `serve_in_arrival_order()` swaps in
one that always picks arrival order (test_scheduling.py fails if trio changes this).
"""

from __future__ import annotations

import random

import trio


class _ArrivalOrder(random.Random):
    """random() < 0.5 makes trio reverse the batch, which it then pops from the end: oldest first."""

    def random(self) -> float:
        return 0.0


def serve_in_arrival_order() -> bool:
    """Make trio run ready tasks oldest first; False if this trio has no such hook."""
    core = getattr(trio, "_core", None)
    run = getattr(core, "_run", None)
    if not isinstance(getattr(run, "_r", None), random.Random):
        return False
    run._r = _ArrivalOrder()  # type: ignore[union-attr]
    return True
