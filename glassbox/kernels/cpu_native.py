"""Hand-written CPU kernels (C with AVX-512 VNNI intrinsics, in kernels/cpu/), built on first use and called
through ctypes.

Why C: on a small CPU a decode step is bound by the bytes of weights it reads and by the number of ops it
dispatches. PyTorch here has no int8 GEMV that reads int8 weights at memory speed (`torch._int_mm` wants a
quantized activation tensor built by four more ops, and is tuned for big matrices), and its paged
attention needs the blocks gathered first. These kernels do one job per call, on raw pointers, and each
has a PyTorch oracle it is tested against (Int8Linear's torch path, kernels/attention_torch.py).

The library is compiled with the machine's C compiler (`-march=native`) into ~/.cache/glassbox (or
$GLASSBOX_CACHE_DIR), keyed by a hash of the sources and flags, in about a second; later processes load
the cached file. `available()` is False — and callers keep the PyTorch path — where the CPU lacks AVX-512
VNNI, no compiler is found, the build fails, or GLASSBOX_NATIVE=0.
"""

from __future__ import annotations

import ctypes
import functools
import hashlib
import logging
import os
import platform
import shutil
import subprocess
import tempfile
from pathlib import Path

import torch

log = logging.getLogger(__name__)

SOURCES = sorted((Path(__file__).parent / "cpu").glob("*.c"))
HEADERS = sorted((Path(__file__).parent / "cpu").glob("*.h"))
# -ffp-contract=off: no fused multiply-adds where the PyTorch path rounds twice (int8_linear is bit-exact).
FLAGS = ["-O3", "-march=native", "-fopenmp", "-ffp-contract=off", "-shared", "-fPIC", "-std=gnu11"]
REQUIRED_CPU_FLAGS = ("avx512f", "avx512bw", "avx512vl", "avx512_vnni")

_P, _I, _F, _INT = ctypes.c_void_p, ctypes.c_int64, ctypes.c_float, ctypes.c_int
SIGNATURES = {
    "gb_int8_pack": [_P, _I, _I, _P],
    "gb_int8_linear": [_P, _I, _I, _I, _INT, _P, _F, _P, _P, _P, _I, _P, _I, _P, _I],
    "gb_argmax": [_P, _I, _I, _I, _P],
    "gb_llama_layers": [_P, _I, _I, _I, _I, _I, _I, _I, _F, _F, _INT, _P, _I, _P, _P, _P, _P, _I, _P, _I, _P],
    "gb_paged_attention": [_P, _I, _I, _P, _P, _P, _P, _INT, _P, _P, _I, _P, _I, _P, _I, _I, _I, _I, _F, _I, _P],
}
# The KV cache dtypes paged_attention reads and writes.
CACHE_DTYPES = (torch.float32, torch.bfloat16)
# What int8_linear does to its input rows before quantizing them (kernels/cpu/int8_linear.c).
PROLOGUES = {None: 0, "rms_norm": 1, "silu_mul": 2}


def _cpu_flags() -> set[str]:
    try:
        text = Path("/proc/cpuinfo").read_text()
    except OSError:
        return set()
    for line in text.splitlines():
        if line.startswith("flags"):
            return set(line.split(":", 1)[1].split())
    return set()


def _compiler() -> str | None:
    return os.environ.get("CC") or shutil.which("gcc") or shutil.which("cc")


def _cache_dir() -> Path:
    root = os.environ.get("GLASSBOX_CACHE_DIR") or Path.home() / ".cache" / "glassbox"
    return Path(root) / "native"


@functools.cache
def library() -> ctypes.CDLL | None:
    """The compiled kernels, or None (with one log line saying why) where they cannot run here."""
    if os.environ.get("GLASSBOX_NATIVE", "1") == "0":
        return None
    if platform.machine() not in ("x86_64", "AMD64"):
        return None
    missing = [f for f in REQUIRED_CPU_FLAGS if f not in _cpu_flags()]
    if missing:
        log.info("native CPU kernels off: the CPU lacks %s", ", ".join(missing))
        return None
    cc = _compiler()
    if cc is None:
        log.warning("native CPU kernels off: no C compiler (gcc) found; using the PyTorch path")
        return None
    key = hashlib.sha256()
    # -march=native: a home directory shared by different CPUs keeps one build per CPU.
    for part in [cc, *FLAGS, " ".join(sorted(_cpu_flags())), *(p.read_bytes() for p in SOURCES + HEADERS)]:
        key.update(part if isinstance(part, bytes) else part.encode())
    path = _cache_dir() / f"glassbox_cpu_{key.hexdigest()[:16]}.so"
    if not path.exists():
        try:
            _build(cc, path)
        except (OSError, subprocess.CalledProcessError) as exc:
            detail = getattr(exc, "stderr", "") or exc
            log.warning("native CPU kernels off: building them failed (%s); using the PyTorch path", detail)
            return None
    lib = ctypes.CDLL(str(path))  # after torch: its libgomp is the one OpenMP runtime of the process
    for name, argtypes in SIGNATURES.items():
        fn = getattr(lib, name)
        fn.argtypes, fn.restype = argtypes, None
    return lib


def _build(cc: str, path: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    # Built beside its final name and renamed: processes starting together never load a half-written file.
    with tempfile.TemporaryDirectory(dir=path.parent) as tmp:
        out = Path(tmp) / path.name
        subprocess.run([cc, *FLAGS, "-o", str(out), *map(str, SOURCES), "-lm"], check=True, capture_output=True, text=True)
        os.replace(out, path)


def available() -> bool:
    return library() is not None


def _ptr(t: torch.Tensor | None) -> int | None:
    return None if t is None else t.data_ptr()


def int8_pack(weight: torch.Tensor) -> torch.Tensor:
    """weight [N, K] int8 -> the VNNI layout int8_linear reads: [ceil(N/64), ceil(K/4), 64, 4] uint8, w + 128."""
    n, k = weight.shape
    weight = weight.contiguous()
    packed = torch.empty((n + 63) // 64, (k + 3) // 4, 64, 4, dtype=torch.uint8)
    library().gb_int8_pack(weight.data_ptr(), n, k, packed.data_ptr())
    return packed


def int8_linear(
    x: torch.Tensor,
    packed: torch.Tensor,
    scale: torch.Tensor,
    bias: torch.Tensor | None,
    out_features: int,
    residual: torch.Tensor | None = None,
    prologue: str | None = None,
    norm_weight: torch.Tensor | None = None,
    eps: float = 0.0,
) -> torch.Tensor:
    """Int8Linear's forward in one call: x [M, K] float32 (rows may be strided) -> [M, N] float32, plus
    `residual` [M, N] float32 when given. Bit for bit the PyTorch path's result.

    prologue, applied to each row before it is quantized (the transformed rows never go to memory):
    "rms_norm" (with norm_weight [K] and eps: RMSNorm's forward) or "silu_mul" (x is [M, 2K] = gate, up:
    silu(gate) * up). These agree with the PyTorch ops to float32 rounding, not bit for bit."""
    if x.stride(1) != 1:
        x = x.contiguous()
    m, k = x.shape
    if prologue == "silu_mul":
        k //= 2
    y = torch.empty(m, out_features, dtype=torch.float32)
    if residual is not None:
        assert residual.dtype == torch.float32 and residual.stride(1) == 1
    library().gb_int8_linear(
        x.data_ptr(), m, k, x.stride(0), PROLOGUES[prologue], _ptr(norm_weight), eps, packed.data_ptr(),
        scale.data_ptr(), _ptr(bias), out_features, y.data_ptr(), out_features, _ptr(residual),
        0 if residual is None else residual.stride(0),
    )  # fmt: skip
    return y


def paged_attention(
    qkv: torch.Tensor,
    cos: torch.Tensor,
    sin: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    slot_mapping: torch.Tensor,
    query_start_loc: torch.Tensor,
    block_tables: torch.Tensor,
    context_lens: torch.Tensor,
    num_heads: int,
    scale: float,
    sliding_window: int | None,
) -> torch.Tensor:
    """A step's attention, prefill chunks and decode tokens alike: rotary on q and k, k/v stored to their
    slots, causal attention of every new token through its sequence's block table.
    qkv [T, (H + 2 KV) * D] float32 (the fused projection's output); cos, sin [T, 1, D] float32; caches
    [num_blocks, block_size, KV, D] float32 or bfloat16 (CACHE_DTYPES); query_start_loc [S + 1] int32
    -> [T, H * D] float32."""
    tokens = qkv.shape[0]
    _, block_size, num_kv_heads, head_dim = k_cache.shape
    assert qkv.stride(1) == 1 and k_cache.dtype == v_cache.dtype and k_cache.dtype in CACHE_DTYPES
    assert cos.is_contiguous() and sin.is_contiguous() and block_tables.is_contiguous()
    out = torch.empty(tokens, num_heads * head_dim, dtype=torch.float32)
    library().gb_paged_attention(
        qkv.data_ptr(), tokens, qkv.stride(0), cos.data_ptr(), sin.data_ptr(), k_cache.data_ptr(), v_cache.data_ptr(),
        k_cache.dtype == torch.bfloat16, slot_mapping.data_ptr(), query_start_loc.data_ptr(),
        query_start_loc.shape[0] - 1, block_tables.data_ptr(), block_tables.shape[1], context_lens.data_ptr(),
        num_heads, num_kv_heads, head_dim, block_size, scale, sliding_window or 0, out.data_ptr(),
    )  # fmt: skip
    return out


class LlamaLayer(ctypes.Structure):
    """One decoder layer for llama_layers (kernels/cpu/llama_layers.c's gb_llama_layer): pointers to its
    norms' weights, its four Int8Linear's packed weights, scales and biases (None: no bias), its KV caches
    and its sliding window (0: none)."""

    _fields_ = [
        (name, _P)
        for name in (
            "input_norm", "post_attention_norm", "qkv", "o", "gate_up", "down", "qkv_scale", "o_scale",
            "gate_up_scale", "down_scale", "qkv_bias", "o_bias", "gate_up_bias", "down_bias", "k_cache", "v_cache",
        )
    ] + [("sliding_window", _I)]  # fmt: skip


def llama_layers(
    layers: ctypes.Array,
    dims: tuple[int, int, int, int, int, int],
    eps: float,
    scale: float,
    cache_dtype: torch.dtype,
    x: torch.Tensor,
    cos: torch.Tensor,
    sin: torch.Tensor,
    slot_mapping: torch.Tensor,
    query_start_loc: torch.Tensor,
    block_tables: torch.Tensor,
    context_lens: torch.Tensor,
) -> None:
    """Every decoder layer of a Llama-family int8 model over one step, in place on x [T, hidden] float32
    (contiguous). layers: a ctypes array of LlamaLayer; dims: (hidden, intermediate, heads, kv heads,
    head_dim, block_size); eps: the RMSNorms'; scale: attention's; cache_dtype: one of CACHE_DTYPES. The
    rest as paged_attention's arguments."""
    assert x.dtype == torch.float32 and x.is_contiguous() and cache_dtype in CACHE_DTYPES
    assert cos.is_contiguous() and sin.is_contiguous() and block_tables.is_contiguous()
    library().gb_llama_layers(
        ctypes.addressof(layers), len(layers), *dims, eps, scale, cache_dtype == torch.bfloat16, x.data_ptr(),
        x.shape[0], cos.data_ptr(), sin.data_ptr(), slot_mapping.data_ptr(), query_start_loc.data_ptr(),
        query_start_loc.shape[0] - 1, block_tables.data_ptr(), block_tables.shape[1], context_lens.data_ptr(),
    )  # fmt: skip


def argmax(x: torch.Tensor) -> torch.Tensor:
    """torch.argmax(x, dim=-1) of x [M, N] float32 (rows may be strided) -> [M] int64."""
    assert x.dtype == torch.float32 and x.dim() == 2
    if x.stride(1) != 1:
        x = x.contiguous()
    out = torch.empty(x.shape[0], dtype=torch.int64)
    library().gb_argmax(x.data_ptr(), x.shape[0], x.shape[1], x.stride(0), out.data_ptr())
    return out


@functools.cache
def keep_freed_memory() -> None:
    """Have glibc's malloc keep freed memory for reuse instead of returning it to the system. Every
    tensor of more than 128 KiB (a step's activations) is otherwise a fresh mmap, paid in page faults
    and page zeroing each time: ~40 µs for an [32, 3072] float32 output, ~25% of a batch-1 decode step of
    the default model. Process-wide, once; harmless elsewhere (returns where glibc is not the allocator)."""
    try:
        libc = ctypes.CDLL("libc.so.6")
    except OSError:
        return
    m_trim_threshold, m_mmap_threshold = -1, -3
    libc.mallopt(m_mmap_threshold, 1 << 30)
    libc.mallopt(m_trim_threshold, 1 << 30)
