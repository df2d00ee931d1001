"""PyTorch's own fused attention as benchmark peers: SDPA with one of its kernels forced, and
FlexAttention compiled; and the yardsticks their throughput is compared with: the bf16 matmul rate
(:func:`matmul_tflops`) and, for calls that read far more than they compute (a few queries
against a long key/value cache), the rate memory is read at (:func:`memory_gbps`).

A peer runs a :class:`~qkv.bench.cases.BenchCase` from the same keyword arguments as
``qkv.attention`` (:func:`qkv.bench.measure.prebuilt_kwargs`):

- ``sdpa-flash``: ``is_causal`` only; it takes no mask or bias tensor.
- ``sdpa-cudnn``, ``sdpa-efficient``: the case's mask or bias as a prebuilt dense tensor.
- ``flex``: ``torch.compile(flex_attention)``; the qkv mask function and causal flag become the
  ``mask_mod`` of a block mask built once, outside the timed calls; a score function is passed
  as the ``score_mod`` (the signatures agree).

``benchmarks/gpu_bench.py`` uses the same helpers for its own (fixed) case list.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
from torch import Tensor

from qkv.request import build_request

__all__ = [
    "PEERS",
    "SDPA_KERNELS",
    "compiled_flex",
    "matmul_tflops",
    "memory_gbps",
    "peer_call",
    "sdpa_forced",
]

#: ``sdpa-<kernel>`` names and the ``torch.nn.attention.SDPBackend`` member each forces.
SDPA_KERNELS = {
    "sdpa-flash": "FLASH_ATTENTION",
    "sdpa-cudnn": "CUDNN_ATTENTION",
    "sdpa-efficient": "EFFICIENT_ATTENTION",
}
PEERS = (*SDPA_KERNELS, "flex")

_FLEX: list[Callable[..., Tensor]] = []


def compiled_flex() -> Callable[..., Tensor]:
    """One compiled FlexAttention for the whole process. Each new shape, mask and grad mode is a
    recompilation, so dynamo's cache limits are raised: past them flex falls back to an unfused
    implementation that materialises the scores, which would time the wrong thing."""
    if not _FLEX:
        import torch._dynamo
        from torch.nn.attention.flex_attention import flex_attention

        torch._dynamo.config.cache_size_limit = 256
        torch._dynamo.config.accumulated_cache_size_limit = 4096
        _FLEX.append(torch.compile(flex_attention, dynamic=False))
    return _FLEX[0]


def sdpa_forced(
    name: str, q: Tensor, k: Tensor, v: Tensor, *, attn_mask: Tensor | None, is_causal: bool
) -> Callable[[], Tensor]:
    """A call of ``F.scaled_dot_product_attention`` restricted to the kernel of peer ``name``
    (it raises when that kernel cannot take the inputs)."""
    from torch.nn.attention import SDPBackend, sdpa_kernel
    from torch.nn.functional import scaled_dot_product_attention

    kernel = getattr(SDPBackend, SDPA_KERNELS[name])
    gqa = q.shape[1] != k.shape[1]

    def run() -> Tensor:
        with sdpa_kernel(kernel):
            return scaled_dot_product_attention(
                q, k, v, attn_mask=attn_mask, is_causal=is_causal, enable_gqa=gqa
            )

    return run


def peer_call(name: str, q: Tensor, k: Tensor, v: Tensor, **kwargs: Any) -> Callable[[], Tensor]:
    """The timed call of peer ``name`` on ``q, k, v`` with ``qkv.attention``'s ``mask``,
    ``bias`` and ``causal`` arguments.

    Raises:
        ValueError: ``name`` is not a peer, or the peer cannot take these arguments.
    """
    if name not in PEERS:
        raise ValueError(f"unknown peer {name!r}; peers: {', '.join(PEERS)}")
    mask, bias, causal = kwargs.get("mask"), kwargs.get("bias"), bool(kwargs.get("causal"))
    if name in SDPA_KERNELS:
        if name == "sdpa-flash" and (mask is not None or bias is not None):
            raise ValueError("sdpa-flash takes no mask or bias tensor")
        given = bias if bias is not None else mask
        if given is not None and not isinstance(given, Tensor):
            raise ValueError(f"{name} needs the mask or bias as a dense tensor")
        return sdpa_forced(name, q, k, v, attn_mask=given, is_causal=causal)
    return _flex_call(q, k, v, mask, bias, causal)


def _flex_call(
    q: Tensor, k: Tensor, v: Tensor, mask: object, bias: object, causal: bool
) -> Callable[[], Tensor]:
    from torch.nn.attention.flex_attention import create_block_mask

    if isinstance(mask, Tensor) or isinstance(bias, Tensor):
        raise ValueError("flex takes mask and score functions, not dense tensors")
    request = build_request(q, k, v, mask=mask, bias=bias, causal=causal)  # type: ignore[arg-type]
    block = None
    if request.mask_fn is not None:  # the mask function and the causal flag, combined
        B, H, Nq, Nk = request.batch, request.q_heads, request.q_len, request.kv_len
        block = create_block_mask(request.mask_fn, B, H, Nq, Nk, device=q.device)
    flex = compiled_flex()
    gqa = q.shape[1] != k.shape[1]
    return lambda: flex(q, k, v, score_mod=request.score_mod, block_mask=block, enable_gqa=gqa)


def matmul_tflops(
    device: str | torch.device, *, dtype: torch.dtype = torch.bfloat16, n: int = 8192
) -> float:
    """TFLOP/s of an ``n x n x n`` matmul in ``dtype`` on ``device``: the median of 10 timed
    calls after 3 warm-up calls (library loading, clocks). The yardstick attention rates are
    given as a share of."""
    import statistics
    import time

    a = torch.randn(n, n, device=device, dtype=dtype)
    b = torch.randn(n, n, device=device, dtype=dtype)
    cuda = a.device.type == "cuda"
    times = []
    for i in range(13):
        start = time.perf_counter()
        a @ b
        if cuda:
            torch.cuda.synchronize(a.device)
        if i >= 3:
            times.append(time.perf_counter() - start)
    return 2 * n**3 / statistics.median(times) / 1e12


def memory_gbps(device: str | torch.device, *, mib: int = 256) -> float:
    """GB/s read from memory on ``device``: a float32 buffer of ``mib`` MiB (far larger than a
    CPU's last-level cache, so it comes from memory) summed, the median of 10 timed calls after
    3 warm-up calls, on the current thread count. The yardstick of a call that reads much and
    computes little, such as a decoding step reading its key/value cache."""
    import statistics
    import time

    if mib < 1:
        raise ValueError(f"mib must be >= 1; got {mib}")
    x = torch.rand(mib * 2**18, device=device)  # (mib MiB,) float32
    cuda = x.device.type == "cuda"
    times = []
    for i in range(13):
        start = time.perf_counter()
        x.sum()
        if cuda:
            torch.cuda.synchronize(x.device)
        if i >= 3:
            times.append(time.perf_counter() - start)
    return x.numel() * x.element_size() / statistics.median(times) / 1e9
