"""Hand-written CPU kernels (C in kernels/cpu/), built on first use for the machine's instruction set and
called through ctypes.

Why C: on a small CPU a decode step is bound by the bytes of weights it reads and by the number of ops it
dispatches. PyTorch here has no GEMV over GGUF's block-quantized weights that reads them at memory speed,
and its paged attention needs the blocks gathered first. These kernels do one job per call, on raw
pointers, and each has a PyTorch oracle it is tested against (QLinear's reference path,
kernels/attention_torch.py).

One source per kernel, compiled once per instruction set (kernels/cpu/simd.h): "amx" (AVX-512 with VNNI and
AMX's int8 tiles, for integer products over 16 rows or more), "avx512" (AVX-512 with VNNI), "avx2" (with FMA and F16C), "neon" (ARM64 with the dot-product extension) or "generic" (plain C).
The best one the CPU runs is chosen at run time; GLASSBOX_NATIVE_ISA=amx|avx512|avx2|neon|generic forces
one. Each is compiled with the machine's C compiler into ~/.cache/glassbox (or $GLASSBOX_CACHE_DIR), keyed
by a hash of the sources and flags, once (~25 s on 2 cores: -O3, every tile shape spelled out); later
processes load the cached file. `available()` is False — and callers keep the PyTorch path — where no
compiler is found, the build fails, or GLASSBOX_NATIVE=0.
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
# -ffp-contract=off: fused multiply-adds only where the source asks for them, so every ISA rounds alike.
FLAGS = ["-O3", "-ffp-contract=off", "-shared", "-fPIC", "-std=gnu11"]
# Instruction sets, best first: the compiler flags of each and the CPU features it needs (/proc/cpuinfo's
# names on Linux; "asimddp" is ARM's dot-product extension).
_AVX512 = ["-mavx512f", "-mavx512bw", "-mavx512vl", "-mavx512vnni", "-mavx2", "-mfma", "-mf16c"]
ISA_FLAGS = {
    "amx": [*_AVX512, "-mamx-tile", "-mamx-int8"],
    "avx512": _AVX512,
    "avx2": ["-mavx2", "-mfma", "-mf16c"],
    "neon": ["-march=armv8.2-a+dotprod"],
    "generic": [],
}
_AVX512_CPU = ("avx512f", "avx512bw", "avx512vl", "avx512_vnni", "avx2", "fma", "f16c")
ISA_CPU_FLAGS = {
    "amx": (*_AVX512_CPU, "amx_tile", "amx_int8"),
    "avx512": _AVX512_CPU,
    "avx2": ("avx2", "fma", "f16c"),
    "neon": ("asimddp",),
    "generic": (),
}

_P, _I, _F, _INT = ctypes.c_void_p, ctypes.c_int64, ctypes.c_float, ctypes.c_int


class QWeight(ctypes.Structure):
    """kernels.h's gb_qweight: a packed block-quantized weight (layers/quantized_linear.QLinear)."""

    _fields_ = [("data", _P), ("scales", _P), ("bias", _P), ("format", _I), ("activations", _I)]


class LlamaLayer(ctypes.Structure):
    """One decoder layer for llama_layers (kernels/cpu/llama_layers.c's gb_llama_layer): its norms' weights,
    its four projections, its KV caches, its sliding window (0: none) and its Quest block summaries (or NULL)."""

    _fields_ = [("input_norm", _P), ("post_attention_norm", _P)]
    _fields_ += [(name, QWeight) for name in ("qkv", "o", "gate_up", "down")]
    _fields_ += [("k_cache", _P), ("v_cache", _P), ("sliding_window", _I), ("quest_summaries", _P)]


class Quest(ctypes.Structure):
    """kernels.h's gb_quest: Quest's per-block key summaries, each sequence's block budget, and where to
    write the blocks each token's kv head read (or NULL) with that array's width."""

    _fields_ = [("summaries", _P), ("top_blocks", _P), ("selected", _P), ("selected_width", _I)]


class Observe(ctypes.Structure):
    """kernels.h's gb_observe: where tokens add the attention their keys received (H2O's history)."""

    _fields_ = [("rows", _P), ("num_rows", _I), ("width", _I), ("out", _P)]


SIGNATURES = {
    "gb_rows": ([], _I),
    "gb_isa": ([], ctypes.c_char_p),
    "gb_qlinear": ([_P, _I, _I, _I, _INT, _P, _F, ctypes.POINTER(QWeight), _I, _P, _I, _P, _I], None),
    "gb_quantize_rows": ([_P, _I, _I, _P, _P, _P], None),
    "gb_quantize": ([_P, _I, _I, _I, _P, _P, _P], None),
    "gb_argmax": ([_P, _I, _I, _I, _P], None),
    "gb_llama_layers": (
        [_P, _I, _I, _I, _I, _I, _I, _I, _F, _F, _INT, _P, _I, _P, _P, _P, _P, _I, _P, _I, _P, _P,
         ctypes.POINTER(Observe)],
        None,
    ),
    "gb_paged_attention": (
        [_P, _I, _I, _P, _P, _P, _P, _INT, _P, _P, _I, _P, _I, _P, _I, _I, _I, _I, _F, _I, ctypes.POINTER(Quest),
         ctypes.POINTER(Observe), _P],
        None,
    ),
}
# The KV cache dtypes paged_attention reads and writes.
CACHE_DTYPES = (torch.float32, torch.bfloat16)
# What qlinear does to its input rows before quantizing them (kernels/cpu/kernels.h).
PROLOGUES = {None: 0, "rms_norm": 1, "silu_mul": 2}
# Weight formats (kernels/cpu/kernels.h): GGUF's blocks of 32 inputs.
FORMATS = {"q8_0": 0, "q4_1": 1}
# What the weights multiply (kernels/cpu/kernels.h): the float32 activations, their int8 blocks, or their
# int16 or int12 blocks as two int8 halves.
ACTIVATIONS = {"float32": 0, "int8": 1, "int16": 2, "int12": 3}
BLOCK = 32


def _cpu_flags() -> set[str]:
    try:
        text = Path("/proc/cpuinfo").read_text()
    except OSError:
        return set()
    for line in text.splitlines():
        if line.startswith(("flags", "Features")):
            return set(line.split(":", 1)[1].split())
    return set()


@functools.cache
def _amx_permitted() -> bool:
    """Linux gives a process AMX's 8 KiB of tile state only when it asks (arch_prctl ARCH_REQ_XCOMP_PERM for
    XFEATURE_XTILEDATA, Linux 5.16+); a tile instruction without it is SIGILL. Asked once, for every thread."""
    if platform.system() != "Linux" or "amx_tile" not in _cpu_flags():
        return False
    sys_arch_prctl, arch_req_xcomp_perm, xfeature_xtiledata = 158, 0x1023, 18
    try:
        return ctypes.CDLL(None).syscall(sys_arch_prctl, arch_req_xcomp_perm, xfeature_xtiledata) == 0
    except (OSError, AttributeError):
        return False


def runnable_isas() -> list[str]:
    """The instruction sets this CPU runs, best first."""
    machine = platform.machine().lower()
    if machine in ("x86_64", "amd64"):
        candidates = ["amx", "avx512", "avx2", "generic"] if _amx_permitted() else ["avx512", "avx2", "generic"]
    elif machine in ("aarch64", "arm64"):
        candidates = ["neon", "generic"]
    else:
        candidates = ["generic"]
    flags = _cpu_flags()
    if machine == "arm64":  # macOS: no /proc/cpuinfo; every Apple CPU has the dot-product extension
        flags.add("asimddp")
    return [isa for isa in candidates if all(f in flags for f in ISA_CPU_FLAGS[isa])]


def default_isa() -> str | None:
    """The instruction set the kernels run: GLASSBOX_NATIVE_ISA where set (and runnable), else the best."""
    isas = runnable_isas()
    forced = os.environ.get("GLASSBOX_NATIVE_ISA")
    if forced:
        if forced not in isas:
            log.warning("GLASSBOX_NATIVE_ISA=%s: this CPU runs %s; native CPU kernels off", forced, ", ".join(isas))
            return None
        return forced
    return isas[0]


def _compiler() -> str | None:
    return os.environ.get("CC") or shutil.which("gcc") or shutil.which("cc")


def _cache_dir() -> Path:
    root = os.environ.get("GLASSBOX_CACHE_DIR") or Path.home() / ".cache" / "glassbox"
    return Path(root) / "native"


@functools.cache
def library(isa: str | None = None) -> ctypes.CDLL | None:
    """The kernels compiled for `isa` (default: default_isa()), or None (with one log line saying why)
    where they cannot run here."""
    if os.environ.get("GLASSBOX_NATIVE", "1") == "0":
        return None
    chosen, isa = isa is None, isa or default_isa()
    if isa is None or isa not in runnable_isas():
        return None
    cc = _compiler()
    if cc is None:
        log.warning("native CPU kernels off: no C compiler (gcc) found; using the PyTorch path")
        return None
    flags = [*FLAGS, *ISA_FLAGS[isa]]
    key = hashlib.sha256()
    for part in [cc, *flags, *(p.read_bytes() for p in SOURCES + HEADERS)]:
        key.update(part if isinstance(part, bytes) else part.encode())
    path = _cache_dir() / f"glassbox_cpu_{isa}_{key.hexdigest()[:16]}.so"
    if not path.exists():
        try:
            _build(cc, flags, path)
        except (OSError, subprocess.CalledProcessError) as exc:
            detail = getattr(exc, "stderr", "") or exc
            if chosen and isa == "amx" and not os.environ.get("GLASSBOX_NATIVE_ISA"):
                log.warning("AMX kernels not built (%s); using the AVX-512 ones", detail)  # (a compiler before GCC 11)
                return library("avx512")
            log.warning("native CPU kernels off: building them failed (%s); using the PyTorch path", detail)
            return None
    lib = ctypes.CDLL(str(path))  # after torch: its libgomp is the one OpenMP runtime of the process
    for name, (argtypes, restype) in SIGNATURES.items():
        fn = getattr(lib, name)
        fn.argtypes, fn.restype = argtypes, restype
    return lib


def _build(cc: str, flags: list[str], path: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    # Built beside its final name and renamed: processes starting together never load a half-written file.
    with tempfile.TemporaryDirectory(dir=path.parent) as tmp:
        out = Path(tmp) / path.name
        command = [cc, *flags, "-o", str(out), *map(str, SOURCES), "-lm"]
        try:
            subprocess.run([*command[:1], "-fopenmp", *command[1:]], check=True, capture_output=True, text=True)
        except subprocess.CalledProcessError:  # a compiler without OpenMP (Apple's clang): one thread
            subprocess.run(command, check=True, capture_output=True, text=True)
        os.replace(out, path)


def available() -> bool:
    return library() is not None


def isa() -> str | None:
    """The instruction set of the loaded kernels (None: not available)."""
    lib = library()
    return None if lib is None else lib.gb_isa().decode()


def rows(isa: str | None = None) -> int:
    """Output rows per packed group of a quantized weight, for the kernels of `isa` (kernels/cpu/kernels.h)."""
    return library(isa).gb_rows()


def _ptr(t: torch.Tensor | None) -> int | None:
    return None if t is None else t.data_ptr()


def qweight(
    data: torch.Tensor, scales: torch.Tensor, bias: torch.Tensor | None, format: str, activations: str = "float32"
) -> QWeight:
    """The kernels' view of a packed weight (the tensors must outlive it)."""
    return QWeight(data.data_ptr(), scales.data_ptr(), _ptr(bias), FORMATS[format], ACTIVATIONS[activations])


def qlinear(
    x: torch.Tensor,
    weight: QWeight,
    out_features: int,
    residual: torch.Tensor | None = None,
    prologue: str | None = None,
    norm_weight: torch.Tensor | None = None,
    eps: float = 0.0,
    isa: str | None = None,
) -> torch.Tensor:
    """QLinear's forward in one call: x [M, K] float32 (rows may be strided) -> [M, N] float32, plus
    `residual` [M, N] float32 when given.

    prologue, applied to each row before it is quantized (the transformed rows never go to memory):
    "rms_norm" (with norm_weight [K] and eps: RMSNorm's forward) or "silu_mul" (x is [M, 2K] = gate, up:
    silu(gate) * up). These agree with the PyTorch ops to float32 rounding."""
    if x.stride(1) != 1:
        x = x.contiguous()
    assert x.dtype == torch.float32
    m, k = x.shape
    if prologue == "silu_mul":
        k //= 2
    y = torch.empty(m, out_features, dtype=torch.float32)
    if residual is not None:
        assert residual.dtype == torch.float32 and residual.stride(1) == 1
    library(isa).gb_qlinear(
        x.data_ptr(), m, k, x.stride(0), PROLOGUES[prologue], _ptr(norm_weight), eps, ctypes.byref(weight),
        out_features, y.data_ptr(), out_features, _ptr(residual), 0 if residual is None else residual.stride(0),
    )  # fmt: skip
    return y


def quantize(weight: torch.Tensor, format: str, isa: str | None = None) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """weight [N, K] float -> (data, scales) packed for the kernels of `isa` (as quantized_linear's
    quantize_weight then pack, in one pass) and each row's max |dequantized - weight| [N]."""
    weight = weight.detach().float().contiguous()
    n, k = weight.shape
    group = rows(isa)
    groups, blocks = -(-n // group), k // BLOCK
    # bytes and float16 scales per group and block (kernels/cpu/kernels.h)
    per_block = (BLOCK * group // 2, 2 * group) if format == "q4_1" else (BLOCK * group, group)
    data = torch.zeros(groups, blocks, per_block[0], dtype=torch.uint8)
    scales = torch.zeros(groups, blocks, per_block[1], dtype=torch.float16)
    error = torch.empty(n)
    library(isa).gb_quantize(weight.data_ptr(), n, k, FORMATS[format], data.data_ptr(), scales.data_ptr(), error.data_ptr())
    return data, scales, error


def quantize_rows(x: torch.Tensor, isa: str | None = None) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """x [M, K] float32 -> (q [M, K] int8, d [M, K / 32] float32, Σq [M, K / 32] int32), as qlinear
    quantizes its input rows."""
    x = x.contiguous()
    m, k = x.shape
    q = torch.empty(m, k, dtype=torch.int8)
    d, total = torch.empty(m, k // BLOCK), torch.empty(m, k // BLOCK, dtype=torch.int32)
    library(isa).gb_quantize_rows(x.data_ptr(), m, k, q.data_ptr(), d.data_ptr(), total.data_ptr())
    return q, d, total


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
    isa: str | None = None,
    quest_summaries: torch.Tensor | None = None,
    top_blocks: torch.Tensor | int | None = None,
    selected: torch.Tensor | None = None,
    observe: tuple[torch.Tensor, torch.Tensor] | None = None,
) -> torch.Tensor:
    """A step's attention, prefill chunks and decode tokens alike: rotary on q and k, k/v stored to their
    slots, causal attention of every new token through its sequence's block table.
    qkv [T, (H + 2 KV) * D] float32 (the fused projection's output); cos, sin [T, 1, D] float32; caches
    [num_blocks, block_size, KV, D] float32 or bfloat16 (CACHE_DTYPES); query_start_loc [S + 1] int32
    -> [T, H * D] float32.
    Quest (block-sparse decode, kernels.h): quest_summaries [num_blocks, KV, 2, D] float32, the min and max
    of each block's keys, kept up to date by the call; sequence s's decode token reads only top_blocks[s]
    blocks (top_blocks: [S] int32, or one budget for all; 0 or None: all); selected [T, KV, W] int32
    (optional) gets the blocks each token's kv head read (-1: all).
    observe (H2O's history): (rows [T] int32, out [R, KV, W] float32): token t with rows[t] >= 0 adds the
    attention probabilities its query heads gave each key, summed over each kv head's heads, to
    out[rows[t], :, key] (tokens that read Quest's chosen blocks add nothing)."""
    tokens = qkv.shape[0]
    _, block_size, num_kv_heads, head_dim = k_cache.shape
    assert qkv.stride(1) == 1 and k_cache.dtype == v_cache.dtype and k_cache.dtype in CACHE_DTYPES
    assert cos.is_contiguous() and sin.is_contiguous() and block_tables.is_contiguous()
    out = torch.empty(tokens, num_heads * head_dim, dtype=torch.float32)
    quest = None
    if quest_summaries is not None:
        assert quest_summaries.dtype == torch.float32 and quest_summaries.is_contiguous()
        if isinstance(top_blocks, int):
            top_blocks = torch.full((query_start_loc.shape[0] - 1,), top_blocks, dtype=torch.int32)
        assert top_blocks is None or (top_blocks.dtype == torch.int32 and top_blocks.is_contiguous())
        assert selected is None or (selected.dtype == torch.int32 and selected.shape[:2] == (tokens, num_kv_heads))
        quest = ctypes.byref(Quest(
            quest_summaries.data_ptr(), None if top_blocks is None else top_blocks.data_ptr(),
            None if selected is None else selected.data_ptr(), 0 if selected is None else selected.shape[2],
        ))  # fmt: skip
    library(isa).gb_paged_attention(
        qkv.data_ptr(), tokens, qkv.stride(0), cos.data_ptr(), sin.data_ptr(), k_cache.data_ptr(), v_cache.data_ptr(),
        k_cache.dtype == torch.bfloat16, slot_mapping.data_ptr(), query_start_loc.data_ptr(),
        query_start_loc.shape[0] - 1, block_tables.data_ptr(), block_tables.shape[1], context_lens.data_ptr(),
        num_heads, num_kv_heads, head_dim, block_size, scale, sliding_window or 0, quest, _observe(observe, tokens),
        out.data_ptr(),
    )  # fmt: skip
    return out


def _observe(observe: tuple[torch.Tensor, torch.Tensor] | None, tokens: int):
    """(rows [T] int32, out [..., R, KV, W] float32) -> a pointer to kernels.h's gb_observe, or None."""
    if observe is None:
        return None
    rows, out = observe
    assert rows.dtype == torch.int32 and rows.shape == (tokens,) and rows.is_contiguous()
    assert out.dtype == torch.float32 and out.is_contiguous()
    return ctypes.byref(Observe(rows.data_ptr(), out.shape[-3], out.shape[-1], out.data_ptr()))


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
    quest_top: torch.Tensor | None = None,
    observe: tuple[torch.Tensor, torch.Tensor] | None = None,
    isa: str | None = None,
) -> None:
    """Every decoder layer of a Llama-family quantized model over one step, in place on x [T, hidden] float32
    (contiguous). layers: a ctypes array of LlamaLayer; dims: (hidden, intermediate, heads, kv heads,
    head_dim, block_size); eps: the RMSNorms'; scale: attention's; cache_dtype: one of CACHE_DTYPES;
    quest_top: [num_layers, S] int32, Quest's block budget of each sequence in each layer (the layers
    with summaries), or None; observe: paged_attention's, with out [num_layers, R, KV, W]. The rest as
    paged_attention's arguments."""
    assert x.dtype == torch.float32 and x.is_contiguous() and cache_dtype in CACHE_DTYPES
    assert quest_top is None or (quest_top.dtype == torch.int32 and quest_top.is_contiguous())
    assert cos.is_contiguous() and sin.is_contiguous() and block_tables.is_contiguous()
    library(isa).gb_llama_layers(
        ctypes.addressof(layers), len(layers), *dims, eps, scale, cache_dtype == torch.bfloat16, x.data_ptr(),
        x.shape[0], cos.data_ptr(), sin.data_ptr(), slot_mapping.data_ptr(), query_start_loc.data_ptr(),
        query_start_loc.shape[0] - 1, block_tables.data_ptr(), block_tables.shape[1], context_lens.data_ptr(),
        None if quest_top is None else quest_top.data_ptr(), _observe(observe, x.shape[0]),
    )  # fmt: skip


def argmax(x: torch.Tensor, isa: str | None = None) -> torch.Tensor:
    """torch.argmax(x, dim=-1) of x [M, N] float32 (rows may be strided) -> [M] int64."""
    assert x.dtype == torch.float32 and x.dim() == 2
    if x.stride(1) != 1:
        x = x.contiguous()
    out = torch.empty(x.shape[0], dtype=torch.int64)
    library(isa).gb_argmax(x.data_ptr(), x.shape[0], x.shape[1], x.stride(0), out.data_ptr())
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
