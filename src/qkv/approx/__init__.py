r"""Approximate attention: cheaper than ``softmax(q k^T / sqrt(D)) v``, and NOT exact.

Nothing here is registered in the backend registry (:mod:`qkv.backends`): every backend there
passes the float64 conformance suite, and none of these would. They share one signature where
the method allows it::

    out = method(q, k, v, *, mask=None, causal=False, ...)     # -> (B, Hq, Nq, Dv)

with ``q (B, Hq, Nq, D)``, ``k (B, Hkv, Nk, D)``, ``v (B, Hkv, Nk, Dv)`` and grouped-query
attention (``Hq`` a multiple of ``Hkv``) throughout.

============  =============================================  ======  ==========  ==============
name          method                                         causal  mask        cost
============  =============================================  ======  ==========  ==============
linear        elu+1 feature map (Katharopoulos et al. 2020)  yes     key pad.    O(N D Dv)
performer     FAVOR+ random features (Choromanski 2021)      yes     key pad.    O(N M Dv)
nystrom       segment-mean landmarks (Xiong et al. 2021)     no      key pad.    O(N m D)
linformer     learned projections (Wang et al. 2020)         no      key pad.    O(N r D)
bigbird       local + global + random blocks (Zaheer 2020)   yes     any         O(N w D)
local         sliding window                                 yes     any         O(N w D)
============  =============================================  ======  ==========  ==============

``bigbird`` and ``local`` are exact attention over a subset of the pairs: patterns expressed as
:mod:`qkv.masks` mask functions, run by :func:`qkv.attention` on the exact sparse kernels.
``performer`` and ``linformer`` hold state (random features, learned projections) and are
modules. :func:`make_attention` builds any of them by name from the registry
(:mod:`qkv.approx.registry`, where each method also says what benchmarks need to know of it);
:func:`qkv.nn.swap_attention` puts one into every :class:`qkv.nn.MultiHeadAttention` of an
already built (or loaded) model.
"""

from __future__ import annotations

from qkv.approx.bigbird import bigbird_attention, bigbird_blocks, bigbird_mask, local_attention
from qkv.approx.linear import elu_feature_map, linear_attention
from qkv.approx.linformer import LinformerAttention, linformer_attention
from qkv.approx.nystrom import iterative_pinv, nystrom_attention, segment_means
from qkv.approx.performer import (
    PerformerAttention,
    orthogonal_features,
    performer_attention,
    positive_features,
)
from qkv.approx.registry import (
    APPROXIMATIONS,
    Approximation,
    AttentionFn,
    check_attention_config,
    make_attention,
)

__all__ = [
    "APPROXIMATIONS",
    "Approximation",
    "AttentionFn",
    "LinformerAttention",
    "PerformerAttention",
    "bigbird_attention",
    "bigbird_blocks",
    "bigbird_mask",
    "check_attention_config",
    "elu_feature_map",
    "iterative_pinv",
    "linear_attention",
    "linformer_attention",
    "local_attention",
    "make_attention",
    "nystrom_attention",
    "orthogonal_features",
    "performer_attention",
    "positive_features",
    "segment_means",
]
