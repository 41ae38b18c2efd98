"""Resume tokens: every streamed chunk carries one, and a request that sends it back continues the
stream where it broke off, on any router replica, token-identical to a stream that never broke.

A token is `sc1.<claims>.<signature>`: the claims (zlib-compressed JSON, base64url) are the request
id, the tenant, the position reached (output tokens delivered), the policy and seed the request
runs under, a digest of the rest of the request (prompt, sampling, limits, stop strings) and the
output delivered so far; the signature is HMAC-SHA256 over them with the application's key. The
output travels in the token because the router keeps nothing once a stream ends (its replica may
be gone): with it, any replica continues decoding after those tokens, and since every draw is
keyed by (seed, position, purpose) and chunks end at round boundaries, the continuation is the one
the broken stream would have sent (`TextGeneration.stream_rounds(delivered=...)`). It costs about
2 to 4 bytes per output token in each chunk.

The key is the same on every router replica of the application: read from the file
`router.resume_key_file` names (the Helm chart mounts it from a Secret), or, without one, drawn at
random once per Ray cluster and kept in Ray's key-value store (every router replica of the
application reads the same one; a new cluster, as a RayService upgrade makes, draws a new one, and
tokens of the old cluster are then refused). A token that does not verify, or that belongs to
another request, is a ValueError naming `resume_token` (INVALID_ARGUMENT / 400); one of another
tenant is refused as PERMISSION_DENIED / 403.
"""

from __future__ import annotations

import base64
import binascii
import dataclasses
import enum
import hashlib
import hmac
import json
import logging
import secrets
import uuid
import zlib
from dataclasses import dataclass
from pathlib import Path

from ..config.app import RouterConfig
from ..engine.request import GenerationRequest
from ..status_board import NAMESPACE
from ..tenancy import PermissionDenied

log = logging.getLogger(__name__)

PREFIX = "sc1"
MIN_KEY_BYTES = 32
MAX_TOKEN_CHARS = 1 << 20  # the longest output (MAX_NEW_TOKENS_CAP) fits with room to spare
FIELD = "resume_token"
# Request fields the token names one by one, so a changed one is named in the refusal; the rest
# of the request is in the digest. The pipelining mode changes no output: it may differ.
POLICY_FIELDS = ("method", "rule", "alpha", "block_size")
UNHASHED_FIELDS = ("seed", "pipeline", *POLICY_FIELDS)


def _b64encode(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode()


def _b64decode(text: str) -> bytes:
    return base64.urlsafe_b64decode(text + "=" * (-len(text) % 4))


def _plain(value):
    if isinstance(value, enum.Enum):
        return value.value
    if dataclasses.is_dataclass(value):
        return {f.name: _plain(getattr(value, f.name)) for f in dataclasses.fields(value)}
    if isinstance(value, (frozenset, set)):
        return sorted(_plain(v) for v in value)
    if isinstance(value, (list, tuple)):
        return [_plain(v) for v in value]
    if isinstance(value, dict):
        return {k: _plain(v) for k, v in value.items()}
    return value


def request_digest(request: GenerationRequest) -> str:
    """What the output depends on beyond the policy and the seed (prompt, sampling, limits, ...)."""
    fields = {f.name: _plain(getattr(request, f.name)) for f in dataclasses.fields(request)
              if f.name not in UNHASHED_FIELDS}
    return hashlib.sha256(json.dumps(fields, sort_keys=True, separators=(",", ":")).encode()).hexdigest()[:32]


def policy_of(request: GenerationRequest) -> dict:
    return {name: _plain(getattr(request, name)) for name in POLICY_FIELDS}


@dataclass(frozen=True)
class ResumePoint:
    """What a verified token says: a stream of request `request_id`, run for `tenant` under
    `policy` and `seed`, that delivered `output` (its position: len(output))."""

    request_id: str
    tenant: str
    policy: dict
    seed: int
    digest: str
    output: tuple[int, ...]

    @property
    def position(self) -> int:
        return len(self.output)

    def check_caller(self, tenant: str) -> None:
        if tenant != self.tenant:
            raise PermissionDenied(f"{FIELD}: the token was issued to another tenant; a stream can only be "
                                   "resumed by the tenant that started it", reason="resume_tenant")

    def apply(self, request: GenerationRequest) -> GenerationRequest:
        """`request` (as sent again) under the token's seed, once it is checked to be the request
        the token was issued for (ValueError naming what differs). The seed is the token's
        whatever the request says: the stream continues under the draws it started with."""
        current = policy_of(request)
        for name in POLICY_FIELDS:
            if current[name] != self.policy.get(name):
                raise ValueError(f"{FIELD}: the stream ran with {name}={self.policy.get(name)!r}, the request asks for "
                                 f"{name}={current[name]!r}; a resumed request must be the one the token was issued "
                                 "for")
        if request_digest(request) != self.digest:
            raise ValueError(f"{FIELD}: the token was issued for another request (its prompt, sampling, limits or "
                             "stop strings differ); send the request the stream started with")
        return dataclasses.replace(request, seed=self.seed)


class ResumeSigner:
    """Signs and verifies tokens with the application's key."""

    def __init__(self, key: bytes):
        if len(key) < MIN_KEY_BYTES:
            raise ValueError(f"a resume key must have at least {MIN_KEY_BYTES} bytes, got {len(key)}")
        self._key = key

    def _mac(self, signed: str) -> str:
        return _b64encode(hmac.new(self._key, signed.encode(), hashlib.sha256).digest())

    def sign(self, *, request_id: str, tenant: str, request: GenerationRequest, digest: str,
             output: list[int]) -> str:
        claims = {"rid": request_id, "tenant": tenant, "policy": policy_of(request), "seed": request.seed,
                  "req": digest, "pos": len(output), "out": output}
        body = _b64encode(zlib.compress(json.dumps(claims, separators=(",", ":")).encode(), 6))
        signed = f"{PREFIX}.{body}"
        return f"{signed}.{self._mac(signed)}"

    def verify(self, token: str) -> ResumePoint:
        """The token's claims, or ValueError naming `resume_token` and saying what is wrong."""
        if not isinstance(token, str) or not token:
            raise ValueError(f"{FIELD} must be a token from a streamed chunk, got {token!r}")
        if len(token) > MAX_TOKEN_CHARS:
            raise ValueError(f"{FIELD} is {len(token)} characters long, more than any token this server issues")
        parts = token.split(".")
        if len(parts) != 3 or parts[0] != PREFIX:
            raise ValueError(f"{FIELD} is not a resume token (expected `{PREFIX}.<claims>.<signature>`, as a streamed "
                             "chunk carries it)")
        if not hmac.compare_digest(self._mac(f"{parts[0]}.{parts[1]}"), parts[2]):
            raise ValueError(f"{FIELD}: the signature does not verify: the token was altered, or issued by another "
                             "application (or before its resume key changed)")
        try:
            claims = json.loads(zlib.decompress(_b64decode(parts[1])))
            point = ResumePoint(request_id=str(claims["rid"]), tenant=str(claims["tenant"]),
                                policy=dict(claims["policy"]), seed=int(claims["seed"]), digest=str(claims["req"]),
                                output=tuple(int(t) for t in claims["out"]))
            if int(claims["pos"]) != len(point.output):
                raise ValueError("position and output disagree")
        except (ValueError, KeyError, TypeError, zlib.error, binascii.Error) as error:
            # Signed by this application's key, yet unreadable: a token of another version.
            raise ValueError(f"{FIELD}: the token's claims cannot be read ({error})") from None
        return point


class StreamTokens:
    """The tokens of one stream's chunks: the position advances with each chunk's tokens."""

    def __init__(self, signer: ResumeSigner, tenant: str, request: GenerationRequest,
                 resumed: ResumePoint | None = None):
        self.signer = signer
        self.tenant = tenant
        self.request = request
        self.request_id = resumed.request_id if resumed else uuid.uuid4().hex
        self.digest = request_digest(request)
        self.output: list[int] = list(resumed.output) if resumed else []

    @property
    def delivered(self) -> tuple[int, ...]:
        return tuple(self.output)

    def after(self, token_ids: list[int]) -> str:
        """The token of a chunk that delivers `token_ids` after the chunks before it."""
        self.output += token_ids
        return self.signer.sign(request_id=self.request_id, tenant=self.tenant, request=self.request,
                                digest=self.digest, output=self.output)


# ---- the application's key ----

KV_KEY = "resume-key/{app}"


def _key_from_file(path: str) -> bytes:
    try:
        key = Path(path).read_bytes().strip()
    except OSError as error:
        raise ValueError(f"router.resume_key_file={path!r} cannot be read: {error}") from None
    if len(key) < MIN_KEY_BYTES:
        raise ValueError(f"router.resume_key_file={path!r} holds {len(key)} bytes; a resume key needs at least "
                         f"{MIN_KEY_BYTES} (e.g. `openssl rand -base64 48`)")
    return key


def _shared_random_key(app_name: str) -> bytes:
    """A random key drawn once per Ray cluster for `app_name`: the first router replica to ask
    stores it (put-if-absent), every replica reads the stored one."""
    from ray.experimental import internal_kv

    name = KV_KEY.format(app=app_name)
    internal_kv._internal_kv_put(name, secrets.token_bytes(MIN_KEY_BYTES), overwrite=False, namespace=NAMESPACE)
    return internal_kv._internal_kv_get(name, namespace=NAMESPACE)


def application_key(config: RouterConfig) -> bytes:
    """The key every router replica of the application signs with (see the module's doc)."""
    if config.resume_key_file:
        return _key_from_file(config.resume_key_file)
    try:
        from ray import serve

        app_name = serve.get_replica_context().app_name
    except Exception:  # not a Serve replica (a unit test): a key of this process alone
        return secrets.token_bytes(MIN_KEY_BYTES)
    log.info("router.resume_key_file is not set: resume tokens are signed with a random key kept in this Ray "
             "cluster (they stop verifying when the cluster is replaced); set it for tokens that outlive it")
    return _shared_random_key(app_name)
