"""`speccascade generate`: run the in-process engine on a prompt, streaming the text coloured by
which model produced each token, then print the request's stats."""

from __future__ import annotations

import argparse
import json
from pathlib import Path

DEMO_PROMPT = "Write a Python function that returns the n-th Fibonacci number, with a docstring."


def add_generation_arguments(parser: argparse.ArgumentParser) -> None:
    """Request options shared by every command that sends a generation request."""
    from ..options import (
        DEFAULT_ALPHA,
        DEFAULT_BLOCK_SIZE,
        DEFAULT_MAX_NEW_TOKENS,
        DEFAULT_RULE,
        Method,
        Pipeline,
        Rule,
    )

    parser.add_argument("prompt", nargs="?", help=f"prompt text (default: a demo chat request: {DEMO_PROMPT!r})")
    parser.add_argument("--raw", action="store_true", help="send the prompt as is (completion) instead of as a chat message")
    parser.add_argument("--system", help="system message for chat requests")
    parser.add_argument("--messages", type=Path, help="JSON file with a list of {role, content} chat messages")
    parser.add_argument("--method", default="cascade", choices=[m.value for m in Method],
                        help="speculative cascade (default) or a baseline")
    parser.add_argument("--rule", default=DEFAULT_RULE.value, choices=[r.value for r in Rule], help="deferral rule")
    parser.add_argument("--alpha", type=float, default=DEFAULT_ALPHA, help="trade-off knob; larger is more lenient")
    parser.add_argument("--block-size", "-g", type=int, default=DEFAULT_BLOCK_SIZE, help="drafted tokens per round (gamma)")
    parser.add_argument("--max-new-tokens", "-n", type=int, default=DEFAULT_MAX_NEW_TOKENS)
    parser.add_argument("--temperature", "-t", type=float, default=0.0, help="0 = greedy")
    parser.add_argument("--top-k", type=int, default=0)
    parser.add_argument("--top-p", type=float, default=1.0)
    parser.add_argument("--seed", type=int, help="same seed, same output")
    parser.add_argument("--stop", action="append", default=[], help="stop string (repeatable)")
    parser.add_argument("--ignore-eos", action="store_true",
                        help="the end-of-sequence token does not end the output: run to --max-new-tokens")
    parser.add_argument("--min-tokens", type=int, default=0,
                        help="no end-of-sequence token and no stop string before this many tokens")
    parser.add_argument("--keep-special-tokens", action="store_true",
                        help="keep special tokens in the text (they are left out by default)")
    parser.add_argument("--pipeline", choices=[p.value for p in Pipeline],
                        help="draft the next block while the expert verifies (the same output; default: off "
                             "in-process, the server's when served)")


def request_from_args(args: argparse.Namespace):
    from ..engine.request import GenerationRequest
    from ..options import SamplingParams

    if args.messages is not None:
        messages = json.loads(args.messages.read_text())
        prompt = None
    elif args.raw:
        if not args.prompt:
            raise ValueError("--raw needs a prompt")
        messages, prompt = None, args.prompt
    else:
        messages = ([{"role": "system", "content": args.system}] if args.system else []) + [
            {"role": "user", "content": args.prompt or DEMO_PROMPT}
        ]
        prompt = None
    return GenerationRequest(
        prompt=prompt, messages=messages, method=args.method, rule=args.rule, alpha=args.alpha,
        block_size=args.block_size, max_new_tokens=args.max_new_tokens,
        sampling=SamplingParams(temperature=args.temperature, top_k=args.top_k, top_p=args.top_p),
        seed=args.seed, stop=tuple(args.stop), ignore_eos=args.ignore_eos, min_tokens=args.min_tokens,
        skip_special_tokens=not args.keep_special_tokens, **({"pipeline": args.pipeline} if args.pipeline else {}),
    )


SOURCE_STYLES = {"drafter": "cyan", "expert": "bold magenta"}


def print_legend(console) -> None:
    console.print("[dim]tokens from[/] [cyan]drafter[/] [dim]/[/] [bold magenta]expert[/]")


def print_segment(console, text: str, source: str) -> None:
    from rich.text import Text

    console.print(Text(text, style=SOURCE_STYLES.get(source, "")), end="", soft_wrap=True, highlight=False)


def print_stats(console, stats: dict, *, finish_reason: str, seed: int, prompt_tokens: int) -> None:
    from rich.table import Table

    drafted = stats.get("drafted", 0)
    out_tokens = stats.get("tokens_from_drafter", 0) + stats.get("tokens_from_expert", 0)
    wall = stats.get("wall_seconds", 0.0)
    table = Table(title="stats", show_header=False, box=None, padding=(0, 2))
    rows = [
        ("finish", f"{finish_reason} (seed {seed}, prompt {prompt_tokens} tokens)"),
        ("tokens", f"{out_tokens} = {stats.get('tokens_from_drafter', 0)} drafter + {stats.get('tokens_from_expert', 0)} expert"),
        ("speed", f"{out_tokens / wall:.2f} tok/s over {wall:.2f} s" if wall else "-"),
        ("rounds", str(stats.get("rounds", 0))),
        ("drafted / accepted", f"{drafted} / {stats.get('accepted', 0)}"
                               + (f" ({stats.get('accepted', 0) / drafted:.0%})" if drafted else "")),
        ("deferred positions", f"{stats.get('deferred', 0)}" + (f" ({stats.get('deferred', 0) / drafted:.0%})" if drafted else "")),
        ("corrected / bonus", f"{stats.get('corrected', 0)} / {stats.get('bonus', 0)}"),
        ("skipped blocks", str(stats.get("skipped_blocks", 0))),
        ("passes", f"drafter {stats.get('drafter_passes', 0)}, expert {stats.get('expert_passes', 0)}"),
        ("time", f"drafter {stats.get('drafter_seconds', 0):.2f} s, expert {stats.get('expert_seconds', 0):.2f} s, "
                 f"other {stats.get('other_seconds', 0):.2f} s"),
    ]
    for key, value in rows:
        table.add_row(f"[dim]{key}[/]", value)
    console.print(table)


def run(args: argparse.Namespace) -> int:
    from rich.console import Console

    from ..engine.engine import CascadeEngine

    request = request_from_args(args)  # validate before loading models
    console = Console(no_color=args.no_color, highlight=False)
    err = Console(stderr=True)
    with err.status(f"loading {args.drafter or 'default drafter'} + {args.expert or 'default expert'} "
                    f"({args.dtype}, {args.backend} backend, device {args.device})"):
        engine = CascadeEngine.load(args.drafter, args.expert, dtype=args.dtype, backend=args.backend,
                                    device=args.device)
    if args.json:
        result = engine.generate(request)
        print(json.dumps({"text": result.text, "token_ids": result.token_ids,
                          "sources": [s.value for s in result.sources], "finish_reason": result.finish_reason,
                          "seed": result.seed, "stats": result.stats.as_dict()}))
        return 0
    print_legend(err)
    for chunk in engine.stream(request):
        for segment in chunk.segments:
            print_segment(console, segment.text, segment.source.value)
        if chunk.result is not None:
            console.print()
            r = chunk.result
            print_stats(err, r.stats.as_dict(), finish_reason=r.finish_reason, seed=r.seed, prompt_tokens=r.prompt_tokens)
    return 0


def register(subparsers) -> None:
    from ..config.app import DTYPE_NAMES
    from .serve import add_execution_arguments

    parser = subparsers.add_parser("generate", help="generate text in-process with a speculative cascade")
    add_generation_arguments(parser)
    parser.add_argument("--drafter", help="drafter model source (default: packaged Qwen2.5-Coder-0.5B-Instruct)")
    parser.add_argument("--expert", help="expert model source (default: packaged Qwen2.5-Coder-1.5B-Instruct)")
    parser.add_argument("--dtype", default="auto", choices=DTYPE_NAMES,
                        help="auto: bf16 on GPUs and CPUs with bf16 matrix units, else fp32")
    add_execution_arguments(parser, overrides_config=False)
    parser.add_argument("--json", action="store_true", help="print one JSON object instead of streaming")
    parser.add_argument("--no-color", action="store_true", help="plain text output")
    parser.set_defaults(handler=run)
