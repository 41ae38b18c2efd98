"""Resume tokens (`serving.resume`): signed, tied to their tenant and request, refused by name
when altered; and the application's key (a key file, or one random key per Ray cluster)."""

from __future__ import annotations

import base64
import json
import zlib

import pytest
from speccascade.config.app import RouterConfig
from speccascade.engine.request import GenerationRequest
from speccascade.options import SamplingParams
from speccascade.serving.resume import ResumeSigner, StreamTokens, application_key
from speccascade.tenancy import PermissionDenied

KEY = b"k" * 32
REQUEST = GenerationRequest(prompt="def add(a, b):", rule="token", alpha=0.3, block_size=3, seed=42,
                            sampling=SamplingParams(temperature=0.7), max_new_tokens=40)


def token_after(output, signer=None, tenant="acme", request=REQUEST):
    tokens = StreamTokens(signer or ResumeSigner(KEY), tenant, request)
    token = ""
    for piece in output:
        token = tokens.after(piece)
    return token


def test_a_token_carries_the_position_the_output_the_policy_and_the_seed():
    signer = ResumeSigner(KEY)
    point = signer.verify(token_after([[5, 6], [7], [8, 9, 10]], signer))
    assert point.output == (5, 6, 7, 8, 9, 10) and point.position == 6
    assert point.tenant == "acme" and point.seed == 42
    assert point.policy == {"method": "cascade", "rule": "token", "alpha": 0.3, "block_size": 3}
    again = REQUEST.__class__(**{**REQUEST.__dict__, "seed": None})  # sent again without the drawn seed
    assert point.apply(again) == REQUEST


def test_a_resumed_stream_keeps_its_request_id_and_goes_on_from_the_position():
    signer = ResumeSigner(KEY)
    first = StreamTokens(signer, "acme", REQUEST)
    first.after([1, 2])
    point = signer.verify(first.after([3]))
    resumed = StreamTokens(signer, "acme", REQUEST, point)
    assert resumed.request_id == first.request_id and resumed.delivered == (1, 2, 3)
    assert signer.verify(resumed.after([4])).output == (1, 2, 3, 4)


def _claims(token):
    body = token.split(".")[1]
    return json.loads(zlib.decompress(base64.urlsafe_b64decode(body + "=" * (-len(body) % 4))))


def _forged(token, **changes):
    claims = {**_claims(token), **changes}
    body = base64.urlsafe_b64encode(zlib.compress(json.dumps(claims).encode())).rstrip(b"=").decode()
    prefix, _, signature = token.split(".")
    return f"{prefix}.{body}.{signature}"


@pytest.mark.parametrize("change", [dict(tenant="other"), dict(pos=1, out=[5]), dict(seed=1),
                                    dict(policy={"method": "cascade", "rule": "lossless", "alpha": 0.0,
                                                 "block_size": 3})])
def test_an_altered_token_is_refused_naming_the_field(change):
    signer = ResumeSigner(KEY)
    with pytest.raises(ValueError, match=r"^resume_token: the signature does not verify"):
        signer.verify(_forged(token_after([[5, 6]], signer), **change))


def test_a_token_of_another_application_key_or_not_a_token_is_refused():
    token = token_after([[5]], ResumeSigner(b"x" * 32))
    with pytest.raises(ValueError, match=r"^resume_token: the signature does not verify"):
        ResumeSigner(KEY).verify(token)
    for bad in ("", "hello", "sc1.abc", "sc2.a.b", "sc1." + "a" * (1 << 20) + ".b"):
        with pytest.raises(ValueError, match=r"^resume_token"):
            ResumeSigner(KEY).verify(bad)


def test_only_the_tenant_that_started_a_stream_can_resume_it():
    point = ResumeSigner(KEY).verify(token_after([[5]], ResumeSigner(KEY), tenant="acme"))
    point.check_caller("acme")
    with pytest.raises(PermissionDenied, match="^resume_token: the token was issued to another tenant"):
        point.check_caller("mallory")


@pytest.mark.parametrize("changed,named", [
    (dict(rule="lossless", alpha=0.0), "rule"), (dict(alpha=0.4), "alpha"), (dict(block_size=4), "block_size"),
    (dict(method="expert"), "method"), (dict(prompt="def sub(a, b):"), "another request"),
    (dict(max_new_tokens=41), "another request"), (dict(sampling=SamplingParams(temperature=0.8)), "another request"),
    (dict(stop=("\n",)), "another request"),
])
def test_a_token_applies_only_to_the_request_it_was_issued_for(changed, named):
    point = ResumeSigner(KEY).verify(token_after([[5]], ResumeSigner(KEY)))
    with pytest.raises(ValueError, match=rf"^resume_token: .*{named}"):
        point.apply(GenerationRequest(**{**REQUEST.__dict__, **changed}))
    # The pipelining mode changes no output: a resumed request may use another.
    point.apply(GenerationRequest(**{**REQUEST.__dict__, "pipeline": "off"}))


def test_the_key_comes_from_the_key_file_and_must_be_long_enough(tmp_path):
    path = tmp_path / "resume.key"
    path.write_bytes(b"s" * 40 + b"\n")
    assert application_key(RouterConfig(resume_key_file=str(path))) == b"s" * 40
    path.write_bytes(b"short")
    with pytest.raises(ValueError, match="resume_key_file=.* holds 5 bytes; a resume key needs at least 32"):
        application_key(RouterConfig(resume_key_file=str(path)))
    with pytest.raises(ValueError, match="resume_key_file=.* cannot be read"):
        application_key(RouterConfig(resume_key_file=str(tmp_path / "missing")))
    # Outside Serve and without a file: a key of this process alone.
    assert len(application_key(RouterConfig())) >= 32


# ---- the router core: a resumed request's admission, output and charge ----

def test_a_resumed_request_is_charged_only_for_its_new_tokens_and_continues_exactly(tiny_pair, tmp_path,
                                                                                   local_engine):
    import asyncio
    import dataclasses
    from types import SimpleNamespace

    import yaml
    from speccascade.config import AppConfig
    from speccascade.engine.roles import LocalDrafter, LocalExpert
    from speccascade.serving.router import RouterCore
    from speccascade.tenancy import key_digest, new_api_key

    from ..served import UncalledTierHandle, app_args

    keys = {name: new_api_key() for name in ("acme", "other")}
    path = tmp_path / "tenants.yaml"
    path.write_text(yaml.safe_dump({"tenants": [
        {"id": name, "key_sha256": [key_digest(key)], "limits": {"output_tokens_per_minute": 100_000}}
        for name, key in keys.items()]}))
    config = AppConfig.model_validate(app_args(*tiny_pair, tenancy={"tenants_file": str(path)}))
    core = RouterCore(UncalledTierHandle("Drafter"), UncalledTierHandle("Expert"), config)

    async def local_stream(request, prompt, limit, caller, delivered=()):  # the tiers, in-process
        chunks = core.generation.stream_rounds(request, prompt, limit, LocalDrafter(local_engine.drafter),
                                               LocalExpert(local_engine.expert), delivered=delivered)
        async for chunk in chunks:
            yield chunk, SimpleNamespace()

    core.stream = local_stream
    charged: list[int] = []

    class Recorder:
        def charge(self, tokens):
            charged.append(tokens)

        def release(self):
            pass

    def build(policy):
        from speccascade.serving.requests import request_with_policy

        return request_with_policy(policy, prompt="def add(a, b):", rule="token", alpha=0.3, temperature=0.8,
                                   max_new_tokens=30, block_size=3, ignore_eos=True)

    async def run(key, token=None, cut=None):
        admitted = await core.admit([("x-api-key", keys[key])], build, resume_token=token)
        admitted = dataclasses.replace(admitted, admission=Recorder())
        chunks, tokens = [], []
        async for chunk, _ in core.serve_request(admitted):
            chunks.append(chunk)
            tokens.append(admitted.resume_token(chunk))
            if cut is not None and len(chunks) == cut:
                break
        return chunks, tokens

    async def scenario():
        head, tokens = await run("acme", cut=3)
        charged.clear()
        rest, _ = await run("acme", token=tokens[-1])
        seed = rest[-1].result.seed  # drawn by the server for the first request, carried by the token
        assert sum(charged) == sum(len(c.token_ids) for c in rest) == 30 - sum(len(c.token_ids) for c in head)
        twin = [c async for c in local_engine.astream(dataclasses.replace(build(config.policy), seed=seed))][-1].result
        assert [t for c in head + rest for t in c.token_ids] == twin.token_ids == rest[-1].result.token_ids
        assert "".join(c.text for c in head + rest) == twin.text
        with pytest.raises(PermissionDenied, match="resume_token: the token was issued to another tenant"):
            await run("other", token=tokens[-1])
        with pytest.raises(ValueError, match="^resume_token: the signature does not verify"):
            await run("acme", token=tokens[-1][:-2] + ("AA" if tokens[-1][-2:] != "AA" else "BB"))

    asyncio.run(scenario())
