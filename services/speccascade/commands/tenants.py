"""`speccascade tenants add | rotate | disable | enable | list`: edit a tenants file. A new key is
printed once and only its sha256 digest is stored; the router reloads the file when it changes."""

from __future__ import annotations

import argparse
import os
from pathlib import Path

DEFAULT_FILE_ENV = "SPECCASCADE_TENANTS_FILE"


def _file(args: argparse.Namespace) -> Path:
    if args.file is not None:
        return args.file
    if os.environ.get(DEFAULT_FILE_ENV):
        return Path(os.environ[DEFAULT_FILE_ENV])
    raise ValueError(f"which tenants file? give --file PATH (or set {DEFAULT_FILE_ENV})")


def _load(path: Path, *, create: bool = False):
    from ..tenancy import TenantsFile

    if create and not path.exists():
        return TenantsFile()
    return TenantsFile.load(path)


def _print_key(tenant_id: str, key: str) -> None:
    print(f"API key for tenant {tenant_id!r} (shown once; only its sha256 digest is stored):")
    print(key)


def add(args: argparse.Namespace) -> int:
    from pydantic import ValidationError

    from ..tenancy import Tenant, key_digest, new_api_key

    path = _file(args)
    tenants = _load(path, create=True)
    if any(t.id == args.tenant for t in tenants.tenants):
        raise ValueError(f"tenant {args.tenant!r} already exists in {str(path)!r}; use `rotate` for a new key")
    key = new_api_key()
    limits = {name: value for name, value in (("max_concurrent_requests", args.max_concurrent),
                                               ("output_tokens_per_minute", args.tokens_per_minute),
                                               ("max_new_tokens", args.max_new_tokens)) if value is not None}
    policy = {}
    if args.rules:
        policy["rules"] = args.rules
    if args.methods:
        policy["methods"] = args.methods
    if args.alpha_range:
        low, high = args.alpha_range
        policy["alpha"] = {"min": low, "max": high}
    if args.default_rule:
        policy["default_rule"] = args.default_rule
    try:
        tenant = Tenant(id=args.tenant, key_sha256=[key_digest(key)], weight=args.weight, limits=limits,
                        policy=policy)
    except ValidationError as error:
        problems = "; ".join(f"{'.'.join(str(p) for p in e['loc'])}: {e['msg'].removeprefix('Value error, ')}"
                             for e in error.errors())
        raise ValueError(f"cannot add tenant {args.tenant!r}: {problems}") from None
    tenants.replace(tenant).save(path)
    _print_key(args.tenant, key)
    if args.default_rule is None:
        derived = tenant.policy.default_rule
        print(f"default rule of tenant {args.tenant!r}: " + (
            f"{derived.value} (the first of --rules; --default-rule chooses another)" if derived is not None
            else "the server's (policy.rule; --default-rule sets one)"))
    return 0


def rotate(args: argparse.Namespace) -> int:
    from ..tenancy import key_digest, new_api_key

    path = _file(args)
    tenants = _load(path)
    tenant = tenants.get(args.tenant)
    key = new_api_key()
    digests = [key_digest(key)] if args.revoke_old else [*tenant.key_sha256, key_digest(key)]
    tenants.replace(tenant.model_copy(update={"key_sha256": digests})).save(path)
    _print_key(args.tenant, key)
    if not args.revoke_old:
        print(f"the tenant's {len(tenant.key_sha256)} older key(s) still work: "
              f"`speccascade tenants rotate {args.tenant} --revoke-old` once clients have moved")
    return 0


def set_disabled(args: argparse.Namespace, disabled: bool) -> int:
    path = _file(args)
    tenants = _load(path)
    tenant = tenants.get(args.tenant)
    tenants.replace(tenant.model_copy(update={"disabled": disabled})).save(path)
    print(f"tenant {args.tenant!r} {'disabled' if disabled else 'enabled'} in {path}")
    return 0


def list_tenants(args: argparse.Namespace) -> int:
    from rich.console import Console
    from rich.table import Table

    tenants = _load(_file(args))
    table = Table(title=f"tenants in {_file(args)}")
    for column in ("tenant", "keys", "weight", "status", "limits", "policy"):
        table.add_column(column)
    for t in tenants.tenants:
        limits = ", ".join(f"{k}={v}" for k, v in t.limits.model_dump(exclude_none=True).items()) or "-"
        policy = ", ".join(f"{k}={v}" for k, v in t.policy.model_dump(mode="json", exclude_none=True).items()) or "-"
        table.add_row(t.id, str(len(t.key_sha256)), f"{t.weight:g}", "disabled" if t.disabled else "enabled",
                      limits, policy)
    Console().print(table)
    return 0


def register(subparsers) -> None:
    from ..options import Method, Rule

    parser = subparsers.add_parser("tenants", help="add, rotate, disable or list tenants in a tenants file")
    actions = parser.add_subparsers(dest="action", required=True, metavar="ACTION")

    def with_file(sub):
        sub.add_argument("--file", "-f", type=Path, help=f"the tenants file (default: ${DEFAULT_FILE_ENV})")
        return sub

    new = with_file(actions.add_parser("add", help="add a tenant and print its first API key"))
    new.add_argument("tenant", help="tenant id (lowercase letters, digits, . _ -)")
    new.add_argument("--weight", type=float, default=1.0, help="fair-share weight under contention")
    new.add_argument("--max-concurrent", type=int, help="requests in flight at once")
    new.add_argument("--tokens-per-minute", type=int, help="output tokens per minute")
    new.add_argument("--max-new-tokens", type=int, help="largest max_new_tokens a request may ask for")
    new.add_argument("--rules", nargs="+", choices=[r.value for r in Rule], help="allowed rules, which also bound the methods (default: all)")
    new.add_argument("--methods", nargs="+", choices=[m.value for m in Method], help="allowed methods")
    new.add_argument("--alpha-range", nargs=2, type=float, metavar=("MIN", "MAX"), help="allowed alphas")
    new.add_argument("--default-rule", choices=[r.value for r in Rule],
                     help="rule of requests that set none (default: the first of --rules)")
    new.set_defaults(handler=add)

    turn = with_file(actions.add_parser("rotate", help="give a tenant a new API key (printed once)"))
    turn.add_argument("tenant")
    turn.add_argument("--revoke-old", action="store_true", help="the new key replaces every older one")
    turn.set_defaults(handler=rotate)

    off = with_file(actions.add_parser("disable", help="refuse a tenant's requests (PERMISSION_DENIED)"))
    off.add_argument("tenant")
    off.set_defaults(handler=lambda args: set_disabled(args, True))
    on = with_file(actions.add_parser("enable", help="accept a disabled tenant's requests again"))
    on.add_argument("tenant")
    on.set_defaults(handler=lambda args: set_disabled(args, False))

    with_file(actions.add_parser("list", help="tenants, key counts, weights, limits (never keys)")).set_defaults(
        handler=list_tenants)
