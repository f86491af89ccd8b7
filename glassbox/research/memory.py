"""Where the memory goes: weights, KV pool (allocated and in use), activations, process RSS; torch's
allocator statistics on CUDA."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch

from glassbox.engine.kv_cache import bytes_per_block
from glassbox.engine.llm_engine import LLMEngine
from glassbox.engine.tp_runner import RankContext, RankTask

MB = 2**20


def weight_bytes(model: torch.nn.Module) -> int:
    """Bytes of every parameter and buffer (quantized weights live in buffers), shared tensors once."""
    seen, total = set(), 0
    for tensor in [*model.parameters(), *model.buffers()]:
        key = (tensor.untyped_storage().data_ptr(), tensor.untyped_storage().nbytes())
        if key not in seen:
            seen.add(key)
            total += tensor.untyped_storage().nbytes()
    return total


def _proc_status() -> dict[str, int]:
    """VmRSS / VmHWM of this process in bytes (Linux); empty elsewhere."""
    try:
        with open("/proc/self/status") as f:
            fields = dict(line.split(":", 1) for line in f if ":" in line)
    except OSError:
        return {}
    return {k: int(fields[k].split()[0]) * 1024 for k in ("VmRSS", "VmHWM") if k in fields}


@dataclass
class MemoryOnRank(RankTask):
    """Every rank's weights, KV pool and process memory, on rank 0."""

    def run_on_rank(self, rank: RankContext) -> list[dict[str, Any]] | None:
        status = _proc_status()
        mine = {
            "rank": rank.group.rank,
            "device": str(rank.group.device),
            "model_weights_mb": weight_bytes(rank.model) / MB,
            "kv_cache_mb": rank.kv_cache.nbytes / MB,
            "process_rss_mb": status.get("VmRSS", 0) / MB,
            "process_peak_rss_mb": status.get("VmHWM", 0) / MB,
        }
        return rank.group.gather_objects(mine)


def memory_usage(engine: LLMEngine) -> dict[str, Any]:
    """This process's memory; under tensor parallelism also every rank's (`ranks`), rank 0's at the top
    level, and `kv_cache_mb.in_use` counted over all ranks."""
    result = _memory_here(engine)
    if engine.distributed:
        result["ranks"] = engine.runner.run_task(MemoryOnRank())
        result["how"] += "; ranks: each rank's own shard, KV heads and process"
    return result


def _memory_here(engine: LLMEngine) -> dict[str, Any]:
    loaded = engine.loaded
    weights = weight_bytes(loaded.model)
    kv_allocated = engine.kv_cache.nbytes
    kv_in_use = engine.block_manager.num_used_blocks * bytes_per_block(
        loaded.config, engine.config.block_size, engine.kv_cache.dtype
    )
    status = _proc_status()
    result: dict[str, Any] = {
        "device": str(loaded.device),
        "model_weights_mb": weights / MB,
        "kv_cache_mb": {"allocated": kv_allocated / MB, "in_use": kv_in_use / MB},
        "process_rss_mb": status.get("VmRSS", 0) / MB,
        "process_peak_rss_mb": status.get("VmHWM", 0) / MB,
    }
    if loaded.device.type == "cuda":
        stats = torch.cuda.memory_stats(loaded.device)
        allocated = stats.get("allocated_bytes.all.current", 0)
        result["activation_mb"] = max(allocated - weights - kv_allocated, 0) / MB
        result["peak_memory_mb"] = stats.get("allocated_bytes.all.peak", 0) / MB
        result["reserved_mb"] = stats.get("reserved_bytes.all.current", 0) / MB
        result["how"] = "torch.cuda.memory_stats: activations = allocated - weights - KV pool"
    else:
        # The CPU allocator keeps no statistics: what the process holds beyond weights and the KV pool is
        # activations, framework and interpreter, together.
        rss = status.get("VmRSS", 0)
        result["activation_mb"] = max(rss - weights - kv_allocated, 0) / MB
        result["peak_memory_mb"] = status.get("VmHWM", 0) / MB
        result["how"] = "/proc/self/status: activation_mb = RSS - weights - KV pool (includes torch and Python)"
    return result
