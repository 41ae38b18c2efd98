"""The `hf` backend: transformers' own model call over a DynamicCache per session.

Simple and exact, and the reference the other backends are tested against. Each session owns a
growing list of per-layer tensors. A batch of several sessions is laid out as

    [pad] * (L_max - L_i) + cache_i + [pad] * (n_max - n_i) + new_i

with padding masked out of attention and explicit position ids, so each real token sees exactly
its own sequence; afterwards each session's cache is cut back out of the batched one. That copies
every session's cached context twice per batched step, which is why the `static` backend exists.
A batch of one runs on the session's own cache, with nothing to copy. In fp32 batched results
match single-session ones up to float rounding (different matmul shapes).
"""

from __future__ import annotations

import torch
from torch import Tensor

from .base import BackendSession, ModelBackend, Plan, logits_to_keep

PAD_TOKEN = 0  # any valid id: padded positions are masked out and their outputs discarded


class HFSession(BackendSession):
    def __init__(self, cache):
        super().__init__()
        self.cache = cache  # transformers DynamicCache


class HFBackend(ModelBackend):
    kind = "hf"

    def new_session(self) -> HFSession:
        from transformers import DynamicCache

        return HFSession(DynamicCache(config=self.config))

    def session_bytes(self, session: HFSession) -> int:
        total = 0
        for layer in getattr(session.cache, "layers", []):
            for name in ("keys", "values"):
                t = getattr(layer, name, None)
                if isinstance(t, Tensor):
                    total += t.numel() * t.element_size()
        return total

    def _truncate(self, session: HFSession, keep: int) -> None:
        if keep == 0:
            from transformers import DynamicCache

            session.cache = DynamicCache(config=self.config)
        else:
            session.cache.crop(keep - session.cached_length)  # a negative count: drop that many from the end

    def _forward(self, plans: list[Plan], ids: Tensor | None = None) -> list[Tensor]:
        if len(plans) == 1:
            plan = plans[0]
            out = self.model(
                input_ids=ids if ids is not None else torch.tensor([plan.new_tokens], dtype=torch.long,
                                                                    device=self.device),
                use_cache=True, logits_to_keep=logits_to_keep(len(plan.new_tokens), plan.rows_needed, self.device),
                **self.cache_kwargs(plan.session.cache),
            )
            self.forward_calls += 1
            return [self.probabilities(out.logits[0, -plan.rows_needed:])]
        return self._forward_padded(plans, ids)

    def _forward_padded(self, plans: list[Plan], ids: Tensor | None) -> list[Tensor]:
        from transformers import DynamicCache

        batch = len(plans)
        cached = [p.session.cached_length for p in plans]
        new = [len(p.new_tokens) for p in plans]
        l_max, n_max = max(cached), max(new)
        device, dtype = self.device, self.dtype

        past = DynamicCache(config=self.config)
        if l_max:
            layers = [p.session.cache.layers if p.session.cached_length else None for p in plans]
            template = next(ls for ls in layers if ls is not None)
            for index, layer in enumerate(template):
                shape = layer.keys.shape  # [1, kv_heads, L, head_dim]
                keys, values = [], []
                for session_layers, length in zip(layers, cached):
                    pad = torch.zeros((1, shape[1], l_max - length, shape[3]), dtype=dtype, device=device)
                    if session_layers is None:
                        keys.append(pad)
                        values.append(pad)
                    else:
                        keys.append(torch.cat([pad, session_layers[index].keys], dim=2))
                        values.append(torch.cat([pad, session_layers[index].values], dim=2))
                past.update(torch.cat(keys), torch.cat(values), index)

        input_ids = torch.full((batch, n_max), PAD_TOKEN, dtype=torch.long)
        position_ids = torch.zeros((batch, n_max), dtype=torch.long)  # padded queries: output discarded
        attention_mask = torch.zeros((batch, l_max + n_max), dtype=torch.long)
        for row, (plan, length, count) in enumerate(zip(plans, cached, new)):
            if ids is None:
                input_ids[row, n_max - count:] = torch.tensor(plan.new_tokens)
            position_ids[row, n_max - count:] = torch.arange(length, length + count)
            attention_mask[row, l_max - length: l_max] = 1
            attention_mask[row, l_max + n_max - count:] = 1
        logits_needed = max(p.rows_needed for p in plans)
        out = self.model(
            input_ids=ids if ids is not None else input_ids.to(device), attention_mask=attention_mask.to(device),
            position_ids=position_ids.to(device), use_cache=True,
            logits_to_keep=logits_to_keep(n_max, logits_needed, device),
            **self.cache_kwargs(past),
        )
        self.forward_calls += 1

        results = []
        for row, (plan, length, count) in enumerate(zip(plans, cached, new)):
            rebuilt = DynamicCache(config=self.config)
            keep = [slice(l_max - length, l_max), slice(l_max + n_max - count, l_max + n_max)]
            for index, layer in enumerate(past.layers):
                k = torch.cat([layer.keys[row: row + 1, :, s] for s in keep], dim=2)
                v = torch.cat([layer.values[row: row + 1, :, s] for s in keep], dim=2)
                rebuilt.update(k.contiguous(), v.contiguous(), index)
            plan.session.cache = rebuilt
            results.append(self.probabilities(out.logits[row, -plan.rows_needed:]))
        return results
