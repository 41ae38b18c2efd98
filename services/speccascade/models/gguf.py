"""GGUF to safetensors: a GGUF file dequantized into a float32 model directory with its tokenizer
(chat template included) and generation config, checked after saving."""

from __future__ import annotations

import gc
from pathlib import Path

from tqdm.auto import tqdm

_CHAT_PROBE = [
    {"role": "system", "content": "You are a helpful assistant."},
    {"role": "user", "content": "Write a Python function that reverses a string."},
]


def _eos_ids(gguf: Path, tokenizer) -> list[int]:
    """End-of-generation ids: the GGUF's eos/eot/eom, plus ``<|endoftext|>`` if the vocab has it.

    Chat GGUFs name the end-of-turn token as eos (Qwen: ``<|im_end|>``); the HF releases also stop
    on the document end token, and so do we.
    """
    from gguf import GGUFReader

    reader = GGUFReader(str(gguf))
    ids: list[int] = []
    for key in ("tokenizer.ggml.eos_token_id", "tokenizer.ggml.eot_token_id", "tokenizer.ggml.eom_token_id"):
        field = reader.fields.get(key)
        if field is not None and field.data:
            ids.append(int(field.parts[field.data[0]][0]))
    if tokenizer.eos_token_id is not None:
        ids.append(int(tokenizer.eos_token_id))
    eot = tokenizer.convert_tokens_to_ids("<|endoftext|>")
    if isinstance(eot, int) and eot != tokenizer.unk_token_id and eot >= 0:
        ids.append(eot)
    del reader
    return list(dict.fromkeys(ids))


def convert_gguf(gguf: Path | str, out: Path | str, *, progress: bool = True, source: str | None = None) -> Path:
    """Dequantize a GGUF file and write a float32 safetensors model directory to ``out``."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer, GenerationConfig, GgufConfig
    from transformers.utils import logging as hf_logging

    gguf, out = Path(gguf), Path(out)
    folder, fname = str(gguf.parent), gguf.name
    out.mkdir(parents=True, exist_ok=True)
    bars_were_on = hf_logging.is_progress_bar_enabled()
    if not progress:
        hf_logging.disable_progress_bar()
    steps = tqdm(total=5, desc=f"converting {fname}", disable=not progress,
                 bar_format="{desc}: {n}/{total} [{elapsed}] {postfix}")
    try:
        steps.set_postfix_str("tokenizer")
        tokenizer = AutoTokenizer.from_pretrained(folder, gguf_file=fname)
        had_template = bool(getattr(tokenizer, "chat_template", None))
        steps.update()

        steps.set_postfix_str("dequantizing weights")
        # dequantize=True: never keep packed GGUF blocks (transformers does when `kernels` is installed),
        # so the state dict holds plain dense tensors.
        gmodel = AutoModelForCausalLM.from_pretrained(
            folder, gguf_file=fname, dtype=torch.float32,
            quantization_config=GgufConfig(dequantize=True),
        )
        steps.update()

        steps.set_postfix_str("building plain model")
        config = gmodel.config
        for attr in ("quantization_config", "_model_name_or_path"):  # the latter is the GGUF's general.name
            if hasattr(config, attr):
                delattr(config, attr)
        config.dtype = torch.float32
        config._name_or_path = source or str(gguf)
        # Built on the meta device and filled with assign=True: the dequantized tensors are adopted,
        # not copied, so peak memory stays at one float32 copy of the model.
        with torch.device("meta"):
            model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
        state = gmodel.state_dict()
        model.load_state_dict(state, strict=True, assign=True)
        model.tie_weights()
        left_on_meta = [n for n, t in model.state_dict().items() if t.is_meta]
        if left_on_meta:
            raise RuntimeError(f"weights missing from the GGUF state dict: {left_on_meta[:5]}")
        eos = _eos_ids(gguf, tokenizer)
        gen = GenerationConfig(
            bos_token_id=config.bos_token_id if config.bos_token_id is not None else tokenizer.bos_token_id,
            eos_token_id=eos[0] if len(eos) == 1 else eos,
            pad_token_id=tokenizer.pad_token_id if tokenizer.pad_token_id is not None else config.pad_token_id,
        )
        model.generation_config = gen
        del gmodel, state
        gc.collect()
        steps.update()

        steps.set_postfix_str("writing safetensors")
        model.save_pretrained(out, safe_serialization=True)
        del model
        gc.collect()
        tokenizer.save_pretrained(out)
        steps.update()

        steps.set_postfix_str("checking tokenizer")
        reloaded = AutoTokenizer.from_pretrained(str(out))
        probe = "def reverse(s: str) -> str:\n    return s[::-1]  # ünïcødé ✓"
        if reloaded.encode(probe) != tokenizer.encode(probe):
            raise RuntimeError("the saved tokenizer encodes text differently from the GGUF's")
        if had_template:
            want = tokenizer.apply_chat_template(_CHAT_PROBE, tokenize=False, add_generation_prompt=True)
            got = reloaded.apply_chat_template(_CHAT_PROBE, tokenize=False, add_generation_prompt=True)
            if want != got:
                raise RuntimeError("the chat template did not survive saving the tokenizer")
        steps.set_postfix_str("done")
        steps.update()
    finally:
        steps.close()
        if bars_were_on and not progress:
            hf_logging.enable_progress_bar()
    return out
