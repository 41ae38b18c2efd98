"""`speccascade tenants`: keys printed once, digests stored, rotation, disabling, listing."""

from __future__ import annotations

import pytest
from speccascade.cli import main
from speccascade.tenancy import TenantRegistry, TenantsFile, Unauthenticated


def run(capsys, *argv) -> str:
    assert main(["tenants", *argv]) == 0
    return capsys.readouterr().out


def key_in(output: str) -> str:
    return next(line for line in output.splitlines() if line.startswith("sc-"))


def test_add_rotate_disable_and_list(tmp_path, capsys):
    path = tmp_path / "tenants.yaml"
    first = key_in(run(capsys, "add", "acme", "-f", str(path), "--weight", "2", "--rules", "lossless",
                       "--tokens-per-minute", "6000", "--alpha-range", "0", "0.5"))
    tenants = TenantsFile.load(path)
    acme = tenants.get("acme")
    assert acme.weight == 2 and [r.value for r in acme.policy.rules] == ["lossless"]
    assert acme.limits.output_tokens_per_minute == 6000 and acme.policy.alpha.max == 0.5
    assert first not in path.read_text()
    assert TenantRegistry(tenants).authenticate(first).id == "acme"

    second = key_in(run(capsys, "rotate", "acme", "-f", str(path)))
    registry = TenantRegistry(TenantsFile.load(path))
    assert registry.authenticate(first).id == registry.authenticate(second).id == "acme"  # both during rotation
    third = key_in(run(capsys, "rotate", "acme", "-f", str(path), "--revoke-old"))
    registry = TenantRegistry(TenantsFile.load(path))
    assert registry.authenticate(third).id == "acme"
    with pytest.raises(Unauthenticated):
        registry.authenticate(first)

    run(capsys, "disable", "acme", "-f", str(path))
    assert TenantsFile.load(path).get("acme").disabled
    run(capsys, "enable", "acme", "-f", str(path))
    listing = run(capsys, "list", "-f", str(path))
    assert "acme" in listing and "enabled" in listing and third not in listing


def test_mistakes_are_named(tmp_path, capsys):
    path = tmp_path / "tenants.yaml"
    run(capsys, "add", "acme", "-f", str(path))
    assert main(["tenants", "add", "acme", "-f", str(path)]) == 2
    assert "tenant 'acme' already exists" in capsys.readouterr().err
    assert main(["tenants", "rotate", "nobody", "-f", str(path)]) == 2
    assert "no tenant 'nobody'" in capsys.readouterr().err
    assert main(["tenants", "add", "Bad Id", "-f", str(path)]) != 0


def test_add_says_which_default_rule_it_derived(tmp_path, capsys):
    path = tmp_path / "tenants.yaml"
    output = run(capsys, "add", "auditor", "-f", str(path), "--rules", "lossless")  # the README's example
    assert "default rule of tenant 'auditor': lossless (the first of --rules" in output
    assert TenantsFile.load(path).get("auditor").policy.default_rule.value == "lossless"
    assert "default_rule: lossless" in path.read_text()  # the file says what it does
    output = run(capsys, "add", "mixed", "-f", str(path), "--rules", "chow", "token")
    assert "default rule of tenant 'mixed': chow" in output
    assert "default rule of tenant 'open': the server's" in run(capsys, "add", "open", "-f", str(path))
    assert "default rule" not in run(capsys, "add", "chosen", "-f", str(path), "--rules", "chow", "token",
                                     "--default-rule", "token")


def test_add_refuses_methods_its_rules_never_allow(tmp_path, capsys):
    path = tmp_path / "tenants.yaml"
    assert main(["tenants", "add", "auditor", "-f", str(path), "--rules", "lossless", "--methods", "drafter"]) != 0
    assert "methods ['drafter'] can never be used under rules lossless" in capsys.readouterr().err
    assert not path.exists()
