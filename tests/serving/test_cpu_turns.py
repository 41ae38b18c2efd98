"""Forward passes that take turns across processes (`TierConfig.cpu_lock_file`): one process's
pass waits while another holds the lock, a dead holder frees it, every pass of a tier takes it, and
a bad path or a GPU tier is refused naming the field; a tier's idle OpenMP threads stop spinning
as soon as `cpu_spin_count` says."""

from __future__ import annotations

import multiprocessing
import os
import subprocess
import sys
import threading
import time

import pytest
import torch
from pydantic import ValidationError
from speccascade.config.app import TierConfig
from speccascade.engine.backends import BACKEND_KINDS, ScoreJob, backend_class
from speccascade.serving.cpu_turns import SPIN_VARIABLE, CpuTurns, cpu_spin_count, cpu_spin_env

from ..conftest import tiny_qwen2


def _hold(path: str, held, release) -> None:
    with CpuTurns(path):
        held.set()
        release.wait(60)


def _hold_forever(path: str, held) -> None:
    turns = CpuTurns(path)
    turns.__enter__()
    held.set()
    threading.Event().wait(120)


def _enter_in_thread(path: str) -> tuple[threading.Thread, threading.Event]:
    entered = threading.Event()

    def enter():
        with CpuTurns(path):
            entered.set()

    thread = threading.Thread(target=enter, daemon=True)
    thread.start()
    return thread, entered


@pytest.fixture
def spawn():
    context = multiprocessing.get_context("spawn")
    children = []

    def start(target, *args):
        child = context.Process(target=target, args=args, daemon=True)
        child.start()
        children.append(child)
        return child

    yield context, start
    for child in children:
        if child.is_alive():
            child.kill()
        child.join(10)


def test_a_pass_waits_while_another_process_holds_the_lock(tmp_path, spawn):
    context, start = spawn
    path = str(tmp_path / "cpu.lock")
    held, release = context.Event(), context.Event()
    start(_hold, path, held, release)
    assert held.wait(60)
    thread, entered = _enter_in_thread(path)
    assert not entered.wait(0.5)  # the other process holds it (it lets go only when told to)
    release.set()
    assert entered.wait(30)
    thread.join(5)


def test_a_killed_holder_frees_the_lock(tmp_path, spawn):
    context, start = spawn
    path = str(tmp_path / "cpu.lock")
    held = context.Event()
    child = start(_hold_forever, path, held)
    assert held.wait(60)
    thread, entered = _enter_in_thread(path)
    assert not entered.wait(0.5)
    child.kill()
    assert entered.wait(30)  # the kernel released the dead process's lock
    thread.join(5)


def test_the_turn_carries_the_sessions_its_last_holder_answered(tmp_path):
    """Two CpuTurns on one file contend as two processes do (flock is per open file)."""
    path = str(tmp_path / "cpu.lock")
    drafter, expert = CpuTurns(path), CpuTurns(path)
    assert drafter.acquire() == ()  # a fresh file: nothing handed over
    assert expert.try_acquire() is None  # held by the other: no wait, no turn
    drafter.release(["tenant-a:1", "tenant-b:2"])
    assert expert.try_acquire() == ("tenant-a:1", "tenant-b:2")
    expert.release([])
    assert drafter.acquire() == ()  # an empty handoff clears the note


def test_a_holder_taking_the_turn_again_reads_no_sessions_from_its_own_note(tmp_path):
    """The drafter answered s1 and s2 and takes the turn again (more calls queued, the expert not yet
    waiting): s1's and s2's next calls go to the expert, so nothing is handed to the drafter. The
    expert, taking the turn after that, still reads what the drafter answered last."""
    path = str(tmp_path / "cpu.lock")
    drafter, expert = CpuTurns(path), CpuTurns(path)
    drafter.acquire()
    drafter.release(["s1", "s2"])
    assert drafter.acquire() == ()
    drafter.release(["s3"])
    assert drafter.try_acquire() == ()
    drafter.release(["s3"])
    assert expert.acquire() == ("s3",)


def test_a_pass_inside_a_held_turn_takes_nothing_more(tmp_path):
    path = str(tmp_path / "cpu.lock")
    tier, other = CpuTurns(path), CpuTurns(path)
    tier.acquire()
    with tier:  # the pass guard within the batch's turn
        assert tier.held
    assert tier.held and other.try_acquire() is None  # the inner exit did not give the turn back
    tier.release(["s"])
    assert not tier.held and other.try_acquire() == ("s",)
    other.release()
    tier.release()  # a release with no turn held (its acquire was cancelled) does nothing
    assert tier.try_acquire() == ()


class CountingGuard:
    def __init__(self):
        self.entered = self.exited = 0

    def __enter__(self):
        self.entered += 1

    def __exit__(self, *exc):
        self.exited += 1


@pytest.mark.parametrize("kind", BACKEND_KINDS)
def test_every_forward_pass_holds_the_guard_and_a_failing_pass_lets_it_go(kind):
    backend = backend_class(kind)(tiny_qwen2(300, seed=3), name=kind)
    guard = backend.pass_guard = CountingGuard()
    sessions = [backend.new_session(), backend.new_session()]
    backend.score([ScoreJob(sessions[0], [1, 2, 3, 4], 2), ScoreJob(sessions[1], [5, 6, 7], 1)])
    assert guard.entered == guard.exited == backend.forward_calls
    backend.step(sessions, torch.tensor([8, 9]))
    assert guard.entered == guard.exited == backend.forward_calls
    original = backend._forward
    backend._forward = lambda *args, **kwargs: (_ for _ in ()).throw(RuntimeError("pass failed"))
    with pytest.raises(RuntimeError, match="pass failed"):
        backend.score([ScoreJob(sessions[0], [1, 2, 3, 4, 5], 5)])
    backend._forward = original
    assert guard.entered == guard.exited


def test_an_unusable_lock_file_is_refused_naming_the_field(tmp_path):
    with pytest.raises(ValueError, match=r"drafter.cpu_lock_file='.*missing/cpu.lock': cannot open it"):
        CpuTurns(tmp_path / "missing" / "cpu.lock", field="drafter.cpu_lock_file")


def test_a_gpu_tier_cannot_take_cpu_turns():
    with pytest.raises(ValidationError, match="cpu_lock_file='/tmp/x.lock' makes passes on the CPU take turns"):
        TierConfig(model="m", device="cuda", cpu_lock_file="/tmp/x.lock")
    assert TierConfig(model="m", device="cpu", cpu_lock_file="/tmp/x.lock").cpu_lock_file == "/tmp/x.lock"


def test_a_tier_given_a_lock_file_steps_only_in_its_turn(tmp_path, spawn, tiny_model_dirs):
    import asyncio

    from speccascade.engine.blocks import DraftPayload, SampleRows
    from speccascade.options import SamplingParams
    from speccascade.serving.tiers import DrafterTier
    from speccascade.serving.wire import DraftCall, SentTokens

    path = str(tmp_path / "cpu.lock")
    drafter = DrafterTier(TierConfig(model=tiny_model_dirs[0], dtype="fp32", cpu_lock_file=path))
    context, start = spawn
    held, release = context.Event(), context.Event()
    start(_hold, path, held, release)
    assert held.wait(60)
    call = DraftCall("s", SentTokens().delta([5, 17, 42]), 3, SamplingParams(), 0, DraftPayload(SampleRows.NONE))
    replies = []
    thread = threading.Thread(target=lambda: replies.append(asyncio.run(drafter.draft(call))), daemon=True)
    thread.start()
    thread.join(0.5)
    assert not replies and drafter.backend.forward_calls == 0  # waiting for its turn
    release.set()
    thread.join(60)
    assert len(replies[0].block.tokens) == 3


IDLE_BETWEEN_PASSES = """
import os, time, torch
torch.set_num_threads(2)
a, b = torch.randn(64, 256), torch.randn(256, 1024)
for _ in range(10):
    a @ b
start = os.times()
for _ in range(100):
    (a @ b).relu_()
    time.sleep(0.01)  # idle, as a tier between its passes
end = os.times()
print(end.user + end.system - start.user - start.system)
"""


def _cpu_seconds_idle_between_passes(env: dict[str, str]) -> float:
    clean = {k: v for k, v in os.environ.items() if k != SPIN_VARIABLE} | env
    done = subprocess.run([sys.executable, "-c", IDLE_BETWEEN_PASSES], env=clean, capture_output=True, text=True,
                          timeout=120)
    assert done.returncode == 0, done.stderr[-2000:]
    return float(done.stdout)


@pytest.mark.skipif((os.cpu_count() or 1) < 2, reason="libgomp barely spins when its threads outnumber the cores")
def test_idle_openmp_threads_stop_spinning_as_the_spin_count_says():
    """At libgomp's default the worker thread keeps spinning for milliseconds after each pass, holding
    a core while the process is idle (on a 2-core AMD EPYC: 0.77 s of CPU over 100 passes 10 ms
    apart, against 0.05 s at spin 0 and 0.07 s at 1,000); a tier's environment bounds it."""
    default = _cpu_seconds_idle_between_passes({})
    bounded = _cpu_seconds_idle_between_passes(cpu_spin_env(0))
    assert bounded < 0.5 * default, f"CPU seconds idle between passes: {bounded} at spin 0, {default} by default"


def test_the_spin_count_goes_into_the_environment_and_is_read_back(monkeypatch):
    assert cpu_spin_env(1_000) == {SPIN_VARIABLE: "1000"}
    with pytest.raises(ValueError, match="-1 must be >= 0"):
        cpu_spin_env(-1)
    monkeypatch.delenv(SPIN_VARIABLE, raising=False)
    assert cpu_spin_count() is None
    monkeypatch.setenv(SPIN_VARIABLE, "0")
    assert cpu_spin_count() == 0


def test_the_spin_count_is_checked_at_config_load():
    assert TierConfig(model="m").cpu_spin_count == 1_000
    assert TierConfig(model="m", cpu_spin_count=0).cpu_spin_count == 0
    with pytest.raises(ValidationError, match=r"cpu_spin_count\n.*greater than or equal to 0"):
        TierConfig(model="m", cpu_spin_count=-5)


def test_turns_alternate_while_another_process_waits(tmp_path):
    """A holder that gives the turn back with more work queued does not take it again at once while
    another waits for it (flock alone wakes waiters in no order: a tier with a queue of prompt
    chunks kept the cores turn after turn)."""
    path = str(tmp_path / "cpu.lock")
    tier, other = CpuTurns(path), CpuTurns(path)
    assert not tier.others_waiting()
    tier.acquire()
    got: list = []
    waiter = threading.Thread(target=lambda: got.append(other.acquire()), daemon=True)
    waiter.start()
    deadline = time.monotonic() + 30
    while not tier.others_waiting() and time.monotonic() < deadline:
        time.sleep(0.001)
    assert tier.others_waiting()
    tier.release(["s"])
    assert tier.try_acquire() is None  # the waiting process goes first
    waiter.join(30)
    assert got == [("s",)] and other.held
    assert not tier.others_waiting()  # it waits no more
    other.release(["t"])
    assert tier.try_acquire() == ("t",)  # nobody waiting: taken at once
