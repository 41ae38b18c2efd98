"""A tier's C allocator. Under glibc a tier keeps the mmap threshold fixed, so a large block freed
after the first batches goes back to the OS at once instead of staying in a fragmenting heap
(checked in a fresh process with the C allocator itself: free a 16 MiB block, which would raise
glibc's threshold above that, then allocate, touch and free 8 MiB beneath a small block that pins
the heap's top). The price is that every large tensor is faulted in afresh; jemalloc or tcmalloc,
preloaded into the replica's process, reuse it (checked in fresh processes that allocate tensors
as a pass does). A replica runs on the allocator it asked for or refuses to start. Apart from the
allocator, the compiled kernels of CPU matmuls in bf16 stay within the replica's bound however many
shapes its passes meet."""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap
from unittest import mock

import pytest
from speccascade.serving import heap
from speccascade.serving.heap import (
    _MALLOPT,
    allocator_env,
    allocator_installed,
    describe_allocator,
    kernel_cache_entries,
    kernel_cache_env,
    pin_mmap_threshold,
    prepare_allocator,
    running_allocator,
)

PROBE = textwrap.dedent("""
    import ctypes, os, sys
    from speccascade.serving.heap import pin_mmap_threshold
    libc = ctypes.CDLL("libc.so.6")
    libc.malloc.restype = ctypes.c_void_p
    libc.free.argtypes = [ctypes.c_void_p]
    page = os.sysconf("SC_PAGE_SIZE")
    def rss():
        with open("/proc/self/statm") as f:
            return int(f.read().split()[1]) * page
    if sys.argv[1] == "pinned":
        assert pin_mmap_threshold()
    libc.free(libc.malloc(16 << 20))          # unpinned glibc now serves blocks below ~16 MiB from the heap
    block = libc.malloc(8 << 20)
    guard = libc.malloc(1024)                 # above the block: the heap's top cannot shrink past it
    ctypes.memset(block, 1, 8 << 20)
    before = rss()
    libc.free(block)
    print(before - rss())
""")


def freed_bytes(mode: str) -> int:
    done = subprocess.run([sys.executable, "-c", PROBE, mode], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    return int(done.stdout.strip())


@pytest.mark.skipif(_MALLOPT is None, reason="not glibc: no mallopt")
def test_a_large_block_freed_after_warm_up_returns_to_the_os_only_with_the_threshold_pinned():
    assert pin_mmap_threshold()
    assert freed_bytes("pinned") >= 7 << 20
    assert freed_bytes("default") < 1 << 20  # what the tiers saw before: the freed block stays resident


# A pass's large temporaries: a 4 MiB tensor (1,024 pages; six rows of logits over a 150k-token
# vocabulary are 3.6 MiB) allocated, written and freed 20 times after a warm-up, in a process that
# prepared its allocator as a tier does; the probe prints the median tensor's page faults.
TENSOR_PROBE = textwrap.dedent("""
    import sys
    import torch
    from speccascade.serving.heap import page_faults, prepare_allocator
    running = prepare_allocator(sys.argv[1])
    for _ in range(3):
        torch.ones(1 << 20).sum()
    faults = []
    for _ in range(20):
        before = page_faults()
        torch.ones(1 << 20).sum()
        faults.append(page_faults() - before)
    print(running, sorted(faults)[len(faults) // 2])
""")


def tensor_probe(allocator: str) -> tuple[str, float]:
    env = {**os.environ, **allocator_env(allocator)}
    done = subprocess.run([sys.executable, "-c", TENSOR_PROBE, allocator], capture_output=True, text=True,
                          timeout=120, env=env)
    assert done.returncode == 0, done.stderr
    running, faults = done.stdout.split()
    return running, float(faults)


@pytest.mark.parametrize("allocator", ["jemalloc", "tcmalloc"])
def test_a_preloaded_allocator_reuses_a_large_tensor_that_pinned_glibc_faults_in_every_time(allocator):
    if not allocator_installed(allocator):
        pytest.skip(f"{heap.ALLOCATOR_LIBRARIES[allocator]} is not installed")
    running, faults = tensor_probe(allocator)
    assert running == allocator
    # The freed 4 MiB comes back without faults (the median tensor: jemalloc's decay may hand the
    # pages back to the OS once in a while on a loaded machine, and that one tensor faults in whole).
    assert faults < 50
    if _MALLOPT is not None:
        assert tensor_probe("glibc") == ("glibc", pytest.approx(1024, rel=0.1))  # every page, every time


def test_the_replica_environment_preloads_the_chosen_allocator():
    assert allocator_env("glibc") == {}
    assert allocator_env("tcmalloc") == {"LD_PRELOAD": "libtcmalloc_minimal.so.4"}
    assert allocator_env("auto") == allocator_env("tcmalloc")  # whatever this machine has: the replica's node decides
    jemalloc = allocator_env("jemalloc")
    assert jemalloc["LD_PRELOAD"] == "libjemalloc.so.2"
    # An idle replica gives its pages back; tensors of every size are kept for reuse alike.
    assert {"background_thread:true", "oversize_threshold:0"} <= set(jemalloc["MALLOC_CONF"].split(","))


KERNEL_PROBE = textwrap.dedent("""
    import torch
    from speccascade.serving.heap import pin_mmap_threshold, trim_heap
    pin_mmap_threshold()
    torch.set_num_threads(1)
    layer = torch.nn.Linear(896, 4864, bias=False).to(torch.bfloat16)  # the packaged drafter's MLP
    def rss_mib():
        trim_heap()
        with open("/proc/self/statm") as f:
            return int(f.read().split()[1]) * 4096 / 2**20
    with torch.inference_mode():
        for tokens in range(1, 41):  # every cache already over its bound, if it has one
            layer(torch.ones(1, tokens, 896, dtype=torch.bfloat16))
        before = rss_mib()
        for tokens in range(41, 161):  # 120 more shapes, a kernel each
            layer(torch.ones(1, tokens, 896, dtype=torch.bfloat16))
        print(rss_mib() - before)
""")


def kernel_growth_mib(env: dict[str, str]) -> float:
    clean = {k: v for k, v in os.environ.items() if k not in heap.KERNEL_CACHE_VARIABLES}
    done = subprocess.run([sys.executable, "-c", KERNEL_PROBE], capture_output=True, text=True, timeout=300,
                          env={**clean, **env})
    assert done.returncode == 0, done.stderr
    return float(done.stdout)


def test_bf16_matmul_kernels_stay_within_the_bound_however_many_shapes_a_process_meets():
    """Each new (tokens x hidden) shape compiles and keeps a oneDNN kernel; at the libraries'
    default bounds 120 new shapes keep tens of MiB, with the replica's bound they keep nothing."""
    unbounded = kernel_growth_mib({})
    if unbounded < 20:
        pytest.skip(f"bf16 matmuls on this CPU do not keep a kernel per shape (+{unbounded:.0f} MiB over 120 shapes)")
    assert kernel_growth_mib(kernel_cache_env(8)) < 8, "the bounded caches kept growing"


def test_the_replica_environment_bounds_both_kernel_caches(monkeypatch):
    assert kernel_cache_env(256) == {"ONEDNN_PRIMITIVE_CACHE_CAPACITY": "256", "LRU_CACHE_CAPACITY": "256"}
    with pytest.raises(ValueError, match="kernel cache entries=0 must be >= 1"):
        kernel_cache_env(0)  # torch's bf16 matmuls crash without a cache
    for name, value in kernel_cache_env(64).items():
        monkeypatch.setenv(name, value)
    assert kernel_cache_entries() == 64
    monkeypatch.setenv("LRU_CACHE_CAPACITY", "1024")  # bounded apart: no single bound to report
    assert kernel_cache_entries() is None
    monkeypatch.delenv("LRU_CACHE_CAPACITY")
    assert kernel_cache_entries() is None


@pytest.mark.parametrize("mapped,expected", [
    ("7f00-7f01 r-xp 0 08:01 1 /usr/lib/x86_64-linux-gnu/libjemalloc.so.2\n", "jemalloc"),
    ("7f00-7f01 r-xp 0 08:01 1 /usr/lib/aarch64-linux-gnu/libtcmalloc_minimal.so.4.5.10\n", "tcmalloc"),
    ("7f00-7f01 r-xp 0 08:01 1 /usr/lib/x86_64-linux-gnu/libc.so.6\n", "glibc"),
])
def test_the_running_allocator_is_read_from_the_mapped_libraries(tmp_path, mapped, expected):
    maps = tmp_path / "maps"
    maps.write_text(mapped)
    assert running_allocator(maps) == expected
    assert running_allocator(tmp_path / "missing") == "glibc"


def test_a_replica_without_the_allocator_it_asked_for_refuses_to_start_unless_auto():
    assert running_allocator() == "glibc", "the test process runs on glibc's malloc"
    with pytest.raises(ValueError, match=r"drafter\.allocator='jemalloc': libjemalloc\.so\.2 is not loaded"):
        prepare_allocator("jemalloc", field="drafter.allocator")
    assert prepare_allocator("glibc") == "glibc"
    assert prepare_allocator("auto") == "glibc"
    with mock.patch("speccascade.serving.heap.allocator_installed", return_value=False):
        assert describe_allocator("auto", "glibc") == ("glibc allocator (auto: libtcmalloc_minimal.so.4 is not "
                                                       "installed on this node; Debian/Ubuntu: libtcmalloc-minimal4)")
    with mock.patch("speccascade.serving.heap.allocator_installed", return_value=True):
        assert describe_allocator("auto", "glibc") == ("glibc allocator (auto: libtcmalloc_minimal.so.4 is installed "
                                                       "but was not preloaded into this process)")
    assert describe_allocator("auto", "tcmalloc") == "tcmalloc allocator (auto)"
    assert describe_allocator("jemalloc", "jemalloc") == "jemalloc allocator"


def test_auto_on_a_node_without_tcmalloc_starts_on_glibc():
    """The replica's environment preloads tcmalloc whatever the node has; where the loader cannot
    find it, the process starts anyway, on glibc's malloc, pinned."""
    missing = {**allocator_env("auto"), "LD_PRELOAD": "libspeccascade_absent_allocator.so.4"}
    probe = "from speccascade.serving.heap import prepare_allocator; print(prepare_allocator('auto'))"
    done = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, timeout=120,
                          env={**os.environ, **missing})
    assert done.returncode == 0, done.stderr
    assert done.stdout.split() == ["glibc"]
    assert "cannot be preloaded" in done.stderr  # the loader's warning; the replica's log says the rest


def test_served_tiers_run_on_the_allocators_and_kernel_caches_their_config_asks_for_and_answer_alike(
        local_stack, tiny_pair, tier_handles, local_engine):
    """auto (tcmalloc where installed) and the default kernel bound (the shared application);
    tcmalloc and jemalloc preloaded, and other bounds set, in another application's tier processes
    through their runtime environment, answering the same tokens."""
    from ray import serve
    from speccascade.api.client import SpecCascadeClient
    from speccascade.config.app import TierConfig

    from ..served import PROMPT, app_args, in_process_policy

    auto = "tcmalloc" if allocator_installed("tcmalloc") else "glibc"
    for name in ("Drafter", "Expert"):
        stats = tier_handles[name].batch_stats.remote().result()
        assert (stats["allocator"], stats["kernel_cache"], stats["cpu_spin"]) == (
            auto, TierConfig.model_fields["cpu_kernel_cache"].default, TierConfig.model_fields["cpu_spin_count"].default)
    # Tier answers arrive in the router's heap: it runs on the same allocator.
    assert tier_handles["Router"].process_stats.remote().result().allocator == auto
    asked = {"drafter": {"allocator": "tcmalloc", "cpu_kernel_cache": 1, "cpu_spin_count": 0},
             "expert": {"allocator": "jemalloc", "cpu_kernel_cache": 64, "cpu_spin_count": 300_000}}
    for settings in asked.values():
        if not allocator_installed(settings["allocator"]):
            pytest.skip(f"{heap.ALLOCATOR_LIBRARIES[settings['allocator']]} is not installed")
    name = "speccascade-allocators"
    endpoints = local_stack.deploy(app_args(*tiny_pair, **asked), name=name, route_prefix=f"/{name}")
    try:
        for tier, settings in asked.items():
            stats = serve.get_deployment_handle(tier.capitalize(), app_name=name).batch_stats.remote().result()
            assert (stats["allocator"], stats["kernel_cache"], stats["cpu_spin"]) == (
                settings["allocator"], settings["cpu_kernel_cache"], settings["cpu_spin_count"])
        with SpecCascadeClient(endpoints.grpc_target, application=name) as client:
            for rule, alpha, sampling in (("lossless", 0.0, {}), ("token", 0.3, dict(temperature=0.7, top_p=0.95))):
                options = dict(seed=5, max_new_tokens=24)
                served = client.generate(prompt=PROMPT, rule=rule, alpha=alpha, block_size=4, **options, **sampling)
                expected = in_process_policy(local_engine, "cascade", rule, alpha, sampling, **options)
                assert list(served.token_ids) == expected.token_ids
    finally:
        serve.delete(name)
