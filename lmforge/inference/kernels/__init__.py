"""Native matrix-vector kernels for decoding (`matvec.c`; `kquants.c` for GGUF block types), compiled on
first use with the system C compiler.

Plain C called through ctypes rather than a PyTorch C++ extension: it builds in about a
second instead of a minute, and needs no Python or PyTorch headers. Where there is no
compiler or no AVX2 (with FMA and F16C), `available()` is False and callers use their PyTorch path; set
LMFORGE_NATIVE=0 to force that.
"""

from __future__ import annotations

import ctypes
import functools
import hashlib
import os
import shutil
import subprocess
import warnings
from pathlib import Path

import torch

from lmforge.atomic import write_atomically

SOURCES = [Path(__file__).with_name("matvec.c"), Path(__file__).with_name("kquants.c")]
HEADERS = [Path(__file__).with_name("kernels.h")]
FLAGS = ["-O3", "-mavx2", "-mfma", "-mf16c", "-fopenmp", "-shared", "-fPIC"]


def _cpu_supports_kernels() -> bool:
    try:
        flags = Path("/proc/cpuinfo").read_text()
    except OSError:
        return False
    return " avx2" in flags and " fma" in flags and " f16c" in flags


@functools.cache
def bf16_matmul_is_fast() -> bool:
    """Whether this CPU multiplies bf16 matrices in hardware (AMX or AVX-512 BF16), where prefill runs its
    quantised layers' matmuls in bf16: on a Xeon with AMX, PyTorch's bf16 matmul reached 1,150 GFLOP/s on
    one core against 127 in fp32. Elsewhere bf16 is emulated (~100x slower than fp32 on an AVX2 EPYC).
    `$LMFORGE_PREFILL_BF16` = 1 or 0 decides instead."""
    chosen = os.environ.get("LMFORGE_PREFILL_BF16", "").strip()
    if chosen in ("0", "1"):
        return chosen == "1"
    try:
        flags = Path("/proc/cpuinfo").read_text().split()
    except OSError:
        return False
    return "amx_bf16" in flags or "avx512_bf16" in flags


def _cache_dir() -> Path:
    return Path(os.environ.get("LMFORGE_CACHE", Path.home() / ".cache" / "lmforge")) / "kernels"


class BuildFailed(Exception):
    """The compiler's error output, when the native kernels do not build."""


@functools.cache
def _library() -> ctypes.CDLL | None:
    if os.environ.get("LMFORGE_NATIVE", "1") == "0" or not _cpu_supports_kernels():
        return None
    compiler = shutil.which(os.environ.get("CC", "cc")) or shutil.which("gcc")
    if compiler is None:
        return None
    source = b"".join(path.read_bytes() for path in [*SOURCES, *HEADERS])
    digest = hashlib.sha256(source + " ".join(FLAGS).encode()).hexdigest()[:16]
    library_path = _cache_dir() / f"matvec-{digest}.so"
    if not library_path.exists():

        def build(output: Path) -> None:
            result = subprocess.run(
                [compiler, *FLAGS, *map(str, SOURCES), "-o", str(output)], capture_output=True, text=True
            )
            if result.returncode != 0:
                raise BuildFailed(result.stderr[-2000:])

        try:
            # Concurrent processes may build the same library: each compiles into its own temporary.
            write_atomically(library_path, build, concurrent_writers=True)
        except BuildFailed as failure:
            warnings.warn(
                f"lmforge: building the native kernels failed, decoding falls back to PyTorch (slower):\n{failure}",
                stacklevel=2,
            )
            return None
    library = ctypes.CDLL(str(library_path))
    i64, ptr, threads = ctypes.c_int64, ctypes.c_void_p, ctypes.c_int
    library.matvec_f32.argtypes = [ptr, i64, i64, ptr, ptr, i64, ptr, threads]
    library.matvec_q8.argtypes = [ptr, i64, i64, ptr, ptr, i64, ptr, i64, ptr, ptr, ptr, ptr, threads]
    library.matvec_q4.argtypes = [ptr, i64, i64, ptr, ptr, ptr, i64, ptr, i64, ptr, ptr, ptr, ptr, threads]
    library.matvec_q8_exact.argtypes = [ptr, i64, i64, ptr, ptr, i64, ptr, i64, ptr, threads]
    library.matvec_q8_exact.restype = None
    library.rms_norm.argtypes = [ptr, ptr, ctypes.c_float, i64, i64, ptr]
    library.silu_mul.argtypes = [ptr, i64, i64, ptr]
    library.gelu_tanh_mul.argtypes = [ptr, i64, i64, ptr]
    library.gelu_tanh_mul.restype = None
    library.add_rms_norm.argtypes = [ptr, ptr, ptr, ctypes.c_float, i64, i64, ptr]
    library.add_rms_norm.restype = None
    flag = ctypes.c_int
    library.dequantize_q8.argtypes = [ptr, ptr, i64, i64, i64, ptr, flag, threads]
    library.dequantize_q4.argtypes = [ptr, ptr, ptr, i64, i64, i64, ptr, flag, threads]
    library.attention_decode.argtypes = [
        ptr, i64, i64, i64, i64, ptr, ptr, ptr, ptr, i64, ptr, ptr, ptr, ptr, ctypes.c_float, ctypes.c_float, i64,
        ptr, ptr, threads,
    ]  # fmt: skip
    for function in (
        library.matvec_f32, library.matvec_q8, library.matvec_q4, library.rms_norm, library.silu_mul,
        library.dequantize_q8, library.dequantize_q4,
    ):  # fmt: skip
        function.restype = None
    library.attention_decode.restype = None
    library.matvec_blocks.argtypes = [ptr, i64, i64, ptr, ptr, i64, ptr, i64, ptr, ptr, ptr, ptr, threads]
    library.dequantize_blocks.argtypes = [ptr, ptr, i64, i64, i64, i64, ptr, flag, threads]
    library.matvec_blocks.restype = library.dequantize_blocks.restype = None
    library.release_threads.argtypes, library.release_threads.restype = [], None
    return library


def available() -> bool:
    """Whether the native kernels built and load on this machine."""
    return _library() is not None


def release_threads() -> None:
    """Let the calling thread's OpenMP workers for the kernels exit (the next kernel call starts new ones).

    Call it on a thread that ran kernels (loading a model does) before decoding moves to another
    thread. Otherwise both threads keep workers; with more of them than cores libgomp lets an idle
    worker spin only briefly, so every kernel's workers sleep and are woken again, and the scheduler
    puts the woken one on the waker's core: SmolLM2 decoded at 21 ms a token on a second thread
    instead of 9 (2 cores)."""
    if available():
        _library().release_threads()


def library() -> ctypes.CDLL:
    """The loaded kernel library (check `available()` first), for callers that prepare their own calls."""
    return _library()


def _pointer(tensor: torch.Tensor | None) -> int | None:
    return None if tensor is None else tensor.data_ptr()


def matvec_f32(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
    """x (M, K) @ weight (N, K).T + bias, for few rows M; all float32 and contiguous."""
    rows, inner = x.shape
    out = torch.empty(rows, weight.shape[0])
    _library().matvec_f32(
        x.data_ptr(), rows, inner, weight.data_ptr(), _pointer(bias), weight.shape[0], out.data_ptr(),
        torch.get_num_threads(),
    )  # fmt: skip
    return out


def _check_half(*tensors: torch.Tensor) -> None:
    if any(t.dtype != torch.float16 for t in tensors):  # the kernel would read fp32 bits as halves
        raise TypeError(f"int4 scales and offsets must be float16, not {[str(t.dtype) for t in tensors]}")


def _activation_scratch(rows: int, inner: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Room for x rounded to int8, with a scale and a sum per 32 values: the quantised kernels' view of x."""
    return (
        torch.empty(rows, inner, dtype=torch.int8),
        torch.empty(rows, inner // 32),
        torch.empty(rows, inner // 32),
    )


def matvec_q8(
    x: torch.Tensor, codes: torch.Tensor, scale: torch.Tensor, group_size: int, bias: torch.Tensor | None
) -> torch.Tensor:
    """x (M, K) times int8 codes (N, K) with scales (N, K/group_size), plus bias.

    x is rounded to int8 per run of 32 values on the way in (llama.cpp's Q8 activations), so
    results differ from the exact product by ~0.3% relative.
    """
    rows, inner = x.shape
    out = torch.empty(rows, codes.shape[0])
    xq, xscale, xsum = _activation_scratch(rows, inner)
    _library().matvec_q8(
        x.data_ptr(), rows, inner, codes.data_ptr(), scale.data_ptr(), group_size, _pointer(bias), codes.shape[0],
        out.data_ptr(), xq.data_ptr(), xscale.data_ptr(), xsum.data_ptr(), torch.get_num_threads(),
    )  # fmt: skip
    return out


def matvec_q8_exact(
    x: torch.Tensor, codes: torch.Tensor, scale: torch.Tensor, group_size: int, bias: torch.Tensor | None
) -> torch.Tensor:
    """As `matvec_q8` but with x kept in fp32 (exact up to summation order; ~1.5x slower)."""
    rows, inner = x.shape
    out = torch.empty(rows, codes.shape[0])
    _library().matvec_q8_exact(
        x.data_ptr(), rows, inner, codes.data_ptr(), scale.data_ptr(), group_size, _pointer(bias), codes.shape[0],
        out.data_ptr(), torch.get_num_threads(),
    )  # fmt: skip
    return out


def matvec_q4(
    x: torch.Tensor,
    packed: torch.Tensor,
    scale: torch.Tensor,
    offset: torch.Tensor,
    group_size: int,
    bias: torch.Tensor | None,
) -> torch.Tensor:
    """x (M, K) times 4-bit codes packed two per byte (N, K/2): w = scale * code + offset per group
    (scale and offset float16).
    x is rounded to int8 per run of 32 values, as in `matvec_q8`."""
    _check_half(scale, offset)
    rows, inner = x.shape
    out = torch.empty(rows, packed.shape[0])
    xq, xscale, xsum = _activation_scratch(rows, inner)
    _library().matvec_q4(
        x.data_ptr(), rows, inner, packed.data_ptr(), scale.data_ptr(), offset.data_ptr(), group_size,
        _pointer(bias), packed.shape[0], out.data_ptr(), xq.data_ptr(), xscale.data_ptr(), xsum.data_ptr(),
        torch.get_num_threads(),
    )  # fmt: skip
    return out


def dequantize_q8(
    codes: torch.Tensor, scale: torch.Tensor, group_size: int, out: torch.Tensor | None = None
) -> torch.Tensor:
    """The fp32 weight of int8 codes (N, K) with scales (N, K/group_size); equals `quantize.dequantize_int8`.
    `out`: a contiguous (N, K) tensor to write it into, fp32 or bf16 (rounded to nearest even, as `.bfloat16()`)."""
    rows, inner = codes.shape
    out = torch.empty(rows, inner) if out is None else out
    _library().dequantize_q8(
        codes.data_ptr(), scale.data_ptr(), rows, inner, group_size, out.data_ptr(), _is_bf16(out),
        torch.get_num_threads(),
    )  # fmt: skip
    return out


def _is_bf16(out: torch.Tensor) -> int:
    if out.dtype not in (torch.float32, torch.bfloat16) or not out.is_contiguous():
        raise TypeError(f"dequantisation writes contiguous float32 or bfloat16, not {out.dtype}")
    return int(out.dtype == torch.bfloat16)


def dequantize_q4(
    packed: torch.Tensor, scale: torch.Tensor, offset: torch.Tensor, group_size: int, out: torch.Tensor | None = None
) -> torch.Tensor:
    """The fp32 weight of packed 4-bit codes (N, K/2); equals `quantize.dequantize_int4`. `out` as for q8
    (bf16 too)."""
    _check_half(scale, offset)
    rows, inner = packed.shape[0], packed.shape[1] * 2
    out = torch.empty(rows, inner) if out is None else out
    _library().dequantize_q4(
        packed.data_ptr(), scale.data_ptr(), offset.data_ptr(), rows, inner, group_size, out.data_ptr(),
        _is_bf16(out), torch.get_num_threads(),
    )  # fmt: skip
    return out


def matvec_blocks(
    x: torch.Tensor, blocks: torch.Tensor, segments: torch.Tensor, out_features: int, bias: torch.Tensor | None
) -> torch.Tensor:
    """x (M, K) times a matrix of GGUF blocks (`kquants.c`): `blocks` its rows' bytes back to back,
    `segments` (S, 2) int64 (ggml type id, rows) per run of rows of one type. x is rounded to int8
    per run of 32 values, as in `matvec_q8`."""
    rows, inner = x.shape
    out = torch.empty(rows, out_features)
    xq, xscale, xsum = _activation_scratch(rows, inner)
    _library().matvec_blocks(
        x.data_ptr(), rows, inner, blocks.data_ptr(), segments.data_ptr(), segments.shape[0], _pointer(bias),
        out_features, out.data_ptr(), xq.data_ptr(), xscale.data_ptr(), xsum.data_ptr(), torch.get_num_threads(),
    )  # fmt: skip
    return out


def dequantize_blocks(
    blocks: torch.Tensor,
    segments: torch.Tensor,
    in_features: int,
    rows: slice,
    out: torch.Tensor | None = None,
) -> torch.Tensor:
    """Rows `rows` (a slice with step 1) of a GGUF block matrix as fp32, equal to the gguf package's
    dequantisation; `out` as for `dequantize_q8` (bf16: those values rounded)."""
    first, stop, _ = rows.indices(int(segments[:, 1].sum()))
    count = max(0, stop - first)
    out = torch.empty(count, in_features) if out is None else out
    _library().dequantize_blocks(
        blocks.data_ptr(), segments.data_ptr(), segments.shape[0], in_features, first, count, out.data_ptr(),
        _is_bf16(out), torch.get_num_threads(),
    )  # fmt: skip
    return out


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    """x / rms(x) * weight over the last dimension of a contiguous (rows, D) tensor."""
    out = torch.empty_like(x)
    _library().rms_norm(x.data_ptr(), weight.data_ptr(), eps, x.shape[0], x.shape[1], out.data_ptr())
    return out


def add_rms_norm(x: torch.Tensor, delta: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    """x += delta (in place), then return rms_norm(x): a residual add and the next norm in one call."""
    out = torch.empty_like(x)
    _library().add_rms_norm(
        x.data_ptr(), delta.data_ptr(), weight.data_ptr(), eps, x.shape[0], x.shape[1], out.data_ptr()
    )
    return out


def silu_mul(gate_up: torch.Tensor) -> torch.Tensor:
    """silu(gate) * up for rows laid out [gate | up] (the fused SwiGLU projection)."""
    rows, width = gate_up.shape
    out = torch.empty(rows, width // 2)
    _library().silu_mul(gate_up.data_ptr(), rows, width // 2, out.data_ptr())
    return out


def gelu_tanh_mul(gate_up: torch.Tensor) -> torch.Tensor:
    """gelu_tanh(gate) * up for rows laid out [gate | up] (Gemma's GeGLU)."""
    rows, width = gate_up.shape
    out = torch.empty(rows, width // 2)
    _library().gelu_tanh_mul(gate_up.data_ptr(), rows, width // 2, out.data_ptr())
    return out


def attention_decode(
    qkv: torch.Tensor,
    n_heads: int,
    n_kv_heads: int,
    slots: torch.Tensor,
    positions: torch.Tensor,
    keys: torch.Tensor,
    values: torch.Tensor,
    cos: torch.Tensor,
    sin: torch.Tensor,
    q_norm: torch.Tensor | None = None,
    k_norm: torch.Tensor | None = None,
    norm_eps: float = 1e-6,
    scale: float | None = None,
    window: int | None = None,
) -> torch.Tensor:
    """One new token per row: RMSNorm of each q and k head (by q_norm / k_norm where given), RoPE on
    q and k (qkv is changed in place), k and v stored at cache[slots, :, positions], and attention
    (scores times `scale`, default 1/sqrt(head_dim)) over each row's positions 0..position, or its
    last `window` positions.

    qkv (rows, (H + 2 KV) D); keys/values (slots, KV, capacity, D); slots and positions int64 (rows,).
    """
    rows = qkv.shape[0]
    head_dim = keys.shape[-1]
    capacity = keys.shape[2]
    scores = torch.empty(torch.get_num_threads() * (n_heads // n_kv_heads) * capacity)
    out = torch.empty(rows, n_heads * head_dim)
    _library().attention_decode(
        qkv.data_ptr(), rows, n_heads, n_kv_heads, head_dim, slots.data_ptr(), positions.data_ptr(),
        keys.data_ptr(), values.data_ptr(), capacity, cos.data_ptr(), sin.data_ptr(), _pointer(q_norm),
        _pointer(k_norm), norm_eps, scale or head_dim**-0.5, window or 0, scores.data_ptr(), out.data_ptr(),
        torch.get_num_threads(),
    )  # fmt: skip
    return out


@functools.cache
def custom_ops():
    """The matvec kernels as PyTorch custom operators (registered on first call), so `torch.compile`
    keeps them as opaque calls inside one graph instead of breaking the graph at each ctypes call.
    Not done at import: registering pulls in torch's compiler stack (~2 s)."""
    import types

    @torch.library.custom_op("lmforge::matvec_f32", mutates_args=())
    def f32(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
        return matvec_f32(x, weight, bias)

    @torch.library.custom_op("lmforge::matvec_q8", mutates_args=())
    def q8(
        x: torch.Tensor, codes: torch.Tensor, scale: torch.Tensor, group_size: int, bias: torch.Tensor | None
    ) -> torch.Tensor:
        return matvec_q8(x, codes, scale, group_size, bias)

    @torch.library.custom_op("lmforge::matvec_q8_exact", mutates_args=())
    def q8_exact(
        x: torch.Tensor, codes: torch.Tensor, scale: torch.Tensor, group_size: int, bias: torch.Tensor | None
    ) -> torch.Tensor:
        return matvec_q8_exact(x, codes, scale, group_size, bias)

    @torch.library.custom_op("lmforge::matvec_q4", mutates_args=())
    def q4(
        x: torch.Tensor, packed: torch.Tensor, scale: torch.Tensor, offset: torch.Tensor, group_size: int,
        bias: torch.Tensor | None,
    ) -> torch.Tensor:  # fmt: skip
        return matvec_q4(x, packed, scale, offset, group_size, bias)

    @torch.library.custom_op("lmforge::matvec_blocks", mutates_args=())
    def blocks(
        x: torch.Tensor, blocks: torch.Tensor, segments: torch.Tensor, out_features: int, bias: torch.Tensor | None
    ) -> torch.Tensor:
        return matvec_blocks(x, blocks, segments, out_features, bias)

    for op in (f32, q8, q8_exact, q4):
        op.register_fake(lambda x, weight, *rest: x.new_empty(x.shape[0], weight.shape[0]))
    blocks.register_fake(lambda x, blocks, segments, out_features, bias: x.new_empty(x.shape[0], out_features))
    return types.SimpleNamespace(
        matvec_f32=f32, matvec_q8=q8, matvec_q8_exact=q8_exact, matvec_q4=q4, matvec_blocks=blocks
    )
