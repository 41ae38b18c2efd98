"""What the project tells people to run, run against the served application: the OpenAI snippet
`speccascade serve` prints, and the commands of the chart's `helm test` pod."""

from __future__ import annotations

import json
import textwrap

import pytest
from speccascade.app.launcher import Endpoints
from speccascade.cli import main
from speccascade.commands.serve import usage
from speccascade.k8s import HelmError, find_helm, render_chart, select_kind

from ..served import SERVE_APP


def test_the_openai_snippet_printed_by_serve_streams_a_chat_completion(served, openai_base_url, capsys):
    printed = usage(Endpoints(SERVE_APP, served, openai_base_url))
    lines = printed.splitlines()
    start = lines.index("  from openai import OpenAI")
    end = lines.index("", start)
    snippet = textwrap.dedent("\n".join(lines[start:end]))
    assert openai_base_url in snippet and "extra_body" in snippet
    exec(compile(snippet, "<speccascade serve usage>", "exec"), {})
    assert capsys.readouterr().out.strip()  # streamed text


def test_the_grpc_client_command_printed_by_serve_works(served, openai_base_url, capsys):
    (command,) = [line.split() for line in usage(Endpoints(SERVE_APP, served, openai_base_url)).splitlines()
                  if line.strip().startswith("speccascade client")]
    assert main([*command[1:3], served, "--raw", "-n", "8", "--no-color", "def add(a, b):"]) == 0
    assert capsys.readouterr().out.strip()


@pytest.fixture(scope="module")
def test_pod_commands() -> list[list[str]]:
    try:
        helm = find_helm()
    except HelmError as error:
        pytest.skip(f"helm is not installed ({error})")
    (pod,) = select_kind(render_chart(helm=helm), "Pod", "v1")
    assert pod["metadata"]["annotations"]["helm.sh/hook"] == "test"
    return [c["command"] for c in pod["spec"]["initContainers"] + pod["spec"]["containers"]]


def test_the_helm_test_pod_commands_pass_against_a_served_application(served, openai_base_url, test_pod_commands,
                                                                      capsys):
    """The pod's commands as rendered, with the in-cluster Service address swapped for this one."""
    for command in test_pod_commands:
        assert command[0] == "speccascade"
        argv = [f"--target={served}" if arg.startswith("--target=") else
                f"--openai-url={openai_base_url}" if arg.startswith("--openai-url=") else arg for arg in command[1:]]
        assert main(argv) == 0, argv
    health, generate, models = capsys.readouterr().out.strip().splitlines()
    assert health == f"{served}: SERVING"
    response = json.loads(generate)
    assert response["text"] and 0 < response["usage"]["completion_tokens"] <= 8
    assert models == f"{openai_base_url}/models: SERVING"


# ---- stopping: Ctrl-C drains, a second Ctrl-C cuts the drain short ----

@pytest.fixture
def restored_signal_handlers():
    import signal

    saved = {signum: signal.getsignal(signum) for signum in (signal.SIGINT, signal.SIGTERM)}
    yield
    for signum, handler in saved.items():
        signal.signal(signum, handler)


class DrainingStack:
    """A started stack whose graceful stop (Serve's drain) takes `drain_s`, with LocalStack's shape:
    `stop_now` from another thread ends the drain's wait as Ray does (SystemExit in the waiting
    thread), and the graceful stop stops the cluster in its `finally`."""

    def __init__(self, drain_s: float):
        import threading

        self.drain_s = drain_s
        self.draining = threading.Event()
        self.cut_off = threading.Event()
        self.cluster_stops = 0

    def stop(self) -> None:
        try:
            self.draining.set()
            if self.cut_off.wait(timeout=self.drain_s):
                raise SystemExit(0)
        finally:
            self.stop_now()

    def stop_now(self) -> None:  # idempotent, as LocalStack's
        if not self.cut_off.is_set():
            self.cluster_stops += 1
            self.cut_off.set()


def serve_until_signalled(monkeypatch, stack: DrainingStack, signals_during_drain: int,
                          drain_timeout_s: float = 20.0) -> tuple[int, float]:
    """`speccascade serve` over `stack`, with one SIGINT to stop it and `signals_during_drain` more
    once it drains; (exit code, seconds from the first signal to the command's return)."""
    import os
    import signal
    import threading
    import time
    from types import SimpleNamespace

    from speccascade.app import launcher

    config = SimpleNamespace(router=SimpleNamespace(drain_timeout_s=drain_timeout_s),
                             tenancy=SimpleNamespace(tenants_file=None))
    endpoints = Endpoints("speccascade", "localhost:9000", "http://127.0.0.1:8000/v1")
    monkeypatch.setattr(launcher, "start_serve_config",
                        lambda *args, **kwargs: SimpleNamespace(stack=stack, endpoints=endpoints, config=config))
    sent = []
    before = signal.getsignal(signal.SIGINT)

    def press_ctrl_c():
        deadline = time.monotonic() + 60  # until the command's own handlers are in (a loaded machine is slow)
        while signal.getsignal(signal.SIGINT) is before and time.monotonic() < deadline:
            time.sleep(0.05)
        sent.append(time.monotonic())
        os.kill(os.getpid(), signal.SIGINT)
        if signals_during_drain:
            assert stack.draining.wait(timeout=5)
            for _ in range(signals_during_drain):
                time.sleep(0.1)
                os.kill(os.getpid(), signal.SIGINT)

    presser = threading.Thread(target=press_ctrl_c)
    presser.start()
    code = main(["serve"])
    returned = time.monotonic()
    presser.join()
    return code, returned - sent[0]


def test_serve_stops_gracefully_on_ctrl_c_and_says_how_long_streams_may_drain(monkeypatch, capsys,
                                                                                restored_signal_handlers):
    stack = DrainingStack(drain_s=0.5)
    code, took = serve_until_signalled(monkeypatch, stack, signals_during_drain=0)
    err = capsys.readouterr().err
    assert code == 0 and stack.cluster_stops == 1 and took >= 0.5
    assert "streams still running get up to 20s to finish" in err and "Ctrl-C again" in err
    assert "stopped." in err and "cut off" not in err.split("Ctrl-C again")[1]


def test_a_second_ctrl_c_cuts_the_drain_short_and_gives_a_third_back_to_the_process(monkeypatch, capsys,
                                                                                     restored_signal_handlers):
    import signal

    before = signal.getsignal(signal.SIGINT)
    stack = DrainingStack(drain_s=30.0)
    code, took = serve_until_signalled(monkeypatch, stack, signals_during_drain=1, drain_timeout_s=300.0)
    err = capsys.readouterr().err
    # Should the forced stop hang, a third Ctrl-C is the process's own again (KeyboardInterrupt).
    assert signal.getsignal(signal.SIGINT) is before
    assert "streams still running get up to 30s to finish" in err  # Serve's shutdown waits no longer
    assert code == 0 and stack.cluster_stops == 1 and took < 10
    assert "stopped at once: streams still running were cut off" in err
