"""The tiers' direct channel (`serving/direct.py`) against a `grpc.aio` channel carrying the same
pickled payloads, between two processes of this machine, called the way a round calls a tier: one
call at a time, with a pause between calls long enough for the replica process to fall asleep (the
other tier's pass). Interleaved call by call (A, B, A, B ...), so the machine's drift falls on both.

    .venv/bin/python scripts/bench_direct_channel.py --calls 300 --pause-ms 15

Prints each channel's round-trip time (median, p10, p90) and the per-call ratio with its spread.
"""

from __future__ import annotations

import argparse
import asyncio
import multiprocessing
import pickle
import statistics
import time

import grpc
import numpy as np
from speccascade.serving.direct import DirectChannels, DirectServer
from speccascade.serving.wire import GRPC_MESSAGE_BYTES

GRPC_METHOD = "/bench.Echo/echo"


class Echo:
    async def verify(self, payload):
        return payload


async def _serve(ready) -> None:
    async def echo(request: bytes, context) -> bytes:
        return pickle.dumps(pickle.loads(request), protocol=pickle.HIGHEST_PROTOCOL)

    server = grpc.aio.server()
    server.add_generic_rpc_handlers((grpc.method_handlers_generic_handler(
        "bench.Echo", {"echo": grpc.unary_unary_rpc_method_handler(echo)}),))
    port = server.add_insecure_port("127.0.0.1:0")
    await server.start()
    direct = DirectServer(Echo(), host="127.0.0.1", message_bytes=GRPC_MESSAGE_BYTES)
    ready.send((f"127.0.0.1:{port}", await direct.endpoint()))
    await asyncio.Event().wait()


def _server_process(ready) -> None:
    asyncio.run(_serve(ready))


async def _measure(grpc_address: str, endpoint, calls: int, pause_s: float) -> dict[str, list[float]]:
    payload = {"tokens": np.arange(8, dtype=np.int64), "position": 123, "session": "bench"}
    channels = DirectChannels(message_bytes=GRPC_MESSAGE_BYTES)
    times: dict[str, list[float]] = {"grpc.aio": [], "direct": []}
    async with grpc.aio.insecure_channel(grpc_address) as channel:
        stub = channel.unary_unary(GRPC_METHOD)
        for call in range(calls + 10):  # the first 10 of each warm up
            for name in times:
                started = time.perf_counter()
                if name == "direct":
                    await channels.call(endpoint, "verify", payload)
                else:
                    pickle.loads(await stub(pickle.dumps(payload, protocol=pickle.HIGHEST_PROTOCOL)))
                if call >= 10:
                    times[name].append((time.perf_counter() - started) * 1e3)
                await asyncio.sleep(pause_s)
    await channels.close()
    return times


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--calls", type=int, default=300, help="calls per channel (default 300)")
    parser.add_argument("--pause-ms", type=float, default=15.0, help="pause after each call (default 15 ms)")
    args = parser.parse_args()
    if args.calls < 1 or args.pause_ms < 0:
        parser.error(f"--calls={args.calls} must be >= 1 and --pause-ms={args.pause_ms} >= 0")
    ready, told = multiprocessing.Pipe()
    server = multiprocessing.get_context("spawn").Process(target=_server_process, args=(told,), daemon=True)
    server.start()
    try:
        grpc_address, endpoint = ready.recv()
        times = asyncio.run(_measure(grpc_address, endpoint, args.calls, args.pause_ms / 1e3))
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
