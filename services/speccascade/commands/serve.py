"""`speccascade serve`: start a local Ray cluster and the speccascade application with its gRPC
port and its OpenAI-compatible HTTP API open, print how to call both, and run until Ctrl-C."""

from __future__ import annotations

import argparse
import signal
import threading
from pathlib import Path


def add_execution_arguments(parser: argparse.ArgumentParser, *, overrides_config: bool) -> None:
    """--backend and --device, for every command that runs the models (for `serve` they override
    the Serve config's values for both tiers)."""
    from ..config.app import BACKEND_KINDS

    suffix = "; overrides the config for both tiers" if overrides_config else ""
    parser.add_argument("--backend", choices=BACKEND_KINDS, default=None if overrides_config else "hf",
                        help="model execution: hf (transformers, dynamic caches) or static (preallocated slots, "
                             "CUDA graphs on GPUs)" + suffix)
    parser.add_argument("--device", default=None if overrides_config else "auto",
                        help="auto (CUDA when present), cpu, cuda or cuda:N" + suffix)


def positive_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        value = 0
    if value < 1:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {text!r}")
    return value


def non_negative_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        value = -1
    if value < 0:
        raise argparse.ArgumentTypeError(f"expected an integer >= 0, got {text!r}")
    return value


def add_tier_process_arguments(parser: argparse.ArgumentParser, *, when: str = "") -> None:
    """--allocator, --cpu-kernel-cache and --cpu-spin-count: how both tiers' processes run, over the
    Serve config's values (`when`: a condition for the help, e.g. " when starting here")."""
    from ..config.app import ALLOCATOR_NAMES

    parser.add_argument("--allocator", choices=ALLOCATOR_NAMES,
                        help=f"both tiers' C allocator{when} (TierConfig.allocator; default: the config's)")
    parser.add_argument("--cpu-kernel-cache", type=positive_int, metavar="N",
                        help=f"compiled CPU matmul kernels both tiers keep per cache{when} "
                             "(TierConfig.cpu_kernel_cache; default: the config's)")
    parser.add_argument("--cpu-spin-count", type=non_negative_int, metavar="N",
                        help=f"how many times both tiers' idle OpenMP threads spin before they sleep{when} "
                             "(TierConfig.cpu_spin_count; default: the config's)")


def tier_process_overrides(args: argparse.Namespace) -> dict:
    """The `ServeOverrides` fields that add_tier_process_arguments' flags set."""
    from ..app.launcher import TIER_PROCESS_OPTIONS

    return {option: getattr(args, option) for option in TIER_PROCESS_OPTIONS}


def usage(endpoints) -> str:
    """How to call the running service: gRPC (CLI, grpcurl) and the OpenAI API (Python, curl)."""
    from ..frontends.openai.protocol import SERVED_MODEL

    target, base_url = endpoints.grpc_target, endpoints.openai_base_url
    return f"""call it over gRPC:
  speccascade client --target {target} 'Write a Python function that reverses a string.'
  grpcurl -plaintext {target} list
  grpcurl -plaintext {target} grpc.health.v1.Health/Check
  grpcurl -plaintext -d '{{"prompt": "def fib(n):", "max_new_tokens": 32}}' {target} speccascade.v1.SpecCascade/Generate

or with an OpenAI client (model "{SERVED_MODEL}"; the cascade policy goes in extra_body):
  from openai import OpenAI
  client = OpenAI(base_url="{base_url}", api_key="unused")  # a tenant's key where tenants are set up
  stream = client.chat.completions.create(
      model="{SERVED_MODEL}", messages=[{{"role": "user", "content": "Reverse a string in Python."}}],
      max_tokens=64, stream=True, extra_body={{"rule": "chow", "alpha": 0.3}})
  for chunk in stream:
      if chunk.choices:
          print(chunk.choices[0].delta.content or "", end="", flush=True)

  curl {base_url}/chat/completions -H 'Content-Type: application/json' \\
    -d '{{"model": "{SERVED_MODEL}", "messages": [{{"role": "user", "content": "def fib(n):"}}], "rule": "token", "alpha": 0.5}}'
"""


def overrides_of(args: argparse.Namespace):
    """The command line's changes to the Serve config's application."""
    from ..app.launcher import ServeOverrides

    return ServeOverrides(drafter=args.drafter, expert=args.expert, dtype=args.dtype, backend=args.backend,
                          device=args.device, tenants_file=getattr(args, "tenants", None),
                          **tier_process_overrides(args))


def run(args: argparse.Namespace) -> int:
    from rich.console import Console

    from ..app.launcher import SERVE_SHUTDOWN_WAIT_S, start_serve_config

    console = Console(stderr=True, highlight=False)
    overrides = overrides_of(args)
    with console.status("starting Ray and the speccascade application (loading both tiers)..."):
        launched = start_serve_config(args.config, overrides, grpc_port=args.grpc_port, http_port=args.http_port,
                                      num_cpus=args.num_cpus, log_to_driver=args.verbose)
    endpoints = launched.endpoints
    # soft_wrap: commands and code are printed whole, to be copied, however narrow the terminal.
    console.print(f"[bold green]speccascade is serving[/] gRPC on [bold]{endpoints.grpc_target}[/] and the "
                  f"OpenAI API on [bold]{endpoints.openai_base_url}[/] (application {endpoints.app_name!r})\n",
                  soft_wrap=True)
    tenants_file = launched.config.tenancy.tenants_file
    if tenants_file:
        console.print(f"tenants from {tenants_file}: every call needs a key (--api-key or SPECCASCADE_API_KEY; "
                      "the OpenAI client's api_key)\n", soft_wrap=True)
    else:
        console.print("[yellow]no tenants file: the service answers anyone who reaches it[/] "
                      "(speccascade serve --tenants FILE)\n", soft_wrap=True)
    console.print(usage(endpoints), markup=False, soft_wrap=True)
    console.print("Ctrl-C to stop.")
    signals = ShutdownSignals()
    try:
        signals.wait_first()
    finally:
        drain = min(launched.config.router.drain_timeout_s, SERVE_SHUTDOWN_WAIT_S)
        console.print(f"\nshutting down: streams still running get up to {drain:g}s to finish "
                      f"(router.drain_timeout_s, at most {SERVE_SHUTDOWN_WAIT_S:g}s here); Ctrl-C again to cut "
                      "them off now", soft_wrap=True)
        if stop_gracefully_unless_signalled(launched.stack, signals):
            console.print("stopped.")
        else:
            console.print("stopped at once: streams still running were cut off.")
    return 0


class ShutdownSignals:
    """Ctrl-C and SIGTERM for a foreground command, as uvicorn and vLLM take them: the first asks for a
    graceful stop (`first`), a second one cuts that stop short (`second`). The handlers only set
    these events: nothing is raised into whatever the main thread runs (an exception raised inside
    Ray's blocking calls comes out mangled, after their own timeout). Installed from the main
    thread; `restore` puts the previous handlers back."""

    SIGNALS = (signal.SIGINT, signal.SIGTERM)

    def __init__(self):
        self.first = threading.Event()
        self.second = threading.Event()
        self._previous = {signum: signal.signal(signum, self._on_signal) for signum in self.SIGNALS}

    def _on_signal(self, signum, frame) -> None:
        (self.second if self.first.is_set() else self.first).set()

    def ask_to_stop(self) -> None:
        """A stop asked for otherwise (the command's work is done): the next signal cuts it short."""
        self.first.set()

    def wait_first(self) -> None:
        """Until the first signal (a short timeout per wait, so that the handler gets to run)."""
        while not self.first.wait(timeout=1.0):
            pass

    def restore(self) -> None:
        for signum, handler in self._previous.items():
            signal.signal(signum, handler)


def stop_gracefully_unless_signalled(stack, signals: ShutdownSignals) -> bool:
    """Stop `stack` gracefully (`LocalStack.stop`: Serve drains, then the cluster stops) on another
    thread; a second signal, before or meanwhile, stops the cluster at once from this one
    (`stop_now`), which also ends the graceful stop's wait. From the second signal on, the
    process's own handlers are back: should the forced stop hang, a third Ctrl-C interrupts it and
    SIGTERM ends the process. True when the graceful stop ran to its end; its error, if it raised
    one, is raised here."""
    if signals.second.is_set():
        signals.restore()
        stack.stop_now()
        return False
    failures: list[BaseException] = []

    def stop() -> None:
        try:
            stack.stop()
        except SystemExit:  # Ray's answer to a wait whose cluster `stop_now` took away
            pass
        except BaseException as error:
            failures.append(error)

    graceful = threading.Thread(target=stop, name="graceful-stop", daemon=True)
    graceful.start()
    while graceful.is_alive():
        if signals.second.wait(timeout=0.2):
            signals.restore()
            stack.stop_now()
            graceful.join(timeout=10.0)
            stack.stop_now()  # a cluster the graceful stop's Serve call may have connected to meanwhile
            return False
    if failures:
        raise failures[0]
    return True


def register(subparsers) -> None:
    from ..config.app import DTYPE_NAMES

    parser = subparsers.add_parser("serve", help="serve the cascade over gRPC and the OpenAI API on a local Ray cluster")
    parser.add_argument("--config", type=Path, help="Serve config (default: deploy/local-cpu.yaml)")
    parser.add_argument("--drafter", help="override the drafter model source")
    parser.add_argument("--expert", help="override the expert model source")
    parser.add_argument("--dtype", choices=DTYPE_NAMES, help="override both tiers' dtype (auto: bf16 on GPUs and "
                                                             "CPUs with bf16 matrix units, else fp32)")
    add_execution_arguments(parser, overrides_config=True)
    add_tier_process_arguments(parser)
    parser.add_argument("--tenants", type=Path, help="tenants file: every call then needs a tenant's API key "
                                                     "(`speccascade tenants add` writes it; reloaded when it changes)")
    parser.add_argument("--grpc-port", type=int, help="override the gRPC port (default from the config: 9000)")
    parser.add_argument("--http-port", type=int, help="override the HTTP port")
    parser.add_argument("--num-cpus", type=int, default=None, help="CPUs of the local Ray cluster")
    parser.set_defaults(handler=run)
