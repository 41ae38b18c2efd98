"""The `hf` backend: transformers' own model call over a DynamicCache per session.

Simple and exact, and the reference the other backends are tested against. Each session owns a
growing list of per-layer tensors. A batch of several sessions is laid out as

    [pad] * (L_max - L_i) + cache_i + [pad] * (n_max - n_i) + new_i

with padding masked out of attention and explicit position ids, so each real token sees exactly
its own sequence. The batched cache then stays as it is (`PaddedBatch`): the next pass over the
same sessions in the same order (a draft's gamma steps) appends its tokens to it, and the sessions'
own caches are cut back out of it only when one of them is next used otherwise (alone, in another
batch, cut back after a verdict, released). So a draft batch copies each cached context twice a
block rather than twice a step; the `static` backend, with caches in fixed slots, copies nothing.
A batch of one runs on the session's own cache, with nothing to copy. In fp32 batched results
match single-session ones up to float rounding (different matmul shapes).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

from .base import BackendSession, ModelBackend, Plan, logits_to_keep

PAD_TOKEN = 0  # any valid id: padded positions are masked out and their outputs discarded


class HFSession(BackendSession):
    def __init__(self, cache):
        super().__init__()
        self.cache = cache  # transformers DynamicCache; None while the keys/values are a row of `batch`
        self.batch: PaddedBatch | None = None
        self.row = 0


@dataclass(eq=False)
class PaddedBatch:
    """The keys/values of the sessions of the last batched pass, as that pass left them: row r holds
    `members[r]`'s tokens at the positions where `mask[r]` is 1 (padding and other rows' extra new
    tokens elsewhere). It lives while all its members do: the first used otherwise splits it
    (`HFBackend._detach`), so every byte it holds is one member's (`session_bytes`)."""

    members: list[HFSession]
    cache: object  # transformers DynamicCache, [rows, kv_heads, positions, head_dim] a layer
    mask: Tensor  # [rows, positions] long

    def holds_exactly(self, sessions: list[HFSession]) -> bool:
        return len(sessions) == len(self.members) and all(a is b for a, b in zip(sessions, self.members))


class HFBackend(ModelBackend):
    kind = "hf"

    def new_session(self) -> HFSession:
        from transformers import DynamicCache

        return HFSession(DynamicCache(config=self.config))

    def session_bytes(self, session: HFSession) -> int:
        batch = session.batch  # (read once: statistics may ask from another thread than the passes')
        if batch is not None:  # its row of the padded batch, padding included
            return sum(t[0].numel() * t.element_size() for layer in batch.cache.layers for t in (layer.keys, layer.values))
        total = 0
        for layer in getattr(session.cache, "layers", []):
            for name in ("keys", "values"):
                t = getattr(layer, name, None)
                if isinstance(t, Tensor):
                    total += t.numel() * t.element_size()
        return total

    def _detach(self, session: HFSession, keep: int | None = None) -> None:
        """Split the padded batch `session` is a member of: each member gets its own cache again,
        its row's real positions copied out (`session`'s first `keep` only, when given). A member
        used otherwise (alone, cut back, released, in another batch) ends its batch: the others
        would be cut out at their next pass anyway, and a batch kept for one idle member would hold
        every row."""
        from transformers import DynamicCache

        batch = session.batch
        if batch is None:
            return
        for row, member in enumerate(batch.members):
            own = DynamicCache(config=self.config)
            positions = batch.mask[row].nonzero().view(-1)[: keep if member is session else None]
            if len(positions):
                for index, layer in enumerate(batch.cache.layers):  # (a model spread over GPUs: per layer's device)
                    at = positions.to(layer.keys.device)
                    own.update(layer.keys[row: row + 1].index_select(2, at),
                               layer.values[row: row + 1].index_select(2, at), index)
            member.cache, member.batch = own, None

    def _truncate(self, session: HFSession, keep: int) -> None:
        if session.batch is not None:
            self._detach(session, keep)
            return
        if keep == 0:
            from transformers import DynamicCache

            session.cache = DynamicCache(config=self.config)
        else:
            session.cache.crop(keep - session.cached_length)  # a negative count: drop that many from the end

    def _forward(self, plans: list[Plan], ids: Tensor | None = None) -> list[Tensor]:
        if len(plans) == 1:
            plan = plans[0]
            self._detach(plan.session)
            out = self.model(
                input_ids=ids if ids is not None else torch.tensor([plan.new_tokens], dtype=torch.long,
                                                                    device=self.device),
                use_cache=True, logits_to_keep=logits_to_keep(len(plan.new_tokens), plan.rows_needed, self.device),
                **self.cache_kwargs(plan.session.cache),
            )
            self._count_step("eager")
            return [self.probabilities(out.logits[0, -plan.rows_needed:])]
        return self._forward_padded(plans, ids)

    def _forward_padded(self, plans: list[Plan], ids: Tensor | None) -> list[Tensor]:
        sessions = [plan.session for plan in plans]
        batch = sessions[0].batch
        if batch is None or not batch.holds_exactly(sessions):
            for session in sessions:
                self._detach(session)
            batch = self._pad(sessions)
        batch_rows = len(plans)
        cached = [p.session.cached_length for p in plans]
        new = [len(p.new_tokens) for p in plans]
        n_max = max(new)
        input_ids = torch.full((batch_rows, n_max), PAD_TOKEN, dtype=torch.long)
        position_ids = torch.zeros((batch_rows, n_max), dtype=torch.long)  # padded queries: output discarded
        new_mask = torch.zeros((batch_rows, n_max), dtype=torch.long)
        for row, (plan, length, count) in enumerate(zip(plans, cached, new)):
            if ids is None:
                input_ids[row, n_max - count:] = torch.tensor(plan.new_tokens)
            position_ids[row, n_max - count:] = torch.arange(length, length + count)
            new_mask[row, n_max - count:] = 1
        attention_mask = torch.cat([batch.mask, new_mask.to(self.device)], dim=1)
        logits_needed = max(p.rows_needed for p in plans)
        out = self.model(
            input_ids=ids if ids is not None else input_ids.to(self.device), attention_mask=attention_mask,
            position_ids=position_ids.to(self.device), use_cache=True,
            logits_to_keep=logits_to_keep(n_max, logits_needed, self.device),
            **self.cache_kwargs(batch.cache),
        )
        self._count_step("eager")
        batch.mask = attention_mask  # the pass appended its tokens to every row of the batch's cache
        return [self.probabilities(out.logits[row, -plan.rows_needed:]) for row, plan in enumerate(plans)]

    def _pad(self, sessions: list[HFSession]) -> PaddedBatch:
        """A padded batch of sessions that own their caches: [pad] * (L_max - L_i) + cache_i a row."""
        from transformers import DynamicCache

        cached = [session.cached_length for session in sessions]
        l_max = max(cached)
        past = DynamicCache(config=self.config)
        if l_max:
            template = next(session.cache.layers for session in sessions if session.cached_length)
            for index, layer in enumerate(template):
                shape = layer.keys.shape  # [1, kv_heads, L, head_dim]
                keys, values = [], []
                for session, length in zip(sessions, cached):
                    pad = torch.zeros((1, shape[1], l_max - length, shape[3]), dtype=layer.keys.dtype,
                                      device=layer.keys.device)
                    if not length:
                        keys.append(pad)
                        values.append(pad)
                    else:
                        keys.append(torch.cat([pad, session.cache.layers[index].keys], dim=2))
                        values.append(torch.cat([pad, session.cache.layers[index].values], dim=2))
                past.update(torch.cat(keys), torch.cat(values), index)
        mask = torch.zeros((len(sessions), l_max), dtype=torch.long)
        for row, length in enumerate(cached):
            mask[row, l_max - length:] = 1
        batch = PaddedBatch(list(sessions), past, mask.to(self.device))
        for row, session in enumerate(sessions):
            session.cache, session.batch, session.row = None, batch, row
        return batch
