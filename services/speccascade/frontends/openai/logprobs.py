"""Log-probabilities and echo in the OpenAI shapes: token texts and bytes as logprobs show them, and
each choice's `logprobs` for chat (`content[]`) and completions (`tokens`, `token_logprobs`,
`top_logprobs`, `text_offset`). Which distribution the numbers come from: docs/design.md."""

from __future__ import annotations

from collections.abc import Sequence

from ...engine.stats import TokenLogprob

LOGPROB_FLOOR = -9999.0  # JSON has no -inf: a token with no mass (an EOS masked by min_tokens), as vLLM shows it


def _byte_decoder() -> dict[str, int]:
    """Byte-level BPE's alphabet (GPT-2's, which Qwen's and SmolLM's tokenizers use) reversed: each
    stand-in character of a token's string -> the byte it stands for."""
    kept = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    codes, extra = list(kept), 0
    for byte in range(256):
        if byte not in kept:
            kept.append(byte)
            codes.append(256 + extra)
            extra += 1
    return {chr(code): byte for byte, code in zip(kept, codes)}


_BYTE_DECODER = _byte_decoder()


class TokenTexts:
    """A token id's text and UTF-8 bytes, as logprobs show them (cached per id). A byte-level BPE
    token's bytes are exact, so a token holding part of a character has the bytes of that part (its
    text then shows U+FFFD, as OpenAI's does); other tokenizers' tokens are decoded alone."""

    def __init__(self, tokenizer):
        self.tokenizer = tokenizer
        self._known: dict[int, tuple[str, list[int]]] = {}

    def __call__(self, token_id: int) -> tuple[str, list[int]]:
        known = self._known.get(token_id)
        if known is None:
            piece = self.tokenizer.convert_ids_to_tokens(token_id)
            if isinstance(piece, str) and piece and all(ch in _BYTE_DECODER for ch in piece):
                raw = bytes(_BYTE_DECODER[ch] for ch in piece)
                text = raw.decode("utf-8", errors="replace")
            else:
                text = self.tokenizer.decode([token_id])
                raw = text.encode("utf-8")
            known = self._known[token_id] = (text, list(raw))
        return known


def _floor(logprob: float) -> float:
    return max(logprob, LOGPROB_FLOOR)


class ChoiceExtras:
    """What a request's choice carries besides the generated text: the echoed prompt (completions)
    and the logprobs, in the endpoint's shape. A stream's chunks go through one instance, which keeps
    the completions' text offset and sends the echo once.

    Chat (`choices[].logprobs.content[]`): per output token its text, logprob, bytes and
    `top_logprobs` (the k most likely: token, logprob, bytes). Completions (`choices[].logprobs`):
    `tokens`, `token_logprobs`, `top_logprobs` (a dict of the k most likely and the token itself,
    as vLLM gives it) and `text_offset` (each token's character offset in the choice's text, from
    the tokens' own texts), with the prompt's tokens first under `echo` (the first one null)."""

    def __init__(self, kind: str, texts: TokenTexts, *, logprobs: bool, echo: str | None = None,
                 prompt_ids: Sequence[int] = ()):
        self.kind, self.texts, self.logprobs = kind, texts, logprobs
        self.prompt_ids = list(prompt_ids)
        self._echo = echo
        self._offset = 0  # the completions' text_offset of the next token

    def echo(self) -> str:
        """The prompt's text, the first time (a completion with `echo`), else ""."""
        text, self._echo = self._echo or "", None
        return text

    def choice_logprobs(self, token_ids: Sequence[int], entries: Sequence[TokenLogprob] | None,
                        prompt_entries: Sequence[TokenLogprob | None] | None = None) -> dict | None:
        """The choice's `logprobs` for these output tokens (and, first, the prompt's)."""
        if not self.logprobs:
            return None
        entries = list(entries or [])
        if self.kind == "chat":
            return {"content": [self._chat_entry(token, entry) for token, entry in zip(token_ids, entries)]}
        ids, all_entries = list(token_ids), entries
        if prompt_entries is not None:
            ids, all_entries = self.prompt_ids + ids, list(prompt_entries) + entries
        out: dict[str, list] = {"tokens": [], "token_logprobs": [], "top_logprobs": [], "text_offset": []}
        for token, entry in zip(ids, all_entries):
            text, _ = self.texts(token)
            out["tokens"].append(text)
            out["text_offset"].append(self._offset)
            self._offset += len(text)
            if entry is None:  # the prompt's first token: nothing precedes it
                out["token_logprobs"].append(None)
                out["top_logprobs"].append(None)
                continue
            logprob, top = entry
            out["token_logprobs"].append(_floor(logprob))
            alternatives = {self.texts(i)[0]: _floor(value) for i, value in top}
            alternatives.setdefault(text, _floor(logprob))
            out["top_logprobs"].append(alternatives)
        return out

    def _chat_entry(self, token: int, entry: TokenLogprob) -> dict:
        logprob, top = entry
        text, raw = self.texts(token)
        return {"token": text, "logprob": _floor(logprob), "bytes": raw,
                "top_logprobs": [{"token": self.texts(i)[0], "logprob": _floor(value), "bytes": self.texts(i)[1]}
                                 for i, value in top]}
