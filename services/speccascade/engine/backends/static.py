"""The `static` backend: preallocated K/V slots written by position, CUDA graphs on GPUs.

Memory is allocated once per replica: per layer, K and V buffers of shape
`[slots, kv_heads, max_len + 1, head_dim]`. A session owns a slot and a length; rollback after a
rejection lowers the length (stale keys past it are never attended: a query at position p only
sees keys 0..p, and every one of those was written since). Position `max_len` of every slot is
scratch: padding tokens and padding rows write there, and nothing real ever attends it.

A batched step runs transformers' own modules with one row per session of the batch, each row's
new tokens left-padded to the longest, explicit position ids, and a per-row mask (query at
position p sees keys 0..p of its row) over an attended window sized by the longest row. The cache
object's `update()` writes each row's new keys/values into its slot at its positions and hands
attention the rows' windows: a view of slots 0..B-1 when the batch is exactly those slots (slots
stay compact, so a replica whose sessions all step together gets this), otherwise the batch's
slots gathered (one copy of the attended window per layer, about 2 % of a 7B step on an H100).

On CUDA a fixed set of shapes (rows x new tokens x window, in buckets: `graphs.py`) is captured
as CUDA graphs when the backend starts, within a memory budget, and replayed; softmax to
probabilities is inside the graph. Steps of other shapes (long prefills, which the tiers feed in
chunks apart from decode batches; blocks over 16) run eagerly, as does everything on the CPU, so
every CPU test covers the step itself.

When all slots are taken, the least recently used session not in the batch loses its slot and
recomputes on its next call (calls stay answerable from scratch; tiers check at start that their
slots hold every session a router can have in flight). A released session gives its slot back at
once (after the pass in progress, if one is running on another thread).
"""

from __future__ import annotations

import logging

import torch
from torch import Tensor

from ...config.app import STATIC_DEFAULT_MAX_LEN
from .base import BackendSession, ModelBackend, Plan, logits_to_keep
from .graphs import TOKEN_BUCKETS, GraphSet, Shape

log = logging.getLogger(__name__)

PAD_TOKEN = 0  # any valid id: padding writes to the scratch position and its outputs are discarded
DEFAULT_GRAPH_MEMORY_MB = 2048

try:  # transformers' cache base class (its mask helpers check for it)
    from transformers.cache_utils import Cache as _CacheBase
except ImportError:  # pragma: no cover
    _CacheBase = object


class SlotCache(_CacheBase):
    """Per-layer K/V buffers [slots, kv_heads, capacity, head_dim]. Before each step `bind` says
    which slot each row is (None: row i is slot i), at which positions the rows' new tokens go and
    how wide a window they attend; `update` writes the new keys/values there and returns the rows'
    attended windows."""

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
        self.slots: Tensor | None = None  # [rows]
        self.positions: Tensor | None = None  # [rows, n]
        self.window = 0

    def bind(self, slots: Tensor | None, positions: Tensor, window: int) -> None:
        self.slots, self.positions, self.window = slots, positions, window

    def update(self, key_states: Tensor, value_states: Tensor, layer_idx: int, *args, **kwargs):
        rows, heads, n, dim = key_states.shape
        keys, values = self.keys[layer_idx], self.values[layer_idx]
        positions = self.positions.to(keys.device)
        if self.slots is None:  # rows 0..rows-1 are slots 0..rows-1: work on a view, copy nothing
            keys, values = keys[:rows], values[:rows]
            index = positions.view(rows, 1, n, 1).expand(rows, heads, n, dim)
            keys.scatter_(2, index, key_states)
            values.scatter_(2, index, value_states)
            return keys[:, :, : self.window], values[:, :, : self.window]
        slots = self.slots.to(keys.device)
        at = (slots.view(rows, 1).expand(rows, n), slice(None), positions)  # -> [rows, n, heads, dim]
        keys[at] = key_states.transpose(1, 2)
        values[at] = value_states.transpose(1, 2)
        return keys[:, :, : self.window].index_select(0, slots), values[:, :, : self.window].index_select(0, slots)

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


class StaticBackend(ModelBackend):
    kind = "static"

    def __init__(self, model, *, name: str, vocab_size: int | None = None, slots: int = 32,
                 max_len: int | None = None, cuda_graphs: bool = True, max_batch: int | None = None,
                 graph_memory_mb: int = DEFAULT_GRAPH_MEMORY_MB):
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
        self.graphs: GraphSet | None = None
        self._uncaptured_seen: set = set()  # step sizes whose eager fallback was logged
        if cuda_graphs and self.device.type == "cuda" and self._single_device(model):
            self.graphs = GraphSet(self._graph_step, device=self.device, max_rows=min(max_batch or self.slots, self.slots),
                                   capacity=self.max_len, vocab=self.vocab_size, scratch=self._scratch,
                                   memory_budget_mb=graph_memory_mb)

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
                self.slot_evictions += 1
                if self.slot_evictions == 1:
                    log.warning("static backend %r: all %d slots in use, a session lost its slot and recomputes "
                                "its context on its next call (raise static.slots; later evictions are counted, "
                                "not logged)", self.name, self.slots)
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

    def _forward(self, plans: list[Plan], ids: Tensor | None = None) -> list[Tensor]:
        for plan in plans:
            end = plan.session.cached_length + len(plan.new_tokens)
            if end > self.max_len:
                raise ValueError(f"a sequence of {end} tokens does not fit the static backend's max_len of "
                                 f"{self.max_len} tokens")
        order = sorted(range(len(plans)), key=lambda i: plans[i].session.slot)  # rows in slot order
        batch = [plans[i] for i in order]
        slots = [plan.session.slot for plan in batch]
        n = max(len(plan.new_tokens) for plan in batch)
        longest = max(plan.session.cached_length + len(plan.new_tokens) for plan in batch)
        shape = self.graphs.shape_for(len(batch), n, longest) if self.graphs else None
        self._count_step(self._how(shape, len(batch), n, longest))
        rows, width, window = (shape.rows, shape.tokens, shape.window) if shape else (len(batch), n, longest)

        host_ids = torch.full((rows, width), PAD_TOKEN, dtype=torch.long)
        positions = torch.full((rows, width), self._scratch, dtype=torch.long)
        slot_index = torch.zeros(rows, dtype=torch.long)  # padding rows: slot 0's scratch position
        for row, plan in enumerate(batch):
            count, length = len(plan.new_tokens), plan.session.cached_length
            if ids is None:
                host_ids[row, width - count:] = torch.tensor(plan.new_tokens)
            positions[row, width - count:] = torch.arange(length, length + count)
            slot_index[row] = plan.session.slot
        if ids is None:
            step_ids = host_ids.to(self.device)
        else:  # one token a row, chosen on the device: never read here
            step_ids = host_ids.to(self.device)
            step_ids[: len(batch), width - 1] = ids.view(-1)[torch.tensor(order, device=ids.device)]
        if shape is not None:
            probs = self.graphs.replay(shape, step_ids, positions.to(self.device), slot_index.to(self.device))
        else:
            contiguous = slots == list(range(len(batch)))
            keep = max(plan.rows_needed for plan in batch)
            probs = self._step(step_ids, positions.to(self.device), None if contiguous else slot_index.to(self.device),
                               window, keep)  # [rows, keep, V]
        results: list[Tensor | None] = [None] * len(plans)
        for row, (index, plan) in enumerate(zip(order, batch)):
            results[index] = probs[row, probs.shape[1] - plan.rows_needed:].clone()
        return results  # type: ignore[return-value]

    def _how(self, shape: Shape | None, rows: int, tokens: int, window: int) -> str:
        """How a step of this size runs (`base.STEP_KINDS`); the first uncaptured step of each size
        is logged with the reason."""
        if self.graphs is None:
            return "eager"
        if shape is not None:
            return "graph"
        if tokens > TOKEN_BUCKETS[-1]:
            return "wide"
        missed = self.graphs.bucketed(rows, tokens, window)
        if missed not in self._uncaptured_seen:
            self._uncaptured_seen.add(missed)
            log.warning("static backend %r: a step of %d rows x %d tokens over %d keys has no captured CUDA graph "
                        "and runs eagerly (%s)", self.name, rows, tokens, window, self.graphs.why_not(missed))
        return "uncaptured"

    def _step(self, ids: Tensor, positions: Tensor, slots: Tensor | None, window: int, keep: int) -> Tensor:
        """[rows, keep, V] probabilities of the last `keep` positions of each row (`slots`: each
        row's slot, or None when row i is slot i)."""
        self.cache.bind(slots, positions, window)
        keys = torch.arange(window, device=positions.device)
        visible = keys.view(1, 1, 1, -1) <= positions.unsqueeze(1).unsqueeze(-1)  # [rows, 1, n, window]
        # Additive, so every attention implementation (sdpa, eager) reads it the same way.
        mask = torch.zeros(visible.shape, dtype=self.dtype, device=positions.device)
        mask.masked_fill_(~visible, torch.finfo(self.dtype).min)
        out = self.model(input_ids=ids, position_ids=positions, attention_mask=dict.fromkeys(self._layer_types, mask),
                         use_cache=True, logits_to_keep=logits_to_keep(ids.shape[1], keep, ids.device),
                         **self.cache_kwargs(self.cache, positions[0]))
        return self.probabilities(out.logits)

    def _graph_step(self, ids: Tensor, positions: Tensor, slots: Tensor, window: int, out: Tensor) -> None:
        """The captured step: every row's slot gathered, probabilities of every position into `out`."""
        probs = self._step(ids, positions, slots, window, ids.shape[1])
        out[: probs.shape[0], : probs.shape[1]].copy_(probs)
