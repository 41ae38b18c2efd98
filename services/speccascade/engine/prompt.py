"""From a request to prompt tokens, and how many new tokens fit after them. Shared by the
in-process engine and the served router so both refuse and truncate identically."""

from __future__ import annotations

from .request import GenerationRequest


def check_vocabulary(tokenizer, ids, name: str) -> None:
    """ValueError naming the first of `ids` (the field `name`) that is not an id of `tokenizer`."""
    vocabulary = len(tokenizer)
    for i, token in enumerate(ids):
        if not 0 <= token < vocabulary:
            raise ValueError(f"{name}[{i}]={token} is outside the vocabulary: the models' tokenizer has ids "
                             f"0..{vocabulary - 1}")


def encode_prompt(tokenizer, request: GenerationRequest) -> list[int]:
    """Prompt token ids: chat messages through the tokenizer's chat template, a plain prompt as is,
    token ids as given (each within the tokenizer's vocabulary)."""
    if request.prompt_token_ids is not None:
        check_vocabulary(tokenizer, request.prompt_token_ids, "prompt_token_ids")
        return list(request.prompt_token_ids)
    if request.messages is not None:
        text = tokenizer.apply_chat_template(list(request.messages), add_generation_prompt=True, tokenize=False)
        return list(tokenizer(text, add_special_tokens=False)["input_ids"])
    return list(tokenizer(request.prompt)["input_ids"])


def generation_limit(context_window: int, prompt_tokens: int, request: GenerationRequest) -> int:
    """max_new_tokens, reduced so that a last full round (block_size + 1 tokens) still fits the
    context window; a prompt that leaves no room for one round is refused."""
    room = context_window - prompt_tokens - request.block_size - 1
    if room < 1:
        raise ValueError(
            f"prompt of {prompt_tokens} tokens is too long: the context window is {context_window} "
            f"tokens and a round of block_size={request.block_size} needs {request.block_size + 1} more"
        )
    return min(request.max_new_tokens, room)
