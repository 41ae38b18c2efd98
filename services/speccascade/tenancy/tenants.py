"""Tenants: who may call, with which keys, under which policy and limits.

A tenants file (YAML) lists tenants; each has an id, the sha256 digests of its API keys (several,
so a key can be rotated without downtime), a fair-share weight, limits and a policy:

    tenants:
      - id: acme
        key_sha256: [3f5c...]             # `speccascade tenants add acme` prints a key once, stores this
        weight: 2.0                       # share of the tiers under contention, relative to others
        limits: {max_concurrent_requests: 8, output_tokens_per_minute: 20000, max_new_tokens: 1024}
        policy:
          rules: [lossless]               # held to the expert's exact distribution, whatever the method
          default_rule: lossless          # unset: the first of `rules`

Keys are never stored or logged in clear: a request's key is hashed and the digest compared with
every stored digest in constant time. `TenantRegistry.admit` authenticates a request's key and
checks the request against its tenant's policy; its errors say which status a caller should answer
with (UNAUTHENTICATED, PERMISSION_DENIED naming the field).
"""

from __future__ import annotations

import hashlib
import hmac
import os
import secrets
import tempfile
from pathlib import Path

import yaml
from pydantic import Field, ValidationError, field_validator, model_validator

from ..config.base import StrictModel
from ..engine.request import GenerationRequest
from ..options import Method, Rule, equivalent_cascades, validate_alpha

KEY_PREFIX = "sc-"  # makes a leaked key recognisable in logs and secret scanners
DIGEST_PATTERN = r"^[0-9a-f]{64}$"
TENANT_ID_PATTERN = r"^[a-z0-9][a-z0-9._-]{0,62}$"


class TenancyError(Exception):
    """Base of the errors a caller turns into a status code; `reason` is a metric label, `status`
    the gRPC status name (every protocol's metrics count outcomes under those names)."""

    reason = "refused"
    status = "PERMISSION_DENIED"

    def __init__(self, message: str, *, reason: str | None = None):
        super().__init__(message)
        if reason is not None:
            self.reason = reason


class Unauthenticated(TenancyError):
    """No key, or a key no tenant has (gRPC UNAUTHENTICATED, HTTP 401)."""

    reason = "unauthenticated"
    status = "UNAUTHENTICATED"


class MissingKey(Unauthenticated):
    """A request that carries no API key. The message says only that: how to send one depends on
    the protocol (gRPC metadata, an HTTP header), so each front-end adds it."""


class PermissionDenied(TenancyError):
    """A disabled tenant (reason "disabled"), or a request outside its tenant's allowance ("policy"):
    gRPC PERMISSION_DENIED, HTTP 403."""

    reason = "policy"


def new_api_key() -> str:
    return KEY_PREFIX + secrets.token_urlsafe(32)


def key_digest(key: str) -> str:
    return hashlib.sha256(key.encode()).hexdigest()


class AlphaRange(StrictModel):
    min: float = Field(description="Smallest alpha a request may ask for.")
    max: float = Field(description="Largest alpha a request may ask for.")

    @model_validator(mode="after")
    def _ordered(self) -> "AlphaRange":
        if not self.min <= self.max:
            raise ValueError(f"alpha range min={self.min} is above max={self.max}")
        return self

    def __str__(self) -> str:
        return f"[{self.min:g}, {self.max:g}]"


class TenantLimits(StrictModel):
    max_concurrent_requests: int | None = Field(None, ge=1, description="Requests in flight at once (unset: no limit).")
    output_tokens_per_minute: int | None = Field(
        None, ge=1, description="Output tokens per minute, for the whole application (unset: no limit).")
    max_new_tokens: int | None = Field(None, ge=1, description="Largest max_new_tokens a request may ask for.")


class TenantPolicy(StrictModel):
    """What a tenant may ask for, and its defaults for requests that do not say.

    `rules` bound the output a tenant gets, whatever the method: a baseline method is allowed only
    when its output is that of a speculative cascade with an allowed rule, at an alpha the tenant
    may ask for (`options.equivalent_cascades`). Held to `lossless`, a tenant may use the cascade
    with `lossless` and expert-only decoding; drafter-only (chow at alpha 1) and the token-level
    cascade (chow) need `chow`; the sequence-level cascade, which carries no rule's guarantee,
    needs `rules` unset."""

    rules: list[Rule] | None = Field(None, description="Rules it may ask for (unset: every rule).")
    methods: list[Method] | None = Field(None, description="Methods it may ask for (unset: every method whose "
                                                           "output follows an allowed rule).")
    alpha: AlphaRange | None = Field(None, description="Alphas it may ask for (unset: each rule's whole range).")
    default_rule: Rule | None = Field(None, description="Rule of requests that set none (unset: the first of "
                                                        "`rules`; without `rules`, the server's).")
    default_alpha: float | None = Field(None, description="Alpha of requests that set none (unset: the server's).")
    default_block_size: int | None = Field(None, ge=1, le=64, description="Block size of requests that set none.")

    @field_validator("rules", "methods")
    @classmethod
    def _not_empty(cls, value):
        if value is not None and not value:
            raise ValueError("an empty list allows nothing; leave it unset to allow everything")
        return value

    @model_validator(mode="before")
    @classmethod
    def _default_rule_from_rules(cls, data):
        """A tenant held to some rules defaults to the first of them: the server's default rule may
        be one it is not allowed, which would refuse every request that names no rule."""
        if isinstance(data, dict) and data.get("default_rule") is None and isinstance(data.get("rules"), list) \
                and data["rules"]:
            try:
                first = Rule.parse(data["rules"][0])
            except ValueError:
                return data  # the rules' own validation names it
            return {**data, "default_rule": first}
        return data

    @model_validator(mode="after")
    def _defaults_allowed(self) -> "TenantPolicy":
        if self.default_rule is not None and self.rules is not None and self.default_rule not in self.rules:
            raise ValueError(f"default_rule={self.default_rule.value!r} is not among the allowed rules "
                             f"{[r.value for r in self.rules]}")
        if self.default_alpha is not None:
            if self.default_rule is not None:
                validate_alpha(self.default_rule, self.default_alpha)
            if self.alpha is not None and not self.alpha.min <= self.default_alpha <= self.alpha.max:
                raise ValueError(f"default_alpha={self.default_alpha} is outside the allowed alpha {self.alpha}")
        return self

    @model_validator(mode="after")
    def _methods_usable(self) -> "TenantPolicy":
        if self.methods is not None:
            usable = self.usable_methods()
            unusable = [m for m in self.methods if m not in usable]
            if unusable:
                raise ValueError(f"methods {[m.value for m in unusable]} can never be used under {self.allowance()}: "
                                 + "; ".join(f"the output of {m.value!r} {output_of(m)}" for m in unusable))
        return self

    def allows(self, rule: Rule, alpha: float) -> bool:
        """Whether a cascade with this rule and alpha is within the allowance (lossless ignores alpha)."""
        if self.rules is not None and rule not in self.rules:
            return False
        return rule is Rule.LOSSLESS or self.alpha is None or self.alpha.min <= alpha <= self.alpha.max

    def allows_method(self, method: Method, rule: Rule, alpha: float) -> bool:
        """Whether a request of `method` (with its `rule` and `alpha`) gets output this allowance
        allows. The sequence-level cascade follows no rule: only a tenant held to none may use it."""
        if method is Method.SEQUENCE_CASCADE:
            return self.rules is None
        return any(self.allows(r, a) for r, a in equivalent_cascades(method, rule, alpha))

    def usable_methods(self) -> list[Method]:
        """The methods some request of this tenant may use: those listed (or every one) whose output is
        allowed for a request at the first allowed rule and the lowest allowed alpha."""
        rule = self.rules[0] if self.rules else Rule.LOSSLESS
        alpha = self.alpha.min if self.alpha is not None else 0.0
        return [method for method in Method if (self.methods is None or method in self.methods)
                and self.allows_method(method, rule, alpha)]

    def allowance(self) -> str:
        """The rules and alphas allowed, in words."""
        rules = f"rules {', '.join(r.value for r in self.rules)}" if self.rules is not None else "every rule"
        return rules + (f" with alpha in {self.alpha}" if self.alpha is not None else "")


def output_of(method: Method, alpha: float | None = None) -> str:
    """What a method's output is, for messages; `alpha`: the request's (None: any request's)."""
    if method is Method.CASCADE:
        return "is its rule's"
    cascades = equivalent_cascades(method, Rule.LOSSLESS, 0.0 if alpha is None else alpha)
    if not cascades:
        return "carries no rule's guarantee (it keeps or replaces whole answers)"
    if alpha is None and method is Method.TOKEN_CASCADE:
        return "is that of chow at the request's alpha"
    return "is that of " + " or ".join(r.value if r is Rule.LOSSLESS else f"{r.value} at alpha={a:g}"
                                      for r, a in cascades)


class Tenant(StrictModel):
    id: str = Field(pattern=TENANT_ID_PATTERN, description="Tenant id: metric label and log name (never a key).")
    key_sha256: list[str] = Field(min_length=1, description="sha256 hex digests of the tenant's API keys.")
    weight: float = Field(1.0, gt=0, le=1000, description="Fair-share weight under contention.")
    disabled: bool = Field(False, description="A disabled tenant's requests are refused (PERMISSION_DENIED).")
    limits: TenantLimits = Field(default_factory=TenantLimits, description="Quotas.")
    policy: TenantPolicy = Field(default_factory=TenantPolicy, description="Allowed rules, methods, alphas; defaults.")

    @field_validator("key_sha256")
    @classmethod
    def _digests(cls, value: list[str]) -> list[str]:
        import re

        for digest in value:
            if not re.match(DIGEST_PATTERN, digest):
                raise ValueError(f"key_sha256 entries are 64 lowercase hex characters (a sha256 digest, never the "
                                 f"key itself); got one of {len(digest)} characters")
        return value

    def check(self, request: GenerationRequest) -> None:
        """Refuse a request outside this tenant's allowance, naming the field."""
        policy, method = self.policy, request.method
        if policy.methods is not None and method not in policy.methods:
            raise PermissionDenied(f"policy.method={method.value!r} is not allowed for tenant {self.id!r} "
                                   f"(allowed: {', '.join(m.value for m in policy.methods)})")
        if method is Method.CASCADE and policy.rules is not None and request.rule not in policy.rules:
            raise PermissionDenied(f"policy.rule={request.rule.value!r} is not allowed for tenant {self.id!r} "
                                   f"(allowed: {', '.join(r.value for r in policy.rules)})")
        uses_alpha = request.rule is not Rule.LOSSLESS if method is Method.CASCADE else \
            method in (Method.TOKEN_CASCADE, Method.SEQUENCE_CASCADE)
        if uses_alpha and policy.alpha is not None and not policy.alpha.min <= request.alpha <= policy.alpha.max:
            raise PermissionDenied(f"policy.alpha={request.alpha:g} is outside the alpha {policy.alpha} allowed for "
                                   f"tenant {self.id!r}")
        if not policy.allows_method(method, request.rule, request.alpha):
            usable = ", ".join(m.value for m in policy.usable_methods())
            raise PermissionDenied(f"policy.method={method.value!r} is not allowed for tenant {self.id!r}: its output "
                                   f"{output_of(method, request.alpha)}, and the tenant is held to "
                                   f"{policy.allowance()} (methods it may use: {usable})")
        limit = self.limits.max_new_tokens
        if limit is not None and request.max_new_tokens > limit:
            raise PermissionDenied(f"max_new_tokens={request.max_new_tokens} is above tenant {self.id!r}'s limit "
                                   f"of {limit}")


class TenantsFile(StrictModel):
    tenants: list[Tenant] = Field(default_factory=list, description="Every tenant of the deployment.")

    @model_validator(mode="after")
    def _distinct(self) -> "TenantsFile":
        seen_ids: set[str] = set()
        owner: dict[str, str] = {}
        for tenant in self.tenants:
            if tenant.id in seen_ids:
                raise ValueError(f"tenant id {tenant.id!r} appears twice")
            seen_ids.add(tenant.id)
            for digest in tenant.key_sha256:
                if digest in owner:
                    raise ValueError(f"one key digest belongs to both {owner[digest]!r} and {tenant.id!r}")
                owner[digest] = tenant.id
        return self

    @classmethod
    def load(cls, path: str | Path) -> "TenantsFile":
        """Read and validate a tenants file; ValueError names the file and what is wrong."""
        path = Path(path)
        try:
            raw = yaml.safe_load(path.read_text())
        except OSError as error:
            raise ValueError(f"cannot read the tenants file {str(path)!r}: {error.strerror or error}") from None
        except yaml.YAMLError as error:
            raise ValueError(f"tenants file {str(path)!r} is not valid YAML: {error}") from None
        try:
            return cls.model_validate(raw if raw is not None else {})
        except ValidationError as error:
            problems = "; ".join(f"{'.'.join(str(p) for p in e['loc']) or 'file'}: {e['msg']}" for e in error.errors())
            raise ValueError(f"tenants file {str(path)!r} is invalid: {problems}") from None

    def save(self, path: str | Path) -> None:
        """Write atomically (a mounted Secret or a reader never sees half a file), owner-only."""
        path = Path(path)
        text = yaml.safe_dump(self.model_dump(mode="json", exclude_defaults=True), sort_keys=False)
        path.parent.mkdir(parents=True, exist_ok=True)
        handle, tmp = tempfile.mkstemp(prefix=f".{path.name}.", dir=path.parent)
        try:
            with os.fdopen(handle, "w") as out:
                out.write(text)
            os.chmod(tmp, 0o600)
            os.replace(tmp, path)
        except BaseException:
            Path(tmp).unlink(missing_ok=True)
            raise

    def get(self, tenant_id: str) -> Tenant:
        for tenant in self.tenants:
            if tenant.id == tenant_id:
                return tenant
        known = ", ".join(t.id for t in self.tenants) or "none"
        raise ValueError(f"no tenant {tenant_id!r} (tenants: {known})")

    def replace(self, tenant: Tenant) -> "TenantsFile":
        """This file with `tenant` added, or replacing the tenant of the same id."""
        others = [t for t in self.tenants if t.id != tenant.id]
        position = next((i for i, t in enumerate(self.tenants) if t.id == tenant.id), len(others))
        return TenantsFile(tenants=others[:position] + [tenant] + others[position:])


class TenantRegistry:
    """An immutable snapshot of the tenants, for authenticating requests."""

    def __init__(self, tenants: TenantsFile):
        self.file = tenants
        self._digests = [(digest, tenant) for tenant in tenants.tenants for digest in tenant.key_sha256]

    @property
    def tenants(self) -> list[Tenant]:
        return list(self.file.tenants)

    def authenticate(self, key: str | None) -> Tenant:
        """The tenant whose key this is. Every stored digest is compared, in constant time each, so
        the time taken says nothing about which digest (if any) matched."""
        if not key:
            raise MissingKey("missing API key")
        digest = key_digest(key).encode()
        found = None
        for stored, tenant in self._digests:
            if hmac.compare_digest(stored.encode(), digest):
                found = tenant
        if found is None:
            raise Unauthenticated("unknown API key")
        if found.disabled:
            raise PermissionDenied(f"tenant {found.id!r} is disabled", reason="disabled")
        return found
