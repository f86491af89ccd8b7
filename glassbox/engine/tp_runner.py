"""Rank 0 of a tensor-parallel engine: the scheduler runs once (here), and each model call it makes is first
sent to the workers, which make the same call on their shards (engine/tp_worker.py), so that every rank
reaches the same collectives in the same order.

Two calls reach the model in a step (nano-vllm's rank 0 sends "run" the same way, through shared memory):
  Forward(input_ids, positions, metadata)  -> every rank runs its shard; the layers' all-reduces keep the
                                              hidden states whole on every rank
  Logits(hidden rows)                      -> every rank its vocabulary slice; rank 0 gathers and samples
Rank 0 sends the hidden rows (a few KB: 576 floats a row for the default model) rather than the workers
keeping theirs and being told which rows: any caller of `compute_logits` (sampling, prompt logprobs) then
works unchanged.

Each rank converts its slices as `quantization` says, as one rank would (CPU "auto": the checkpoint's own
GGUF blocks, multiplied by the native per-layer kernel; "none": float32). Every step runs the model's own
forward on every rank (the readable path: module hooks, attention capture): the native stack, all layers in
one C call, has no place for the all-reduces between them.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from glassbox.config import EngineConfig
from glassbox.engine.kv_cache import KVCache, bytes_per_block
from glassbox.engine.model_runner import ModelRunner, StepResult
from glassbox.engine.optimize import optimize_model
from glassbox.engine.scheduler import ScheduledBatch
from glassbox.engine.step_plan import StepPlan
from glassbox.engine.tp_group import TensorParallelGroup
from glassbox.errors import RankLostError
from glassbox.layers.attention import AttentionMetadata
from glassbox.layers.probe import StepProbe
from glassbox.models.loader import LoadedModel
from glassbox.models.tensor_parallel import attach_collectives, check_shardable, shard_model
from glassbox.sampling import SampleRequest


@dataclass
class WorkerSpec:
    """What a worker needs to build its rank, sent once by rank 0 after the group forms."""

    model: str | None  # a GGUF file or Hugging Face folder (None: the default model)
    dtype: torch.dtype
    num_blocks: int
    block_size: int
    kv_cache_dtype: torch.dtype
    quantization: str | None  # EngineConfig's: each rank converts its slices alike
    activations: str


@dataclass
class Forward:
    input_ids: torch.Tensor  # [T] int64
    positions: torch.Tensor  # [T] int64
    meta: AttentionMetadata  # without probe or cached decode batch
    capture_layers: frozenset[int] = frozenset()  # attention probabilities wanted back from these layers


@dataclass
class Logits:
    hidden: torch.Tensor  # [N, hidden]: the rows to compute logits of


@dataclass
class RankContext:
    """What a RankTask sees on its rank."""

    group: TensorParallelGroup
    model: nn.Module  # this rank's shard
    kv_cache: KVCache  # this rank's KV heads of every block
    kept: dict[str, Any]  # objects a task keeps on this rank for a later one (research: placed shards), bounded


class RankTask:
    """Work that runs on every rank at once (research tools: shards placed and multiplied on their ranks,
    weights gathered): rank 0 sends the task, then every rank calls `run_on_rank`, whose collectives all
    ranks reach in the same order. Rank 0's return value is the task's result; the others' are dropped."""

    def run_on_rank(self, rank: RankContext) -> Any:
        raise NotImplementedError


MAX_KEPT = 16  # objects kept per rank by tasks (the oldest dropped first)


def keep(kept: dict[str, Any], key: str, value: Any) -> None:
    """Keep `value` on this rank under `key`, dropping the oldest beyond MAX_KEPT."""
    kept.pop(key, None)
    kept[key] = value
    while len(kept) > MAX_KEPT:
        kept.pop(next(iter(kept)))


def prepare_rank(loaded: LoadedModel, group: TensorParallelGroup, spec: WorkerSpec) -> KVCache:
    """Shard the loaded model for this rank (in place), convert its slices as the engine's quantization says
    (float column-major, or GGUF blocks: the slices' boundaries are multiples of 32, the blocks' width), wire
    the collectives around them, and allocate this rank's share of the KV cache: every rank has the same
    blocks, each holding this rank's KV heads."""
    rank_config = shard_model(loaded.model, group.comm)
    optimize_model(loaded.model, spec.quantization, spec.activations)
    attach_collectives(loaded.model, group.comm)
    return KVCache(rank_config, spec.num_blocks, spec.block_size, spec.kv_cache_dtype, group.device)


def start_tensor_parallel(
    loaded: LoadedModel, config: EngineConfig, kv_dtype: torch.dtype, seed: int | None
) -> tuple[KVCache, TensorParallelRunner]:
    """Rank 0's side of a tensor-parallel engine: form the group (spawning the workers, or joining torchrun's),
    send them what to load, shard this rank, and return its KV cache and runner."""
    check_shardable(loaded.config, config.tensor_parallel_size)
    # As many blocks as tensor_parallel_size=1 gets from the same memory (so both schedule alike), each rank
    # holding its KV heads' share of every block.
    if config.num_kv_blocks is not None:
        num_blocks = config.num_kv_blocks
    else:
        num_blocks = (config.kv_cache_memory or 1 << 30) // bytes_per_block(loaded.config, config.block_size, kv_dtype)
        if num_blocks < 1:
            raise ValueError(f"KV cache memory {config.kv_cache_memory} bytes holds no block")
    group = TensorParallelGroup.launch_or_join(config.tensor_parallel_size, loaded.device)
    try:
        spec = WorkerSpec(
            loaded.source, loaded.dtype, num_blocks, config.block_size, kv_dtype, config.quantization, config.activations
        )
        group.send(spec)
        kv_cache = prepare_rank(loaded, group, spec)
        group.barrier()  # every worker has loaded its shard
    except Exception as error:
        try:
            if not isinstance(error, RankLostError):
                group.raise_if_lost(error)  # a worker that failed to load: say which, before stopping the others
        finally:
            group.shutdown()
        raise
    return kv_cache, TensorParallelRunner(loaded, kv_cache, group, seed)


class TensorParallelRunner(ModelRunner):
    def __init__(self, loaded: LoadedModel, kv_cache: KVCache, group: TensorParallelGroup, seed: int | None) -> None:
        super().__init__(loaded, kv_cache, seed, executors={"tensor_parallel": DriverExecutor(loaded.model, group)})
        self.group = group
        self.compute_logits: Callable[[torch.Tensor], torch.Tensor] = self._logits_on_every_rank
        self.rank_context = RankContext(group, loaded.model, kv_cache, {})

    def _plan(
        self,
        num_seqs: int,
        num_tokens: int,
        num_sampled: int,
        masked: tuple[int, ...],
        prompt_logprob_rows: tuple[int, ...],
        timed: bool,
        launched_ahead: bool,
        evicted: bool = False,
        quest: dict[int, list[int]] | None = None,
    ) -> StepPlan:
        # (no sparsity under tensor parallelism: `masked` and `quest` are empty)
        reason = f"{self.group.world_size} ranks over {self.group.backend}"
        return StepPlan(
            "tensor_parallel", reason, num_seqs, num_tokens, num_sampled, masked, prompt_logprob_rows, timed, launched_ahead
        )

    @staticmethod
    def can_launch_ahead(plan: StepPlan, sample_requests: dict[int, SampleRequest]) -> bool:
        return False  # every step is sent to the workers and read back before the next

    def execute(
        self,
        plan: StepPlan,
        batch: ScheduledBatch,
        sample_requests: dict[int, SampleRequest],
        prompt_logprobs: dict[int, int],
    ) -> StepResult:
        """As ModelRunner.execute. A step that fails once its forward was sent leaves the ranks out of step
        (the workers wait in a collective rank 0 left): it is fatal (RankLostError), never a hang."""
        self.group.check_alive()
        try:
            return super().execute(plan, batch, sample_requests, prompt_logprobs)
        except Exception as error:
            self.group.raise_if_lost(error)
            self.group.lost = f"the ranks are out of step after a failed step: {type(error).__name__}: {error}"
            raise RankLostError(self.group.lost) from error

    def run_forward(self, input_ids: torch.Tensor, positions: torch.Tensor, meta: AttentionMetadata) -> torch.Tensor:
        self.group.check_alive()
        return self.executors["tensor_parallel"].forward(input_ids, positions, meta)

    def _logits_on_every_rank(self, hidden: torch.Tensor) -> torch.Tensor:
        """hidden [N, hidden] -> logits [N, vocab], each rank computing its vocabulary slice."""
        self.group.send(Logits(hidden.contiguous()))
        with self.group.comm.in_step():
            return self.model.compute_logits(hidden)

    def run_task(self, task: RankTask) -> Any:
        """Run `task` on every rank (between steps: on the engine's thread); rank 0's result. A task that
        fails after it was sent leaves the ranks out of step: fatal, as a failed step."""
        self.group.check_alive()
        self.group.send(task)
        try:
            with self.group.comm.in_step():
                return task.run_on_rank(self.rank_context)
        except Exception as error:
            self.group.raise_if_lost(error)
            self.group.lost = f"the ranks are out of step after a failed {type(task).__name__}: {error}"
            raise RankLostError(self.group.lost) from error

    def check_alive(self) -> None:
        self.group.check_alive()

    def shutdown(self) -> None:
        self.group.shutdown()


class DriverExecutor:
    """Rank 0's forward: send it, then run this rank's shard (the model's own forward). Probabilities the
    step captures (`meta.probe.capture_layers`) are gathered from the ranks, heads in rank order."""

    name = "tensor_parallel"

    def __init__(self, model: nn.Module, group: TensorParallelGroup) -> None:
        self.model = model
        self.group = group

    def forward(self, input_ids: torch.Tensor, positions: torch.Tensor, meta: AttentionMetadata) -> torch.Tensor:
        probe = meta.probe
        if probe is not None and probe.masks:
            raise ValueError("sparsity masks do not run under tensor parallelism (tensor_parallel_size > 1)")
        capture = probe.capture_layers if probe is not None else frozenset()
        plain = dataclasses.replace(meta, probe=None, decode_batch=None)
        self.group.send(Forward(input_ids, positions, plain, capture))
        with self.group.comm.in_step():
            hidden = self.model(input_ids, positions, meta)
        if capture:
            parts = self.group.gather_objects(None)
            for layer in capture:
                per_rank = [probe.captured[layer]] + [part[layer] for part in parts[1:]]
                # one [H, q, k] tensor per sequence: the ranks' heads side by side
                probe.captured[layer] = [torch.cat([p.to(seqs[0].device) for p in seqs]) for seqs in zip(*per_rank)]
        return hidden


def worker_probe(capture_layers: frozenset[int]) -> StepProbe | None:
    """A worker's probe for a forward that captures attention (None when nothing is captured)."""
    return StepProbe(capture_layers=capture_layers) if capture_layers else None
