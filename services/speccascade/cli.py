"""`speccascade` command line. Each command lives in its own module with a
`register(subparsers)` function; this file only assembles them."""

from __future__ import annotations

import argparse
import importlib
import logging
import sys

# Top-level commands and `bench` sub-commands, by module. Modules are imported lazily at start-up,
# so a command's heavy imports (torch, ray) stay inside its handler.
COMMANDS = ["speccascade.commands.generate", "speccascade.commands.serve", "speccascade.commands.client", "speccascade.commands.health", "speccascade.commands.k8s", "speccascade.commands.status", "speccascade.commands.tenants"]
BENCHMARKS = ["speccascade.bench.engine", "speccascade.bench.backend.cli", "speccascade.bench.tenants", "speccascade.bench.serve.cli", "speccascade.bench.tradeoff.cli", "speccascade.bench.autoscale.cli", "speccascade.bench.soak.cli"]


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="speccascade", description=__doc__.splitlines()[0])
    parser.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for name in COMMANDS:
        importlib.import_module(name).register(commands)
    bench = commands.add_parser("bench", help="benchmarks that print side-by-side figures")
    benches = bench.add_subparsers(dest="benchmark", required=True, metavar="BENCHMARK")
    for name in BENCHMARKS:
        importlib.import_module(name).register(benches)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.DEBUG if args.verbose else logging.WARNING,
                        format="%(levelname)s %(name)s: %(message)s")
    try:
        return int(args.handler(args) or 0)
    except KeyboardInterrupt:
        return 130
    except ValueError as error:  # bad arguments, named by the code that checked them
        print(f"speccascade: error: {error}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
