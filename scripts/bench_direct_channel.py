"""The tiers' direct channel (`serving/direct.py`) against a `grpc.aio` channel carrying the same
pickled payloads, between two processes of this machine, called the way a round calls a tier: one
call at a time, with a pause between calls long enough for the replica process to fall asleep (the
other tier's pass). Interleaved call by call (A, B, A, B ...), so the machine's drift falls on both.

    .venv/bin/python scripts/bench_direct_channel.py --calls 300 --pause-ms 15

Prints each channel's round-trip time (median, p10, p90) and the per-call ratio with its spread.
`--beside-mib 4` times the same small calls while another task keeps a call of that many MiB each
way in flight on the same channel (sessions whose rounds carry whole float rows): what a small call
waits behind a large one. `--payload-mib 3` times calls that themselves carry that many MiB each
way (a round's whole float rows) instead of the small ones. Both processes run as the replicas and
the router do: their event loops on uvloop (Ray's, where it is installed: it comes with ray[serve];
`--loop asyncio` for asyncio's own) and their memory from the allocator the deployments preload
(`--allocator`, default `auto`: tcmalloc; the script starts itself again with it preloaded).
"""

from __future__ import annotations

import argparse
import asyncio
import multiprocessing
import os
import pickle
import statistics
import sys
import time

import grpc
import numpy as np
from speccascade.serving.direct import DirectChannels, DirectServer
from speccascade.serving.heap import AUTO_ALLOCATOR, allocator_env, allocator_installed, running_allocator
from speccascade.serving.wire import GRPC_MESSAGE_BYTES

GRPC_METHOD = "/bench.Echo/echo"
RESTARTED = "SPECCASCADE_BENCH_RESTARTED"  # set when the script started itself again with an allocator preloaded
LIMITS = [("grpc.max_send_message_length", GRPC_MESSAGE_BYTES), ("grpc.max_receive_message_length", GRPC_MESSAGE_BYTES)]


class Echo:
    async def verify(self, payload):
        return payload


async def _serve(ready) -> None:
    async def echo(request: bytes, context) -> bytes:
        return pickle.dumps(pickle.loads(request), protocol=pickle.HIGHEST_PROTOCOL)

    server = grpc.aio.server(options=LIMITS)
    server.add_generic_rpc_handlers((grpc.method_handlers_generic_handler(
        "bench.Echo", {"echo": grpc.unary_unary_rpc_method_handler(echo)}),))
    port = server.add_insecure_port("127.0.0.1:0")
    await server.start()
    direct = DirectServer(Echo(), host="127.0.0.1", message_bytes=GRPC_MESSAGE_BYTES)
    ready.send((f"127.0.0.1:{port}", await direct.endpoint()))
    await asyncio.Event().wait()


def _run(loop: str, coroutine):
    if loop == "uvloop":
        import uvloop

        return uvloop.run(coroutine)
    return asyncio.run(coroutine)


def _server_process(ready, loop: str) -> None:
    _run(loop, _serve(ready))


async def _measure(grpc_address: str, endpoint, calls: int, pause_s: float,
                   beside_bytes: int, payload_bytes: int) -> dict[str, list[float]]:
    payload = ({"rows": np.ones(payload_bytes // 4, dtype=np.float32)} if payload_bytes else
               {"tokens": np.arange(8, dtype=np.int64), "position": 123, "session": "bench"})
    large = {"rows": np.ones(beside_bytes // 4, dtype=np.float32)}
    channels = DirectChannels(message_bytes=GRPC_MESSAGE_BYTES)
    times: dict[str, list[float]] = {"grpc.aio": [], "direct": []}
    async with grpc.aio.insecure_channel(grpc_address, options=LIMITS) as channel:
        stub = channel.unary_unary(GRPC_METHOD)

        async def call(name: str, value) -> None:
            if name == "direct":
                await channels.call(endpoint, "verify", value)
            else:
                pickle.loads(await stub(pickle.dumps(value, protocol=pickle.HIGHEST_PROTOCOL)))

        async def beside(name: str, stop: asyncio.Event) -> None:  # a large call in flight until stopped
            while not stop.is_set():
                await call(name, large)

        for index in range(calls + 10):  # the first 10 of each warm up
            for name in times:
                stop = asyncio.Event()
                load = asyncio.create_task(beside(name, stop)) if beside_bytes else None
                if load is not None:
                    await asyncio.sleep(pause_s)  # the large call under way
                started = time.perf_counter()
                await call(name, payload)
                if index >= 10:
                    times[name].append((time.perf_counter() - started) * 1e3)
                if load is not None:  # its call finishes: nothing of it left to weigh on the next channel
                    stop.set()
                    await load
                await asyncio.sleep(pause_s)
    await channels.close()
    return times


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--calls", type=int, default=300, help="calls per channel (default 300)")
    parser.add_argument("--pause-ms", type=float, default=15.0, help="pause after each call (default 15 ms)")
    parser.add_argument("--payload-mib", type=float, default=0.0,
                        help="time calls carrying this many MiB each way (default: a few small arrays)")
    parser.add_argument("--beside-mib", type=float, default=0.0,
                        help="keep a call of this many MiB each way in flight beside the timed ones (default none)")
    parser.add_argument("--loop", choices=("uvloop", "asyncio"), default="uvloop",
                        help="both processes' event loop (default uvloop, as under Ray)")
    parser.add_argument("--allocator", choices=("auto", "glibc", "jemalloc", "tcmalloc"), default="auto",
                        help="both processes' allocator, as the deployments' `allocator` (default auto: tcmalloc)")
    args = parser.parse_args()
    allocator = AUTO_ALLOCATOR if args.allocator == "auto" else args.allocator
    if running_allocator() != allocator:
        if allocator != "glibc" and not allocator_installed(allocator):
            parser.error(f"--allocator={args.allocator}: {allocator} is not installed here (scripts/install_allocators.sh)")
        if os.environ.get(RESTARTED):
            parser.error(f"--allocator={args.allocator}: started again with it preloaded and still on {running_allocator()}")
        # Preloaded only when a process starts: this one starts again with it (and the server inherits it).
        env = {key: value for key, value in os.environ.items() if key not in ("LD_PRELOAD", "MALLOC_CONF")}
        os.execve(sys.executable, [sys.executable, *sys.argv], env | allocator_env(allocator) | {RESTARTED: "1"})
    print(f"event loop {args.loop}, {running_allocator()} allocator")
    if args.calls < 1 or args.pause_ms < 0 or not 0 <= args.beside_mib <= 64 or not 0 <= args.payload_mib <= 64:
        parser.error(f"--calls={args.calls} must be >= 1, --pause-ms={args.pause_ms} >= 0, and "
                     f"--beside-mib={args.beside_mib} and --payload-mib={args.payload_mib} between 0 and 64")
    ready, told = multiprocessing.Pipe()
    server = multiprocessing.get_context("spawn").Process(target=_server_process, args=(told, args.loop), daemon=True)
    server.start()
    try:
        grpc_address, endpoint = ready.recv()
        times = _run(args.loop, _measure(grpc_address, endpoint, args.calls, args.pause_ms / 1e3,
                                int(args.beside_mib * (1 << 20)), int(args.payload_mib * (1 << 20))))
    finally:
        server.terminate()
        server.join()
    for name, values in times.items():
        ordered = sorted(values)
        print(f"{name:9s} round trip median {statistics.median(values):.3f} ms "
              f"[p10 {ordered[len(ordered) // 10]:.3f}, p90 {ordered[len(ordered) * 9 // 10]:.3f}] over {len(values)} calls")
    ratios = sorted(g / d for g, d in zip(times["grpc.aio"], times["direct"]))
    print(f"grpc.aio / direct per call: median {statistics.median(ratios):.2f}x "
          f"[p10 {ratios[len(ratios) // 10]:.2f}, p90 {ratios[len(ratios) * 9 // 10]:.2f}]")


if __name__ == "__main__":
    main()
