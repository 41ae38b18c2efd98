"""The `static` backend: preallocated K/V slots written by position, CUDA graphs on GPUs.

Memory is allocated once per replica: per layer, K and V buffers of shape
`[slots, kv_heads, max_len + 1, head_dim]`. A session owns a slot and a length; rollback after a
rejection lowers the length (stale keys past it are never attended: a query at position p only
sees keys 0..p, and every one of those was written since). Position `max_len` of every slot is
scratch: padding tokens and idle rows write there, and nothing real ever attends it.

A batched step runs transformers' own modules over rows `0..B-1` of the buffers (a view, no copy)
with each row's new tokens left-padded to the longest, explicit position ids, and a per-row mask
(query at position p sees keys 0..p of its row) over an attended window `W` sized by the longest
row, in buckets of `WINDOW_STEP` tokens. The cache object's `update()` scatters each row's new keys/values at
that row's positions; no step copies cached context. Rows of sessions not in the batch idle (their
tokens go to scratch). Slots stay compact (a freed slot takes the highest occupied one's contents:
one copy per session end, never per step), so `B` is the bucket over the occupied slots.

On CUDA the hot shapes (batch bucket x new tokens up to `GRAPH_MAX_TOKENS` x window bucket) are
captured as CUDA graphs on first use and replayed; softmax to probabilities is inside the graph.
On the CPU, and for long prefills, the same step runs eagerly, so every CPU test covers it.

When all slots are taken, the least recently used session not in the batch loses its slot and
recomputes on its next call (calls stay answerable from scratch). A released session gives its slot
back at once (after the pass in progress, if one is running on another thread).
"""

from __future__ import annotations

import torch
from torch import Tensor

from ...config.app import STATIC_DEFAULT_MAX_LEN
from .base import BackendSession, ModelBackend, Plan

PAD_TOKEN = 0  # any valid id: padding writes to the scratch position and its outputs are discarded
WINDOW_STEP = 128  # attended windows come in multiples of this (attending over twice the keys costs the
# 7B's batch-8 step a third more on an H100, so windows stay close to the longest row)
GRAPH_MAX_TOKENS = 16  # steps with more new tokens per row (prefills) run eagerly
GRAPH_WARMUP_STEPS = 2  # eager runs on a side stream before capture (lazy inits, allocator warm-up)

try:  # transformers' cache base class (its mask helpers check for it)
    from transformers.cache_utils import Cache as _CacheBase
except ImportError:  # pragma: no cover
    _CacheBase = object


def _power_of_two_bucket(value: int, high: int) -> int:
    """The smallest power of two >= value, capped at `high`."""
    size = 1
    while size < value:
        size *= 2
    return min(size, high)


def _window_bucket(value: int, high: int) -> int:
    return min(-(-value // WINDOW_STEP) * WINDOW_STEP, high)


class SlotCache(_CacheBase):
    """Per-layer K/V buffers [slots, kv_heads, capacity, head_dim]. Before each step `bind` says how
    many rows take part, at which positions their new tokens go and how wide a window they attend;
    `update` writes the new keys/values there and returns the rows' attended window (views)."""

    def __init__(self, model, *, slots: int, capacity: int, dtype: torch.dtype):
        config = model.config
        heads = config.num_key_value_heads
        head_dim = getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads
        layers = model.model.layers
        shape = (slots, heads, capacity, head_dim)
        # Each layer's buffers live where that layer's weights do (a model placed across GPUs).
        devices = [layer.self_attn.k_proj.weight.device for layer in layers]
        self.keys = [torch.zeros(shape, dtype=dtype, device=device) for device in devices]
        self.values = [torch.zeros(shape, dtype=dtype, device=device) for device in devices]
        self.bytes_per_token = 2 * len(layers) * heads * head_dim * torch.finfo(dtype).bits // 8
        self.layers: list = []  # transformers' helpers look here; masks are handed in ready-made
        self.rows = 0
        self.positions: Tensor | None = None  # [rows, n]
        self.window = 0

    def bind(self, rows: int, positions: Tensor, window: int) -> None:
        self.rows, self.positions, self.window = rows, positions, window

    def update(self, key_states: Tensor, value_states: Tensor, layer_idx: int, *args, **kwargs):
        rows, heads, n, dim = key_states.shape
        keys, values = self.keys[layer_idx][:rows], self.values[layer_idx][:rows]
        index = self.positions.to(keys.device).view(rows, 1, n, 1).expand(rows, heads, n, dim)
        keys.scatter_(2, index, key_states)
        values.scatter_(2, index, value_states)
        return keys[:, :, : self.window], values[:, :, : self.window]

    def get_seq_length(self, layer_idx: int = 0) -> int:
        return 0  # positions are always given explicitly

    @property
    def is_compileable(self) -> bool:
        return True

    def copy_slot(self, source: int, target: int, length: int) -> None:
        for buffers in (self.keys, self.values):
            for layer in buffers:
                layer[target, :, :length].copy_(layer[source, :, :length])


class StaticSession(BackendSession):
    def __init__(self):
        super().__init__()
        self.slot: int | None = None


class _Graph:
    """One captured step: static inputs, the graph, and its output probabilities [B, n, V]."""

    def __init__(self, ids: Tensor, positions: Tensor, graph, probs: Tensor):
        self.ids, self.positions, self.graph, self.probs = ids, positions, graph, probs


class StaticBackend(ModelBackend):
    kind = "static"

    def __init__(self, model, *, name: str, vocab_size: int | None = None, slots: int = 16,
                 max_len: int | None = None, cuda_graphs: bool = True):
        super().__init__(model, name=name, vocab_size=vocab_size)
        layer_types = set(getattr(self.config, "layer_types", None) or ["full_attention"])
        if layer_types != {"full_attention"}:
            raise ValueError(f"the static backend handles full-attention models only; {name!r} has layer "
                             f"types {sorted(layer_types)} (use backend 'hf')")
        self.max_len = int(max_len or min(self.context_window, STATIC_DEFAULT_MAX_LEN))
        self.context_window = min(self.context_window, self.max_len)
        self.slots = int(slots)
        self.cache = SlotCache(model, slots=self.slots, capacity=self.max_len + 1, dtype=self.dtype)
        self._scratch = self.max_len  # the position padding and idle rows write to
        self._owners: list[StaticSession | None] = [None] * self.slots
        self._layer_types = sorted(layer_types)
        self.use_graphs = bool(cuda_graphs) and self.device.type == "cuda" and self._single_device(model)
        self._graphs: dict[tuple[int, int, int], _Graph] = {}

    @staticmethod
    def _single_device(model) -> bool:
        return len({p.device for p in model.parameters()}) == 1

    # ---- sessions and slots ----

    def new_session(self) -> StaticSession:
        return StaticSession()

    def session_bytes(self, session: StaticSession) -> int:
        return session.cached_length * self.cache.bytes_per_token if session.slot is not None else 0

    def _release(self, session: StaticSession) -> None:
        self._free(session)

    def _truncate(self, session: StaticSession, keep: int) -> None:
        pass  # the length is the session's token count; keys past it are never attended

    def _free(self, session: StaticSession) -> None:
        slot = session.slot
        if slot is None or self._owners[slot] is not session:
            return
        session.slot = None
        session.tokens.clear()
        session.last_row = None
        self._owners[slot] = None
        last = max((i for i, owner in enumerate(self._owners) if owner is not None), default=-1)
        if last > slot:  # keep the occupied slots compact: move the highest one down
            moved = self._owners[last]
            self.cache.copy_slot(last, slot, moved.cached_length)
            self._owners[slot], self._owners[last] = moved, None
            moved.slot = slot

    def _assign_slots(self, sessions: list[StaticSession]) -> None:
        if len(sessions) > self.slots:
            raise ValueError(f"a batch of {len(sessions)} sessions does not fit the static backend's "
                             f"{self.slots} slots (raise static.slots or lower max_batch_size)")
        in_batch = {id(s) for s in sessions}
        for session in sessions:
            if session.slot is not None:
                continue
            if None not in self._owners:
                victim = min((s for s in self._owners if id(s) not in in_batch), key=lambda s: s.last_used)
                self._free(victim)  # it recomputes on its next call
            slot = self._owners.index(None)
            self._owners[slot] = session
            session.slot = slot
            session.tokens.clear()
            session.last_row = None

    @property
    def occupied_slots(self) -> int:
        return sum(owner is not None for owner in self._owners)

    # ---- the step ----

    def _prepare(self, sessions: list[StaticSession]) -> None:
        self._assign_slots(sessions)

    def _forward(self, plans: list[Plan]) -> list[Tensor]:
        sessions = [plan.session for plan in plans]
        for plan in plans:
            end = plan.session.cached_length + len(plan.new_tokens)
            if end > self.max_len:
                raise ValueError(f"a sequence of {end} tokens does not fit the static backend's max_len of "
                                 f"{self.max_len} tokens")
        rows = _power_of_two_bucket(max(s.slot for s in sessions) + 1, self.slots)
        n = max(len(plan.new_tokens) for plan in plans)
        longest = max(s.cached_length + len(p.new_tokens) for s, p in zip(sessions, plans))
        window = _window_bucket(longest, self.max_len + 1)
        ids = torch.full((rows, n), PAD_TOKEN, dtype=torch.long)
        positions = torch.full((rows, n), self._scratch, dtype=torch.long)
        for plan in plans:
            count, length = len(plan.new_tokens), plan.session.cached_length
            ids[plan.session.slot, n - count:] = torch.tensor(plan.new_tokens)
            positions[plan.session.slot, n - count:] = torch.arange(length, length + count)
        keep = max(plan.rows_needed for plan in plans)
        if self.use_graphs and n <= GRAPH_MAX_TOKENS:
            probs = self._replay(ids, positions, window)  # [rows, n, V], overwritten by the next replay
        else:
            probs = self._step(ids.to(self.device), positions.to(self.device), window, keep)  # [rows, keep, V]
        self.forward_calls += 1
        width = probs.shape[1]
        return [probs[plan.session.slot, width - plan.rows_needed:].clone() for plan in plans]

    def _step(self, ids: Tensor, positions: Tensor, window: int, keep: int) -> Tensor:
        """[rows, keep, V] probabilities of the last `keep` positions of each row."""
        self.cache.bind(ids.shape[0], positions, window)
        keys = torch.arange(window, device=positions.device)
        visible = keys.view(1, 1, 1, -1) <= positions.unsqueeze(1).unsqueeze(-1)  # [rows, 1, n, window]
        # Additive, so every attention implementation (sdpa, eager) reads it the same way.
        mask = torch.zeros(visible.shape, dtype=self.dtype, device=positions.device)
        mask.masked_fill_(~visible, torch.finfo(self.dtype).min)
        out = self.model(input_ids=ids, position_ids=positions, attention_mask=dict.fromkeys(self._layer_types, mask),
                         use_cache=True, logits_to_keep=keep, **self.cache_kwargs(self.cache, positions[0]))
        return self.probabilities(out.logits)

    def _replay(self, ids: Tensor, positions: Tensor, window: int) -> Tensor:
        key = (ids.shape[0], ids.shape[1], window)
        graph = self._graphs.get(key)
        if graph is None:
            graph = self._graphs[key] = self._capture(*key)
        graph.ids.copy_(ids, non_blocking=True)
        graph.positions.copy_(positions, non_blocking=True)
        graph.graph.replay()
        return graph.probs

    def _capture(self, rows: int, n: int, window: int) -> _Graph:
        # Warm-up and capture write only to the scratch position, so no session's keys change.
        ids = torch.full((rows, n), PAD_TOKEN, dtype=torch.long, device=self.device)
        positions = torch.full((rows, n), self._scratch, dtype=torch.long, device=self.device)
        side = torch.cuda.Stream(device=self.device)
        side.wait_stream(torch.cuda.current_stream(self.device))
        with torch.cuda.stream(side):
            for _ in range(GRAPH_WARMUP_STEPS):
                self._step(ids, positions, window, n)
        torch.cuda.current_stream(self.device).wait_stream(side)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            probs = self._step(ids, positions, window, n)
        return _Graph(ids, positions, graph, probs)
