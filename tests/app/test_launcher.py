"""The launcher's port choice: ports a proxy binds later must be ones no port-0 bind can take."""

from __future__ import annotations

import random
import socket

import pytest
from speccascade.app import launcher
from speccascade.app.launcher import free_port


def test_free_ports_lie_below_the_ephemeral_range_and_are_bindable():
    low, _ = launcher.ephemeral_port_range()
    rng = random.Random(0)
    for _ in range(50):
        port = free_port(rng)
        assert launcher.LOWEST_CHOSEN_PORT <= port < low
        with socket.socket() as s:
            s.bind(("127.0.0.1", port))  # free when returned


def test_a_port_in_use_is_skipped():
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        busy = taken.getsockname()[1]

        class Replay(random.Random):
            """Offers the busy port first, then an ordinary choice."""
            offered = False

            def randrange(self, start, stop):
                if not self.offered:
                    self.offered = True
                    return busy
                return super().randrange(start, stop)

        port = free_port(Replay(1))
        assert port != busy


def test_a_range_starting_too_low_chooses_above_it(monkeypatch):
    monkeypatch.setattr(launcher, "ephemeral_port_range", lambda: (1024, 50000))
    assert all(50000 < free_port(random.Random(seed)) < 65536 for seed in range(20))


def test_no_free_port_is_an_error_naming_the_range(monkeypatch):
    monkeypatch.setattr(launcher, "ephemeral_port_range", lambda: (32768, 60999))
    monkeypatch.setattr(launcher.socket, "socket", lambda *a, **k: _Unbindable())
    with pytest.raises(RuntimeError, match="10000-32767"):
        free_port(random.Random(0))


class _Unbindable:
    def __enter__(self):
        return self

    def __exit__(self, *exc):
        return False

    def bind(self, address):
        raise OSError(98, "Address already in use")
