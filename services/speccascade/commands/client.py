"""`speccascade client`: send a request to a running speccascade server, stream the answer
coloured by which model produced each piece, and print the request's stats."""

from __future__ import annotations

import argparse
import json


def run(args: argparse.Namespace) -> int:
    import grpc
    from google.protobuf.json_format import MessageToDict
    from rich.console import Console

    from ..api.client import FINISH_REASONS, SOURCES, SpecCascadeClient, build_request
    from .generate import print_legend, print_segment, print_stats, request_from_args

    local = request_from_args(args)  # the same validation as in-process, before any network call
    request = build_request(
        local.prompt, messages=local.messages, method=local.method.value, rule=local.rule.value, alpha=local.alpha,
        block_size=local.block_size, max_new_tokens=local.max_new_tokens,
        temperature=local.sampling.temperature, top_k=local.sampling.top_k, top_p=local.sampling.top_p,
        seed=args.seed, stop=local.stop, pipeline=args.pipeline, ignore_eos=local.ignore_eos,
        min_tokens=local.min_tokens, skip_special_tokens=local.skip_special_tokens,
    )
    console = Console(no_color=args.no_color, highlight=False)
    err = Console(stderr=True, highlight=False)
    try:
        with SpecCascadeClient(args.target, application=args.application, timeout=args.timeout,
                               api_key=args.api_key) as client:
            if args.json:
                response = client.generate(request)
                print(json.dumps(MessageToDict(response, preserving_proto_field_name=True)))
                return 0
            print_legend(err)
            call = client.stream(request, resume_attempts=args.resume_attempts)
            for chunk in call:
                for segment in chunk.segments:
                    print_segment(console, segment.text, SOURCES.get(segment.source, ""))
                if chunk.finish_reason:
                    console.print()
                    stats = {f.name: getattr(chunk.stats, f.name) for f in chunk.stats.DESCRIPTOR.fields}
                    stats["other_seconds"] = max(0.0, chunk.stats.wall_seconds - chunk.stats.drafter_seconds
                                                 - chunk.stats.expert_seconds)
                    print_stats(err, stats, finish_reason=FINISH_REASONS[chunk.finish_reason],
                                seed=chunk.stats.seed, prompt_tokens=chunk.usage.prompt_tokens)
                    rounds = max(chunk.stats.rounds, 1)
                    err.print(f"[dim]served:[/] {chunk.stats.wire_bytes / rounds:,.0f} bytes/round on the wire "
                              f"({(chunk.stats.wire_bytes - chunk.stats.context_bytes) / rounds:,.0f} without the "
                              f"resent context), {chunk.stats.tier_retries} tier retries"
                              + (", [bold yellow]expert-only (drafter tier down)[/]"
                                 if chunk.stats.expert_only_fallback else ""))
            if call.resumes:
                err.print(f"[dim]the stream broke off and was resumed {call.resumes} time(s); the output is the "
                          "same as an unbroken stream's (the stats above count the last part only)[/]")
    except grpc.RpcError as error:
        err.print(f"[bold red]{error.code().name}[/]: {error.details()}")
        return 1
    return 0


RESUME_ATTEMPTS = 8  # as speccascade.api.client (not imported here: the CLI starts without gRPC)


def register(subparsers) -> None:
    from .generate import add_generation_arguments
    from .serve import non_negative_int

    parser = subparsers.add_parser("client", help="stream a response from a running speccascade server")
    add_generation_arguments(parser)
    parser.add_argument("--target", default="localhost:9000", help="server address (default: localhost:9000)")
    parser.add_argument("--application", help="Serve application name, when the cluster runs several")
    parser.add_argument("--timeout", type=float, help="deadline in seconds")
    parser.add_argument("--api-key", help="API key of a tenant (default: $SPECCASCADE_API_KEY)")
    parser.add_argument("--resume-attempts", type=non_negative_int, default=RESUME_ATTEMPTS,
                        help="tries in a row to resume a stream that broke off (its router replica died, the "
                             f"connection was reset), where it stopped; 0: never (default: {RESUME_ATTEMPTS})")
    parser.add_argument("--json", action="store_true", help="print the unary response as JSON")
    parser.add_argument("--no-color", action="store_true", help="plain text output")
    parser.set_defaults(handler=run)
