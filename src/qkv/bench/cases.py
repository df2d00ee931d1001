"""What one benchmark case is, and the ``qkv.attention`` arguments it stands for."""

from __future__ import annotations

import itertools
from dataclasses import asdict, dataclass
from typing import Any, Literal

import torch

from qkv import masks, scores

MASK_KINDS = ("none", "causal", "sliding_window", "documents", "alibi", "relative_bias")
#: Mask kinds whose mask the chunked and triton backends can summarise once into a reusable
#: BlockMask, and those backends (each also runs with the mask summarised in the call).
BLOCK_MASK_KINDS = ("causal", "sliding_window", "documents")
BLOCK_MASK_BACKENDS = ("chunked", "triton")
#: Backends (and SDPA peers, :mod:`qkv.bench.peers`) handed a masked kind's mask or bias as a
#: prebuilt dense tensor. SDPA's flash kernel takes none; FlexAttention takes the functions.
DENSE_BACKENDS = ("sdpa", "reference", "sdpa-cudnn", "sdpa-efficient")
Mode = Literal["fwd", "fwd+bwd"]


@dataclass(frozen=True)
class BenchCase:
    """One timed call: ``backend`` on q ``(batch, heads, seq_len, head_dim)``, k and v
    ``(batch, kv_heads, seq_len, head_dim)``, with the mask ``mask_kind``.

    ``prebuilt``: the mask or bias is built before the timed calls and passed in, as a user
    who reuses it across calls would: the equivalent dense bool mask or float bias for SDPA and
    the reference ("given the equivalent dense mask"), a :class:`BlockMask` for chunked and triton.
    """

    backend: str
    mask_kind: str
    seq_len: int
    mode: Mode = "fwd"
    batch: int = 1
    heads: int = 8
    kv_heads: int = 8
    head_dim: int = 64
    dtype: str = "float32"
    device: str = "cpu"
    window: int = 256
    documents: int = 16
    repeats: int = 3
    prebuilt: bool = False

    def __post_init__(self) -> None:
        if self.mask_kind not in MASK_KINDS:
            raise ValueError(f"mask_kind must be one of {MASK_KINDS}; got {self.mask_kind!r}")
        if self.mode not in ("fwd", "fwd+bwd"):
            raise ValueError(f"mode must be 'fwd' or 'fwd+bwd'; got {self.mode!r}")

    @property
    def torch_dtype(self) -> torch.dtype:
        return getattr(torch, self.dtype)

    def label(self) -> str:
        return f"{self.mask_kind} N={self.seq_len} {self.mode}"

    @property
    def backend_label(self) -> str:
        """The backend column: ``chunked+bm`` (``triton+bm``) with a prebuilt block mask,
        ``sdpa+dense`` with a prebuilt dense mask or bias."""
        if not self.prebuilt:
            return self.backend
        if self.backend in BLOCK_MASK_BACKENDS:
            return f"{self.backend}+bm"
        return f"{self.backend}+dense"

    def attention_kwargs(self) -> dict[str, Any]:
        """The mask, causal flag and bias arguments for :func:`qkv.attention`."""
        n = self.seq_len
        if self.mask_kind == "causal":
            return {"causal": True}
        if self.mask_kind == "sliding_window":
            # A causal window of `window` keys: the query itself and window - 1 before it.
            return {"mask": masks.sliding_window(self.window - 1)}
        if self.mask_kind == "documents":
            ids = torch.arange(n, device=self.device) * self.documents // n
            return {"mask": masks.document(ids)}
        if self.mask_kind == "alibi":
            return {"bias": scores.alibi(self.heads)}
        if self.mask_kind == "relative_bias":  # a learnable additive score function
            torch.manual_seed(1)
            bias = scores.RelativePositionBias(self.heads, max_distance=128).to(self.device)
            return {"bias": bias}
        return {}

    def to_json(self) -> dict[str, Any]:
        return asdict(self)


def expand_sweep(
    *,
    backends: list[str],
    mask_kinds: list[str],
    seq_lens: list[int],
    modes: list[Mode],
    **fixed: Any,
) -> list[BenchCase]:
    """Every combination, ordered so one table row (mask, N, mode) has its backends together.

    SDPA (and the SDPA peers but flash) and the reference get a masked kind's mask or bias
    prebuilt as a dense tensor (what they would be given in practice); chunked and triton run
    twice on the kinds of :data:`BLOCK_MASK_KINDS`: summarising the mask in the call, and with a
    prebuilt block mask. FlexAttention is timed forward only on the CPU (it has no backward
    there).
    """
    cases = []
    for m, n, mode, b in itertools.product(mask_kinds, seq_lens, modes, backends):
        if b == "flex" and mode == "fwd+bwd" and _is_cpu(fixed.get("device", "cpu")):
            continue  # FlexAttention has no backward on the CPU
        dense = b in DENSE_BACKENDS and m not in ("none", "causal")
        cases.append(
            BenchCase(backend=b, mask_kind=m, seq_len=n, mode=mode, prebuilt=dense, **fixed)
        )
        if b in BLOCK_MASK_BACKENDS and m in BLOCK_MASK_KINDS:
            cases.append(
                BenchCase(backend=b, mask_kind=m, seq_len=n, mode=mode, prebuilt=True, **fixed)
            )
    return cases


def _is_cpu(device: object) -> bool:
    return torch.device(str(device)).type == "cpu"


def choose_backends(
    device: str, dtype: str, *, peers: bool = False
) -> tuple[list[str], dict[str, str]]:
    """What ``qkv bench`` times by default: every registered backend that can serve a plain call
    in ``dtype`` on ``device`` (so the triton backend on CUDA only), then with ``peers`` on CUDA
    PyTorch's own kernels (:data:`qkv.bench.peers.PEERS`), on the CPU compiled FlexAttention. Returns those names and, for each
    one left out, why."""
    from qkv.backends import available_backends, get_backend
    from qkv.bench.peers import PEERS
    from qkv.request import build_request

    probe = torch.empty(1, 1, 16, 16, dtype=getattr(torch, dtype), device=device)
    request = build_request(probe, probe, probe)
    chosen: list[str] = []
    left_out: dict[str, str] = {}
    for name in available_backends():
        reason = get_backend(name).supports(request)
        if reason is None:
            chosen.append(name)
        else:
            left_out[name] = reason
    if peers and torch.device(device).type == "cuda":
        chosen.extend(PEERS)
    elif peers:  # FlexAttention compiles for the CPU too (forward only); SDPA's forced kernels not
        chosen.append("flex")
        left_out["--peers"] = (
            "PyTorch's forced SDPA kernels are compared on CUDA only; on the CPU the peer is "
            "compiled FlexAttention, forward only (it has no backward on the CPU)"
        )
    return chosen, left_out
