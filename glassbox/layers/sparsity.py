"""Sparse attention masks applied inside the live attention: which keys each query may keep.

A method looks at one sequence's attention in one layer and returns a keep mask; the readable PyTorch
path (kernels/attention_torch.attend) sets the dropped scores to -inf before the softmax, so the kept
probabilities are renormalised. Only the sequences that ask for a mask take that path; the others run as
usual. Masks work on prefill and decode alike.

What this costs, honestly: `top_k` and `threshold` run over the dense scores and then mask them
("simulated sparsity") — they measure the effect on quality and save no compute. `sliding_window`
(StreamingLLM) and `h2o` (heavy hitters) save memory: in the engine, once a sequence's prompt is computed
(in the mask form, as here), what they drop is evicted from its KV cache for good and its blocks go back
to the pool (engine/eviction.py); a decode step then attends over exactly the keys it keeps, on the fast
path for `sliding_window` (h2o's steps take the readable path, which hands it the probabilities it
accumulates). `block_sparse` (Quest) saves decode time: served, its prompt attends densely and each decode
token reads only its chosen KV blocks in the kernels (`reads_blocks`; engine/quest.py keeps the blocks' key
summaries); the mask form here masks every query as such a decode token would be. Each method's `saves`
says which.

Positions under eviction: original positions. A kept key keeps the rotary position it was computed at,
and a query sits at its own position in the sequence, so an evicting step computes exactly the mask form
over dense attention with the same kept keys (tests/test_kv_eviction.py holds it to that). StreamingLLM's
"rolling" cache instead renumbers the kept keys 0..n-1 (positions within the cache), which lets a model
run past its trained context but needs the keys stored before rotation and rotated again every step; here
the engine's limit max_model_len still applies.

A method is a small class: parse its parameters with `Params`, answer `is_dense` (keeps everything at this
context length: the sequence then takes the dense path and gives exactly the dense output), and `keep`.
Plugins register more (research/plugins.py).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any, ClassVar

import numpy as np
import torch

from glassbox.algorithms import ALGORITHMS


class SparsityError(ValueError):
    """A bad sparsity spec; `field` names the offending field (e.g. "sparsity.k")."""

    def __init__(self, field: str, message: str) -> None:
        super().__init__(f"{field}: {message}")
        self.field = field


_MISSING = object()


class Params:
    """A method's parameters from a request, read one by one with their checks."""

    def __init__(self, values: dict[str, Any], prefix: str = "sparsity") -> None:
        self.values = dict(values)
        self.prefix = prefix
        self.read: set[str] = set()

    def error(self, name: str, message: str) -> SparsityError:
        return SparsityError(f"{self.prefix}.{name}", message)

    def number(
        self,
        name: str,
        default: Any = _MISSING,
        *,
        integer: bool = False,
        minimum: float | None = None,
        maximum: float | None = None,
        exclusive: bool = False,
    ) -> Any:
        """An int (integer=True) or float in [minimum, maximum] ((minimum, maximum) if exclusive); None
        when absent and default is None."""
        self.read.add(name)
        value = self.values.get(name, default)
        if value is _MISSING:
            raise self.error(name, "is required")
        if value is None:
            return None
        if isinstance(value, bool) or not isinstance(value, (int, float)) or (integer and not isinstance(value, int)):
            raise self.error(name, f"must be {'an integer' if integer else 'a number'}, got {value!r}")
        try:
            finite = math.isfinite(value)
        except OverflowError:  # an integer beyond float range
            finite = False
        if not finite:
            raise self.error(name, "must be a finite number in range")
        low_bad = minimum is not None and (value <= minimum if exclusive else value < minimum)
        high_bad = maximum is not None and (value >= maximum if exclusive else value > maximum)
        if low_bad or high_bad:
            brackets = "()" if exclusive else "[]"
            lo = "-inf" if minimum is None else minimum
            hi = "inf" if maximum is None else maximum
            raise self.error(name, f"must be in {brackets[0]}{lo}, {hi}{brackets[1]}, got {value}")
        return value

    def finish(self) -> None:
        unknown = sorted(set(self.values) - self.read)
        if unknown:
            raise self.error(unknown[0], f"unknown parameter; this method takes {', '.join(sorted(self.read)) or 'none'}")


@dataclass
class MaskInputs:
    """What a method sees for one sequence in one layer. H = query heads, Lq = new queries, Lk = keys."""

    scores: torch.Tensor  # [H, Lq, Lk] float32 scaled scores, -inf where not allowed
    allowed: torch.Tensor  # [Lq, Lk] bool: causal (and the model's own window)
    q: torch.Tensor  # [Lq, H, D] queries (RoPE applied)
    keys: torch.Tensor  # [Lk, KV, D] every key of the context
    layer_idx: int
    state: dict[str, Any]  # this sequence's memory for this layer, kept across steps (h2o's history)

    @property
    def q_positions(self) -> torch.Tensor:  # [Lq, 1]: query i sits at position Lk - Lq + i
        lq, lk = self.allowed.shape
        return torch.arange(lk - lq, lk, device=self.allowed.device)[:, None]

    @property
    def k_positions(self) -> torch.Tensor:  # [1, Lk]
        return torch.arange(self.allowed.shape[1], device=self.allowed.device)[None, :]

    def rank_keep(self, ranking: torch.Tensor, counts: torch.Tensor) -> torch.Tensor:
        """Keep the `counts[i]` best keys of each row of `ranking` ([H, Lq, Lk], higher = better,
        -inf = never); counts [Lq] or [H, Lq]. -> [H, Lq, Lk] bool."""
        top = int(counts.max().clamp(max=ranking.shape[-1]))
        if top <= 0:
            return torch.zeros_like(ranking, dtype=torch.bool)
        order = ranking.topk(top, dim=-1).indices  # [H, Lq, top]
        within = torch.arange(top, device=ranking.device) < counts[..., None]  # [.., Lq, top]
        keep = torch.zeros_like(ranking, dtype=torch.bool)
        return keep.scatter_(-1, order, within.expand_as(order)) & (ranking > float("-inf"))


def broadcast_rows(table: torch.Tensor) -> bool:
    """Whether a [L, KV, n] table is one row seen by every (layer, KV head) through a broadcast view."""
    return all(table.stride(d) == 0 or table.shape[d] == 1 for d in (0, 1))


class KVSlots:
    """What one sequence's KV cache still holds once eviction began, per layer and KV head, slot by slot.

    Slot j of row (layer l, KV head h) holds the key/value of token `positions[l, h, j]` (rotated at that
    position). Every row holds the same number of slots, so the sequence's block table covers `num_slots`
    tokens; rows may hold different tokens (h2o chooses per KV head), and their order is not the tokens'
    (eviction fills holes from the end: a decode query attends to every slot, in any order).

    The positions live on the host, so a method that chooses by position (sliding_window) decides there,
    with no device work and no wait on the device; the engine moves every sequence's evicted slots in one
    copy a step. While every row holds the same tokens in the same slots (sliding_window's caches) they are
    one row (`row`, numpy: a decode step's bookkeeping is a few microseconds a sequence, which a GPU step of
    a small model feels). The scores a method observes (h2o) live where the attention ran."""

    def __init__(self, num_layers: int, num_kv_heads: int, row: np.ndarray, device: torch.device) -> None:
        self.rows = (num_layers, num_kv_heads)
        self.row: np.ndarray | None = row  # [n] int64 positions of every row, while they are the same
        self.table: torch.Tensor | None = None  # [L, KV, n] int64 positions, once rows differ
        self.device = device  # the KV cache's: where `scores` live
        self.scores: torch.Tensor | None = None  # [L, KV, n] float32 attention each slot received so far (h2o)

    @classmethod
    def full(cls, num_layers: int, num_kv_heads: int, num_tokens: int, device: torch.device) -> KVSlots:
        """A cache that holds tokens 0 .. num_tokens - 1 in order, in every row."""
        return cls(num_layers, num_kv_heads, np.arange(num_tokens, dtype=np.int64), device)

    @property
    def positions(self) -> torch.Tensor:
        """[L, KV, n] int64 original positions, on the CPU (a broadcast view of `row` while uniform)."""
        if self.row is not None:
            return torch.from_numpy(self.row).expand(*self.rows, len(self.row))
        return self.table

    @property
    def uniform(self) -> bool:
        """Every row holds the same tokens in the same slots."""
        return self.row is not None

    @property
    def num_slots(self) -> int:
        return len(self.row) if self.row is not None else self.table.shape[-1]

    def append(self, start: int, num_new: int) -> None:
        """The tokens at positions start .. start + num_new - 1 took the next slots of every row (scores of 0
        until observed)."""
        if self.row is not None:
            self.row = np.concatenate([self.row, np.arange(start, start + num_new, dtype=np.int64)])
        else:
            new = torch.arange(start, start + num_new)
            self.table = torch.cat([self.table, new.expand(*self.rows, num_new)], -1)
        if self.scores is not None:
            self.scores = self._padded(self.scores, self.num_slots)

    def observe(self, layer_idx: int, probs: torch.Tensor) -> None:
        """Add one layer's attention probabilities [H, Lq, Lk] (Lk = slots incl. this step's tokens) to the
        scores of the slots, summed over the query heads that share each KV head."""
        num_heads, _, lk = probs.shape
        num_kv = self.rows[1]
        received = probs.sum(1).view(num_kv, num_heads // num_kv, lk).sum(1)  # [KV, Lk]
        self._scores(lk)[layer_idx, :, :lk] += received

    def receive(self, received: torch.Tensor) -> None:
        """Add what the slots received in every layer, [L, KV, Lk] summed over each KV head's query heads
        (the native stack writes it: kernels/cpu/paged_attention.c)."""
        lk = received.shape[-1]
        self._scores(lk)[:, :, :lk] += received.to(self.device)

    def _scores(self, length: int) -> torch.Tensor:
        """The scores, made (zeros) or padded to cover `length` slots."""
        if self.scores is None:
            self.scores = torch.zeros(*self.rows, self.num_slots, device=self.device)
        if self.scores.shape[-1] < length:
            self.scores = self._padded(self.scores, length)
        return self.scores

    def compact(
        self, evicted: torch.Tensor, count: int
    ) -> tuple[np.ndarray | None, np.ndarray | None, np.ndarray, np.ndarray]:
        """Drop the slots `evicted` ([L, KV, n] bool on the host, `count` in every row): each row's evicted
        slots below n - count take its kept slots at or above them, in order. Returns the moves the cache
        must make: layer, KV head, slot to, slot from ([P] each); layer and KV head are None where every row
        moves the same slots (a uniform cache and one row of `evicted` broadcast: sliding_window's)."""
        keep = self.num_slots - count
        if self.row is not None and self.scores is None and broadcast_rows(evicted):
            mask = evicted[0, 0].numpy()
            holes, sources = np.flatnonzero(mask[:keep]), np.flatnonzero(~mask[keep:]) + keep
            row = self.row.copy()
            row[holes] = row[sources]
            self.row = row[:keep]
            return None, None, holes, sources
        holes = evicted[..., :keep].nonzero()  # [P, 3]: layer, KV head, slot; row-major, so ...
        sources = (~evicted[..., keep:]).nonzero()  # ... the i-th source is in the i-th hole's row
        layers, heads, destination, source = holes[:, 0], holes[:, 1], holes[:, 2], sources[:, 2] + keep
        table = self.positions.contiguous()  # rows of their own from now on
        table[layers, heads, destination] = table[layers, heads, source]
        self.row, self.table = None, table[..., :keep].contiguous()
        if self.scores is not None:
            index = [t.to(self.device, non_blocking=True) for t in (layers, heads, destination, source)]
            self.scores[index[0], index[1], index[2]] = self.scores[index[0], index[1], index[3]]
            self.scores = self.scores[..., :keep].contiguous()
        return layers.numpy(), heads.numpy(), destination.numpy(), source.numpy()

    @staticmethod
    def _padded(table: torch.Tensor, length: int) -> torch.Tensor:
        return torch.nn.functional.pad(table, (0, length - table.shape[-1]))


class SparsityMethod:
    """Base class: subclasses set `name`, `description`, `selects_from` and implement `keep` (and `parse`
    when they take parameters). A method that can evict sets `evicts` and implements `evict` (and
    `observes_scores` + `start_eviction` if its choice needs the attention it received)."""

    name: ClassVar[str]
    description: ClassVar[str] = ""
    # What the choice of keys depends on; "scores" means the dense scores must be computed first.
    selects_from: ClassVar[str] = "scores"
    # What the method saves when served (listed by GET /optimization/sparsity_mask).
    saves: ClassVar[str] = "nothing yet: a mask over the dense scores (quality only)"
    # Whether what it drops for one decode query stays dropped for every later one (a key never comes
    # back), so that the engine may evict it from the KV cache and free its blocks. Read through
    # `declares_eviction`: only the class that sets it evicts, not a subclass that inherits it.
    evicts: ClassVar[bool] = False
    # Evicting decode steps must hand this method the probabilities of the kept keys (h2o's history).
    observes_scores: ClassVar[bool] = False
    # Served, the prompt attends densely and each decode token reads only `block_budget` KV blocks of the
    # layer, chosen by the kernels from the blocks' key summaries (engine/quest.py): Quest's rule.
    reads_blocks: ClassVar[bool] = False

    @classmethod
    def parse(cls, params: Params) -> SparsityMethod:
        """Read the parameters (methods without any keep this default)."""
        return cls()

    @classmethod
    def declares_eviction(cls) -> bool:
        """`evicts`, as set by this very class: a plugin's subclass of sliding_window that changes `keep`
        must not evict by the `evict` it inherited (which follows the parent's keep), so it runs the mask
        form unless it says `evicts = True` (and evicts by its own rule) itself."""
        return bool(vars(cls).get("evicts", False))

    @classmethod
    def declares_block_reads(cls) -> bool:
        """`reads_blocks`, unless a subclass changed `keep` without declaring it reads blocks itself: the
        kernels read the blocks of Quest's rule, which its own mask would no longer be. (A plugin's block
        selector subclasses BlockSparse and chooses its budget per layer and context in `block_budget`.)"""
        for klass in cls.__mro__:
            if "reads_blocks" in vars(klass):
                return bool(vars(klass)["reads_blocks"]) and cls.keep is klass.keep
        return False

    def params(self) -> dict[str, Any]:
        return {k: v for k, v in vars(self).items() if v is not None}

    def spec(self) -> dict[str, Any]:
        return {"method": self.name, **self.params()}

    def is_dense(self, context_len: int) -> bool:
        """True if the mask keeps every allowed key of every query at this context length."""
        return False

    def keep(self, x: MaskInputs) -> torch.Tensor:
        """-> bool mask broadcastable to [H, Lq, Lk]; True = keep. Anded with `allowed` afterwards."""
        raise NotImplementedError

    def start_eviction(self, slots: KVSlots, layer_state: dict[int, dict[str, Any]], num_heads: int) -> None:
        """The prompt is computed (in the mask form) and eviction begins: carry what the mask form learnt
        (its `layer_state`) into `slots` (every token still there, in order)."""

    def evict(self, slots: KVSlots, next_position: int) -> torch.Tensor:
        """Which slots the query at `next_position` no longer keeps (it attends to the others and to
        itself): [L, KV, n] bool, the same number in every row. Evicting methods only."""
        raise NotImplementedError

    def block_budget(self, layer_idx: int, context_len: int) -> int:
        """Methods that read blocks: the KV blocks a decode token at this context length reads in this layer
        (0: all of them)."""
        return 0

    def block_budgets(self, context_len: int, num_layers: int) -> list[int]:
        """`block_budget` of every layer (asked once per decode row and step: on a GPU step the host's time)."""
        return [self.block_budget(layer, context_len) for layer in range(num_layers)]

    def max_kv_tokens(self, context_len: int) -> int:
        """The most keys an evicted cache holds during a decode step while a sequence grows to
        `context_len` tokens (what its blocks must cover)."""
        return context_len

    def __repr__(self) -> str:
        return f"{type(self).__name__}({self.params()})"


class Dense(SparsityMethod):
    name = "dense"
    description = "no mask (opts a request out of a global mask)"
    selects_from = "nothing"

    def is_dense(self, context_len: int) -> bool:
        return True

    def keep(self, x: MaskInputs) -> torch.Tensor:
        return x.allowed


class TopK(SparsityMethod):
    name = "top_k"
    description = "each query keeps its k highest-scoring keys (or the top 1 - sparsity_ratio share of them)"

    def __init__(self, k: int | None, sparsity_ratio: float | None, threshold: float | None) -> None:
        self.k, self.sparsity_ratio, self.threshold = k, sparsity_ratio, threshold

    @classmethod
    def parse(cls, params: Params) -> TopK:
        k = params.number("k", None, integer=True, minimum=1)
        ratio = params.number("sparsity_ratio", None, minimum=0, maximum=1)
        # The design's {"mask_pattern": "top_k", "k": 32, "threshold": 0.1}: of the top k, also drop keys whose
        # probability is below the threshold (the row's best key always stays).
        threshold = params.number("threshold", None, minimum=0, maximum=1)
        if (k is None) == (ratio is None):
            raise params.error("k", "give exactly one of k and sparsity_ratio")
        if ratio == 1:
            raise params.error("sparsity_ratio", "must be below 1 (every query keeps at least one key)")
        return cls(k, ratio, threshold)

    def is_dense(self, context_len: int) -> bool:
        if self.threshold:
            return False
        return self.k >= context_len if self.k is not None else self.sparsity_ratio == 0

    def keep(self, x: MaskInputs) -> torch.Tensor:
        allowed_per_row = x.allowed.sum(-1)  # [Lq]
        if self.k is not None:
            counts = allowed_per_row.clamp(max=self.k)
        else:
            counts = share(allowed_per_row, 1 - self.sparsity_ratio).clamp(min=1)
        keep = x.rank_keep(x.scores, counts)
        if self.threshold:
            keep &= above_threshold(x.scores, self.threshold)
        return keep


def share(counts: torch.Tensor, fraction: float) -> torch.Tensor:
    """ceil(counts x fraction) as integers, computed in float64 so that an exact product is not rounded up
    (float32 made 0.6 x 25 = 15.000001 -> 16)."""
    return torch.ceil(counts.double() * fraction - 1e-9).long()


def above_threshold(scores: torch.Tensor, threshold: float) -> torch.Tensor:
    """Keys whose dense probability reaches the threshold, and each row's best key."""
    probs = scores.softmax(-1)
    return (probs >= threshold) | (probs == probs.amax(-1, keepdim=True))


class Threshold(SparsityMethod):
    name = "threshold"
    description = "each query keeps the keys whose dense probability is at least `threshold` (and its best key)"

    def __init__(self, threshold: float) -> None:
        self.threshold = threshold

    @classmethod
    def parse(cls, params: Params) -> Threshold:
        return cls(params.number("threshold", minimum=0, maximum=1, exclusive=True))

    def keep(self, x: MaskInputs) -> torch.Tensor:
        return above_threshold(x.scores, self.threshold)


class SlidingWindow(SparsityMethod):
    name = "sliding_window"
    description = "StreamingLLM: the first `sink_tokens` keys and the last `window` (the query's own included)"
    selects_from = "positions"
    saves = (
        "KV memory and decode time: evicts the keys between the sinks and the window, so a sequence holds "
        "sink_tokens + window keys and each decode step reads only those (native CPU attention, CUDA graphs)"
    )
    evicts = True

    def __init__(self, window: int, sink_tokens: int) -> None:
        self.window, self.sink_tokens = window, sink_tokens

    @classmethod
    def parse(cls, params: Params) -> SlidingWindow:
        window = params.number("window", integer=True, minimum=1)
        return cls(window, params.number("sink_tokens", 4, integer=True, minimum=0))

    def is_dense(self, context_len: int) -> bool:
        # The last query (position context_len - 1) drops keys sink_tokens .. context_len - 1 - window.
        return context_len <= self.window + self.sink_tokens

    def keep(self, x: MaskInputs) -> torch.Tensor:
        k_pos = x.k_positions
        return (k_pos > x.q_positions - self.window) | (k_pos < self.sink_tokens)

    def evict(self, slots: KVSlots, next_position: int) -> torch.Tensor:
        # keep's rule for the query at next_position; a key past the window stays past it for later queries.
        if slots.uniform:  # every row holds the same positions: decided on one, broadcast
            row = slots.row
            mask = (row <= next_position - self.window) & (row >= self.sink_tokens)
            return torch.from_numpy(mask).expand(*slots.rows, len(row))
        return (slots.positions <= next_position - self.window) & (slots.positions >= self.sink_tokens)

    def max_kv_tokens(self, context_len: int) -> int:
        return min(context_len, self.sink_tokens + self.window)


class BlockSparse(SparsityMethod):
    name = "block_sparse"
    description = (
        "Quest: keys in blocks of `block_size`; each query keeps its own block and the `top_blocks` - 1 others "
        "with the highest upper bound of q·k from the blocks' per-channel key min/max (one choice per KV head: "
        "the max of its query heads' bounds); the first `dense_layers` layers keep everything"
    )
    selects_from = "per-block key bounds"
    saves = (
        "decode time: served, the prompt attends densely (Quest's prefill) and each decode token reads only its "
        "top_blocks KV blocks in the native CPU attention and the Triton decode kernel, when block_size is the "
        "KV cache's; the mask form (every query masked) elsewhere"
    )
    reads_blocks = True

    def __init__(self, block_size: int, top_blocks: int, dense_layers: int = 0) -> None:
        self.block_size, self.top_blocks, self.dense_layers = block_size, top_blocks, dense_layers

    @classmethod
    def parse(cls, params: Params) -> BlockSparse:
        block_size = params.number("block_size", 16, integer=True, minimum=1)
        top_blocks = params.number("top_blocks", integer=True, minimum=1)
        return cls(block_size, top_blocks, params.number("dense_layers", 0, integer=True, minimum=0))

    def is_dense(self, context_len: int) -> bool:
        return -(-context_len // self.block_size) <= self.top_blocks

    def block_budget(self, layer_idx: int, context_len: int) -> int:
        if layer_idx < self.dense_layers or self.is_dense(context_len):
            return 0
        return self.top_blocks

    def block_budgets(self, context_len: int, num_layers: int) -> list[int]:
        if type(self).block_budget is not BlockSparse.block_budget:  # a subclass chooses per layer
            return super().block_budgets(context_len, num_layers)
        if self.is_dense(context_len):
            return [0] * num_layers
        dense = min(self.dense_layers, num_layers)
        return [0] * dense + [self.top_blocks] * (num_layers - dense)

    def keep(self, x: MaskInputs) -> torch.Tensor:
        lk, num_kv, head_dim = x.keys.shape
        budget = self.block_budget(x.layer_idx, lk)  # (a subclass may choose it per layer and context)
        if budget == 0:
            return x.allowed
        lq, num_heads = x.q.shape[:2]
        num_blocks = -(-lk // self.block_size)
        padded = torch.full((num_blocks * self.block_size, num_kv, head_dim), float("nan"), device=x.keys.device)
        padded[:lk] = x.keys.float()
        blocks = padded.view(num_blocks, self.block_size, num_kv, head_dim)
        kmin = blocks.nan_to_num(float("inf")).amin(1)  # [nb, KV, D]
        kmax = blocks.nan_to_num(float("-inf")).amax(1)
        group = num_heads // num_kv
        q = x.q.float().view(lq, num_kv, group, head_dim).permute(1, 2, 0, 3)  # [KV, G, Lq, D]
        # max over the box of q·k = Σ_d max(q_d·min_d, q_d·max_d), then the max over the KV head's query heads
        bound = q.clamp(min=0) @ kmax.permute(1, 2, 0)[:, None] + q.clamp(max=0) @ kmin.permute(1, 2, 0)[:, None]
        bound = bound.amax(1)  # [KV, Lq, nb]
        q_block = x.q_positions // self.block_size  # [Lq, 1]
        block_ids = torch.arange(num_blocks, device=bound.device)[None, :]
        bound = bound.masked_fill(block_ids > q_block, float("-inf"))  # blocks wholly in the future
        bound = bound.masked_fill(block_ids == q_block, float("inf"))  # the query's own block always
        counts = torch.full((lq,), budget, device=bound.device)
        chosen = x.rank_keep(bound, counts).repeat_interleave(group, dim=0)  # [H, Lq, nb]
        return chosen.repeat_interleave(self.block_size, dim=-1)[..., :lk]


class H2O(SparsityMethod):
    name = "h2o"
    description = (
        "Heavy-hitter oracle: each query keeps its most recent recent_ratio share of keys and the heavy_ratio share "
        "of older keys that received the most attention from all earlier queries"
    )
    selects_from = "history of scores"
    saves = (
        "KV memory: evicts, per KV head, the older keys that received the least attention; a sequence holds "
        "(heavy_ratio + recent_ratio) of its tokens, and decode time on the native CPU stack (its attention "
        "writes the probabilities h2o accumulates); on the GPU its decode steps run the readable attention"
    )
    evicts = True
    observes_scores = True

    def __init__(self, heavy_ratio: float, recent_ratio: float) -> None:
        self.heavy_ratio, self.recent_ratio = heavy_ratio, recent_ratio

    @classmethod
    def parse(cls, params: Params) -> H2O:
        heavy = params.number("heavy_ratio", 0.1, minimum=0, maximum=1)
        recent = params.number("recent_ratio", 0.1, minimum=0, maximum=1)
        if heavy + recent <= 0:
            raise params.error("heavy_ratio", "heavy_ratio + recent_ratio must be above 0")
        return cls(heavy, recent)

    def is_dense(self, context_len: int) -> bool:
        return self.heavy_ratio + self.recent_ratio >= 1

    def keep(self, x: MaskInputs) -> torch.Tensor:
        num_heads, lq, lk = x.scores.shape
        start = lk - lq
        history = x.state.get("h2o")  # [H, start]: attention each key received from queries before this step
        if history is None or history.shape[-1] != start:  # first step, or recomputed after a preemption
            history = torch.zeros(num_heads, start, device=x.scores.device)
        probs = x.scores.softmax(-1)  # dense probabilities [H, Lq, Lk]
        received = torch.nn.functional.pad(history, (0, lq))[:, None, :] + probs.cumsum(1) - probs
        x.state["h2o"] = received[:, -1] + probs[:, -1]
        n = x.allowed.sum(-1)  # [Lq] keys each query may see
        # Rounded up, so that heavy_ratio + recent_ratio >= 1 keeps everything (is_dense).
        recent = share(n, self.recent_ratio).clamp(min=1)
        is_recent = x.k_positions > x.q_positions - recent[:, None]
        older = received.masked_fill(is_recent | ~x.allowed, float("-inf"))
        return is_recent | x.rank_keep(older, share(n, self.heavy_ratio))

    # Served, h2o evicts as the paper's own cache does (its "real drop" code): once the prompt is computed,
    # each (layer, KV head) keeps the recent_ratio share of the n = position + 1 keys the next query could
    # see and the heavy_ratio share of the older keys it still holds that received the most attention —
    # summed over the query heads of that KV head, from the prompt's dense attention and, at each decode
    # step since, from the attention over the keys kept. An evicted key never comes back (the mask form
    # above may bring one back: it ranks every older key by its dense history), so at a step where both
    # shares grow the cache holds one heavy key fewer than the share. Each step evicts at most one key per
    # row, since both shares grow by at most one key per token.

    def start_eviction(self, slots: KVSlots, layer_state: dict[int, dict[str, Any]], num_heads: int) -> None:
        (num_layers, num_kv), n = slots.rows, slots.num_slots
        slots.scores = torch.zeros(num_layers, num_kv, n, device=slots.device)
        for layer_idx in range(num_layers):
            history = layer_state.get(layer_idx, {}).get("h2o")  # [H, n] from the prompt's mask form
            if history is not None and history.shape[-1] == n:
                slots.scores[layer_idx] = history.view(num_kv, num_heads // num_kv, n).sum(1)

    def evict(self, slots: KVSlots, next_position: int) -> torch.Tensor:
        n = torch.tensor([next_position + 1])
        recent = int(share(n, self.recent_ratio).clamp(min=1))
        heavy = int(share(n, self.heavy_ratio))
        older = (slots.positions <= next_position - recent).to(slots.scores.device)  # [L, KV, slots]
        ranking = slots.scores.masked_fill(~older, float("-inf"))
        kept = torch.zeros_like(older)
        top = min(heavy, slots.num_slots)
        if top:
            kept.scatter_(-1, ranking.topk(top, dim=-1).indices, True)
        return older & ~kept

    def max_kv_tokens(self, context_len: int) -> int:
        n = torch.tensor([context_len])  # the shares only grow with n: the last step holds the most
        return min(context_len, int(share(n, self.recent_ratio).clamp(min=1) + share(n, self.heavy_ratio)))


BUILTIN_METHODS: dict[str, type[SparsityMethod]] = {
    m.name: m for m in (Dense, TopK, Threshold, SlidingWindow, BlockSparse, H2O)
}
for _method in BUILTIN_METHODS.values():
    ALGORITHMS.sparsity_methods.add_builtin(_method)


def available_methods(extra: dict[str, type[SparsityMethod]] | None = None) -> dict[str, type[SparsityMethod]]:
    """Every method a request may name, from the one registry (built-ins, then the plugin's), plus `extra`
    (a plugin's method being tried before it is registered)."""
    return {**ALGORITHMS.sparsity_methods.entries(), **(extra or {})}


def parse_sparsity(
    spec: dict[str, Any] | SparsityMethod, extra: dict[str, type[SparsityMethod]] | None = None, prefix: str = "sparsity"
) -> SparsityMethod:
    """A request's sparsity object -> a method. Names the method with "method" (or the design's
    "mask_pattern"); the other keys are its parameters. Raises SparsityError naming the field."""
    if isinstance(spec, SparsityMethod):
        return spec
    if not isinstance(spec, dict):
        raise SparsityError(prefix, "must be an object like {\"method\": \"top_k\", \"k\": 32}")
    values = dict(spec)
    name = values.pop("method", None)
    pattern = values.pop("mask_pattern", None)
    if name is not None and pattern is not None and name != pattern:
        raise SparsityError(f"{prefix}.mask_pattern", f"names {pattern!r} but method names {name!r}")
    name = name if name is not None else pattern
    methods = available_methods(extra)
    if name is not None and not isinstance(name, str):
        raise SparsityError(f"{prefix}.method", f"must be a string naming one of {', '.join(methods)}")
    if name is None:
        raise SparsityError(f"{prefix}.method", f"is required; one of {', '.join(methods)}")
    if name not in methods:
        raise SparsityError(f"{prefix}.method", f"unknown {name!r}; one of {', '.join(methods)}")
    params = Params(values, prefix)
    method = methods[name].parse(params)
    params.finish()
    return method


@dataclass(eq=False)
class SparsityState:
    """A sequence's mask: the method, its per-layer memory, and the realised density so far."""

    method: SparsityMethod
    layer_state: dict[int, dict[str, Any]] = field(default_factory=dict)
    kept: torch.Tensor | int = 0  # attention entries kept (summed over layers, heads, queries) by masks
    allowed: torch.Tensor | int = 0  # causal entries they were chosen from
    # The same, for steps whose counts the host knows (dense steps, evicted caches, blocks read): ints, so
    # that counting them adds no device work once `kept` is a device tensor (on the GPU, ~1,000 tiny
    # kernels a Quest decode step at batch 32).
    host_kept: int = 0
    host_allowed: int = 0
    error: str | None = None  # a plugin method that raised: the rest of the request runs dense
    # The engine evicts what the method drops (it `evicts`, the model has no sliding window of its own, one
    # rank): set by LLMEngine.make_request.
    evicting: bool = False
    # Once eviction began (the prompt computed): what the sequence's KV cache holds. None before, and after
    # a preemption (the prompt and output are then recomputed in the mask form).
    slots: KVSlots | None = None
    evicted: int = 0  # tokens evicted from each (layer, KV head) of the cache since it was (re)computed

    @property
    def observes(self) -> bool:
        """Over an evicted cache, its method observes the attention the kept keys receive (h2o)."""
        return self.slots is not None and self.method.observes_scores

    def forget_cache(self) -> None:
        self.slots, self.evicted = None, 0

    def select(
        self, layer_idx: int, scores: torch.Tensor, allowed: torch.Tensor, q: torch.Tensor, keys: torch.Tensor
    ) -> torch.Tensor:
        """The keep mask [H, Lq, Lk] for one layer of this sequence (called from the attention kernel)."""
        keep = allowed.expand_as(scores)
        if self.slots is not None:  # an evicted cache: every slot is kept; the method sees the probabilities
            self.slots.observe(layer_idx, scores.softmax(-1))
            return keep
        inputs = MaskInputs(scores, allowed, q, keys, layer_idx, self.layer_state.setdefault(layer_idx, {}))
        if self.error is None:
            try:
                chosen = self.method.keep(inputs)
                if not isinstance(chosen, torch.Tensor) or chosen.dtype != torch.bool:
                    raise TypeError(f"keep() must return a bool tensor, got {getattr(chosen, 'dtype', type(chosen))}")
                keep = chosen.expand_as(scores) & allowed
            except Exception as error:  # a plugin's method must not take the engine down
                self.error = f"{type(error).__name__}: {error}"
        self.kept = self.kept + keep.sum()
        self.allowed = self.allowed + allowed.sum() * scores.shape[0]
        return keep

    def masks_step(self, q_len: int, context_len: int, num_heads: int, layer_windows: list[int | None]) -> bool:
        """Whether this step's attention must be masked. A mask that keeps everything at this length lets
        the step run the plain path (exactly the dense output); its entries are counted as kept. Over an
        evicted cache the step attends to every slot, so it runs the plain path too, unless the method
        observes the probabilities (h2o)."""
        if self.slots is not None:
            num_layers = len(layer_windows)
            positions = range(context_len - q_len, context_len)
            self.host_kept += sum(self.slots.num_slots + i + 1 for i in range(q_len)) * num_heads * num_layers
            self.host_allowed += sum(p + 1 for p in positions) * num_heads * num_layers
            return self.observes
        if not self.method.is_dense(context_len):
            return True
        self.count_dense(q_len, context_len, num_heads, layer_windows)
        return False

    def count_dense(self, q_len: int, context_len: int, num_heads: int, layer_windows: list[int | None]) -> None:
        """A step whose queries keep every key they may see (a mask that keeps everything, a served prompt
        under a method that reads blocks)."""
        positions = range(context_len - q_len, context_len)
        visible = sum(min(p + 1, window or p + 1) for window in layer_windows for p in positions) * num_heads
        self.host_kept += visible
        self.host_allowed += visible

    def read_blocks(self, context_len: int, num_layers: int, block_size: int, num_heads: int) -> list[int]:
        """A decode token that reads only chosen KV blocks (a method that `reads_blocks`, on the kernels):
        its budget in each layer (0: all blocks), with the keys it reads counted as kept."""
        budgets = self.method.block_budgets(context_len, num_layers)
        num_blocks = -(-context_len // block_size)
        last = context_len - (num_blocks - 1) * block_size  # keys in the token's own (last) block
        read = sum(context_len if budget == 0 or num_blocks <= budget else (budget - 1) * block_size + last for budget in budgets)
        self.host_kept += read * num_heads
        self.host_allowed += context_len * num_heads * num_layers
        return budgets

    def density(self) -> float | None:
        kept, allowed = self.kept + self.host_kept, self.allowed + self.host_allowed
        return None if not isinstance(allowed, torch.Tensor) and allowed == 0 else float(kept / allowed)

    def report(self) -> dict[str, Any]:
        out: dict[str, Any] = {**self.method.spec(), "density": self.density()}
        if self.evicting:  # what it saved: tokens evicted, and the keys its cache kept after its last eviction
            out["evicted_tokens"] = self.evicted
            out["kv_tokens_kept"] = self.slots.num_slots if self.slots is not None else None
        if self.error:
            out["error"] = self.error
        return out
