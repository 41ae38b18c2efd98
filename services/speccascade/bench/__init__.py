"""Benchmarks; each module exposes register(subparsers) for `speccascade bench NAME`."""
