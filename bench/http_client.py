"""`python -m bench.http_client`: what `dovecot.http` costs per request, without the daemon.

The full benchmark shows the HTTP client only as a share of a profile. This one runs the
HTTP passdb scenario's PROPFIND (bench/scripts/http_passdb.lua) from TASKS concurrent tasks,
like that many Lua states waiting on their backend, against the benchmark's own backend, and
prints the CPU this process spent per request. `--mode lua` runs it as a script does: a Lua
state per task, request(), add_header(), submit() and status() in http.lua, the event loop
doing the I/O (blocking = no). `--mode perform` calls HttpExtension.perform() alone: the
transport. Run it before and after a change to lua_api/http.py or http.lua.
"""

from __future__ import annotations

import argparse
import base64
import resource
import time

import trio

from bench.backend import Backend
from bench.loadgen import PASSWORD, USER
from lua_api.http import ClientSettings, HttpExtension, parse_http_url
from lua_api.runtime import LuaState, StateOptions, drive, run_in_loop

CREDENTIALS = b"Basic " + base64.b64encode(f"{USER}:{PASSWORD}".encode())

SCRIPT = b"""
local http_client = dovecot.http.client{max_attempts = 1}
function run()
  local request = http_client:request{url = URL, method = "PROPFIND"}
  request:add_header("Authorization", AUTHORIZATION)
  local status = request:submit():status()
  if status ~= 207 then error("unexpected status " .. status) end
end
"""


class _Host:
    def log(self, level: int, message: str, context: object | None) -> None:
        pass

    def password_verify(self, context: object, crypted: bytes, plain: bytes) -> tuple[int, str | None]:
        return 0, None


def _cpu() -> float:
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return usage.ru_utime + usage.ru_stime


async def _measure(mode: str, url: bytes, tasks: int, warmup: float, duration: float) -> tuple[float, float]:
    """(CPU µs per request, requests per second) of one run."""
    extension = HttpExtension()
    done = 0
    counting = False

    async def perform() -> None:
        nonlocal done
        # What http.lua's submit() yields, as LuaState.to_python() delivers it.
        values = [ClientSettings(max_attempts=1), b"PROPFIND", parse_http_url(url, allow_userinfo=True), False, True]
        values += [1, b"authorization", b"Authorization", CREDENTIALS]
        payload = dict(enumerate(values, 1))
        while True:
            response = await extension.perform(payload)
            if response[0] != 207:
                raise RuntimeError(f"unexpected response {response[0]} {response[1]!r}")
            done += counting

    async def lua() -> None:
        nonlocal done
        state = LuaState(_Host(), StateOptions(extensions=(extension,)), name="bench")
        state.lua.globals()[b"URL"] = url
        state.lua.globals()[b"AUTHORIZATION"] = CREDENTIALS
        state.lua.execute(SCRIPT, name="=bench")
        while True:
            outcome = await drive(state, b"run", b"none", run_in_loop)
            if not outcome.ok:
                raise RuntimeError(outcome.error)
            done += counting

    async with trio.open_nursery() as nursery:
        for _ in range(tasks):
            nursery.start_soon(perform if mode == "perform" else lua)
        await trio.sleep(warmup)
        counting, cpu, started = True, _cpu(), time.monotonic()
        await trio.sleep(duration)
        counting, cpu, elapsed = False, _cpu() - cpu, time.monotonic() - started
        nursery.cancel_scope.cancel()
    await extension.aclose()
    return cpu / max(done, 1) * 1e6, done / elapsed


def main() -> None:
    parser = argparse.ArgumentParser(prog="python -m bench.http_client", description=__doc__)
    parser.add_argument("--mode", choices=("lua", "perform"), action="append", help="default: both")
    parser.add_argument("--tasks", type=int, default=30, help="requests in flight (default 30, [lua] workers)")
    parser.add_argument("--delay", type=float, default=20, help="backend delay in ms (default 20)")
    parser.add_argument("--backend-procs", type=int, default=2)
    parser.add_argument("--runs", type=int, default=3, help="runs per mode, interleaved (default 3)")
    parser.add_argument("--warmup", type=float, default=1.0)
    parser.add_argument("--duration", type=float, default=5.0)
    args = parser.parse_args()
    modes = args.mode or ["lua", "perform"]
    results: dict[str, list[tuple[float, float]]] = {mode: [] for mode in modes}
    with Backend(args.delay / 1000, args.backend_procs) as backend:
        url = f"{backend.url}/remote.php/dav/files/{USER}/".encode()
        for _ in range(args.runs):
            for mode in modes:
                results[mode].append(trio.run(_measure, mode, url, args.tasks, args.warmup, args.duration))
    print(f"{args.tasks} tasks, backend delay {args.delay:g} ms, {args.runs} x {args.duration:g} s")
    print("| mode | client CPU µs/req median (min-max) | req/s median |")
    print("|---|---|---|")
    for mode, runs in results.items():
        cpu = sorted(run[0] for run in runs)
        rate = sorted(run[1] for run in runs)
        print(f"| {mode} | {cpu[len(cpu) // 2]:.0f} ({cpu[0]:.0f}-{cpu[-1]:.0f}) | {rate[len(rate) // 2]:.0f} |")


if __name__ == "__main__":
    main()
