"""The seq2seq score functions and their modules, against formulas written out in float64."""

from __future__ import annotations

from collections.abc import Callable

import pytest
import torch
from torch import Tensor, nn

import qkv
from qkv.functional.score_functions import (
    additive_scores,
    concat_scores,
    cosine_scores,
    dot_scores,
    general_scores,
    scaled_dot_scores,
    score_attention,
)
from qkv.nn.scored import AdditiveAttention, CosineAttention, LuongAttention

B, NQ, NK, DQ, DK, DV, H = 2, 5, 7, 6, 4, 3, 8
F64 = torch.float64


def rand(*shape: int, seed: int, dtype: torch.dtype = F64) -> Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randn(shape, generator=g, dtype=dtype)


def gold_attention(scores: Tensor, values: Tensor, mask: Tensor | None) -> tuple[Tensor, Tensor]:
    """Plain softmax over the attended keys; fully masked rows set to zero by hand."""
    if mask is not None:
        scores = scores.masked_fill(~mask, float("-inf"))
    weights = torch.softmax(scores, dim=-1).nan_to_num(0.0)
    return weights @ values, weights


def random_mask(*shape: int, seed: int) -> Tensor:
    g = torch.Generator().manual_seed(seed)
    mask = torch.rand(*shape, generator=g) < 0.6
    mask[..., 0] = True  # every row attends somewhere; fully masked rows have their own tests
    return mask


# --- score functions against their formulas ------------------------------------------------------


def test_dot_and_scaled_dot_scores() -> None:
    q, k = rand(B, 3, NQ, DK, seed=1), rand(B, 3, NK, DK, seed=2)
    gold = torch.einsum("bhid,bhjd->bhij", q, k)
    torch.testing.assert_close(dot_scores(q, k), gold)
    torch.testing.assert_close(scaled_dot_scores(q, k), gold / DK**0.5)
    torch.testing.assert_close(scaled_dot_scores(q, k, scale=0.3), gold * 0.3)


def test_general_scores() -> None:
    q, k, W = rand(B, NQ, DQ, seed=1), rand(B, NK, DK, seed=2), rand(DQ, DK, seed=3)
    gold = torch.einsum("bip,pr,bjr->bij", q, W, k)
    torch.testing.assert_close(general_scores(q, k, W), gold)


@pytest.mark.parametrize("with_bias", [False, True])
def test_additive_scores(with_bias: bool) -> None:
    q, k = rand(B, NQ, DQ, seed=1), rand(B, NK, DK, seed=2)
    w_q, w_k, v = rand(H, DQ, seed=3), rand(H, DK, seed=4), rand(H, seed=5)
    bias = rand(H, seed=6) if with_bias else None
    pre = (
        torch.einsum("hp,bip->bih", w_q, q)[:, :, None]
        + torch.einsum("hr,bjr->bjh", w_k, k)[:, None]
    )
    if bias is not None:
        pre = pre + bias
    gold = torch.einsum("bijh,h->bij", torch.tanh(pre), v)
    torch.testing.assert_close(additive_scores(q, k, w_q, w_k, v, bias), gold)


def test_concat_scores_is_the_concatenation_formula() -> None:
    q, k = rand(B, NQ, DQ, seed=1), rand(B, NK, DK, seed=2)
    W, v = rand(H, DQ + DK, seed=3), rand(H, seed=4)
    pairs = torch.cat(
        [q[:, :, None].expand(B, NQ, NK, DQ), k[:, None].expand(B, NQ, NK, DK)], dim=-1
    )  # (B, Nq, Nk, Dq + Dk): [q_i; k_j]
    gold = torch.einsum("bijh,h->bij", torch.tanh(torch.einsum("hc,bijc->bijh", W, pairs)), v)
    torch.testing.assert_close(concat_scores(q, k, W, v), gold)


@pytest.mark.parametrize("temperature", [0.25, "tensor"])
def test_cosine_scores(temperature: float | str) -> None:
    q, k = rand(B, 3, NQ, DK, seed=1), rand(B, 3, NK, DK, seed=2)
    t: float | Tensor = rand(3, 1, 1, seed=3).abs() + 0.1 if temperature == "tensor" else 0.25
    dots = torch.einsum("bhid,bhjd->bhij", q, k)
    norms = q.norm(dim=-1)[..., :, None] * k.norm(dim=-1)[..., None, :]
    torch.testing.assert_close(cosine_scores(q, k, t), dots / norms / t)


def test_score_attention_matches_masked_softmax_formula() -> None:
    scores, values = rand(B, NQ, NK, seed=1), rand(B, NK, DV, seed=2)
    mask = random_mask(B, NQ, NK, seed=3)
    context, weights = score_attention(scores, values, mask)
    gold_context, gold_weights = gold_attention(scores, values, mask)
    torch.testing.assert_close(weights, gold_weights)
    torch.testing.assert_close(context, gold_context)
    assert not weights[~mask].any()


def test_score_attention_half_precision_softmax_in_float32() -> None:
    scores, values = rand(B, NQ, NK, seed=1) * 4, rand(B, NK, DV, seed=2)
    context, weights = score_attention(scores.half(), values.half())
    assert context.dtype == weights.dtype == torch.float16
    gold_context, _ = gold_attention(scores.half().double(), values.half().double(), None)
    torch.testing.assert_close(context.double(), gold_context, atol=2e-3, rtol=2e-3)


def test_score_attention_fully_masked_row_gives_zeros_and_finite_grads() -> None:
    scores = rand(B, NQ, NK, seed=1).requires_grad_()
    values = rand(B, NK, DV, seed=2).requires_grad_()
    mask = random_mask(B, NQ, NK, seed=3)
    mask[1, 2] = False
    context, weights = score_attention(scores, values, mask)
    assert torch.equal(context[1, 2], torch.zeros(DV, dtype=F64))
    assert torch.equal(weights[1, 2], torch.zeros(NK, dtype=F64))
    (context.sum() + weights.square().sum()).backward()
    assert scores.grad is not None and values.grad is not None
    assert torch.isfinite(scores.grad).all() and torch.isfinite(values.grad).all()
    assert not scores.grad[1, 2].any()


def test_additive_attention_gradcheck() -> None:
    q = rand(1, 2, 3, seed=1).requires_grad_()
    k = rand(1, 4, 2, seed=2).requires_grad_()
    w_q, w_k, v = (rand(*s, seed=i).requires_grad_() for i, s in enumerate([(5, 3), (5, 2), (5,)]))
    mask = torch.tensor([[[True, False, True, True], [False, False, False, False]]])

    def fn(q: Tensor, k: Tensor, w_q: Tensor, w_k: Tensor, v: Tensor) -> Tensor:
        return score_attention(additive_scores(q, k, w_q, w_k, v), k, mask)[0]

    assert torch.autograd.gradcheck(fn, (q, k, w_q, w_k, v))


# --- modules against their formulas -------------------------------------------------------------

ModuleFactory = Callable[[], nn.Module]
MODULES: dict[str, ModuleFactory] = {
    "additive": lambda: AdditiveAttention(DQ, DK, H),
    "dot": lambda: LuongAttention(DK, score="dot"),
    "general": lambda: LuongAttention(DQ, DK, score="general"),
    "concat": lambda: LuongAttention(DQ, DK, score="concat", hidden_dim=H),
    "cosine": lambda: CosineAttention(DQ, DK, init_temperature=0.3),
}


def make(name: str) -> nn.Module:
    torch.manual_seed(0)
    module = MODULES[name]().double()
    with torch.no_grad():  # move every parameter off its init (e.g. additive bias starts at 0)
        for p in module.parameters():
            p.add_(0.1 * rand(*p.shape, seed=99))
    return module


def query_dim(name: str) -> int:
    return DK if name == "dot" else DQ


def _inputs(name: str) -> tuple[Tensor, Tensor, Tensor]:
    return rand(B, NQ, query_dim(name), seed=1), rand(B, NK, DK, seed=2), rand(B, NK, DV, seed=3)


def gold_scores(name: str, module: nn.Module, q: Tensor, k: Tensor) -> Tensor:
    """The paper's score for every (query, key) pair, as an einsum on the module's parameters."""
    p = dict(module.named_parameters())
    if name == "dot":
        return torch.einsum("bid,bjd->bij", q, k)
    if name == "general":
        return torch.einsum("bip,pr,bjr->bij", q, p["weight"], k)
    if name == "additive":
        pre = (
            torch.einsum("hp,bip->bih", p["w_q"], q)[:, :, None]
            + torch.einsum("hr,bjr->bjh", p["w_k"], k)[:, None]
            + p["bias"]
        )
        return torch.einsum("bijh,h->bij", torch.tanh(pre), p["v"])
    if name == "concat":
        W = p["weight"]
        pre = torch.einsum("hp,bip->bih", W[:, :DQ], q)[:, :, None]
        pre = pre + torch.einsum("hr,bjr->bjh", W[:, DQ:], k)[:, None]
        return torch.einsum("bijh,h->bij", torch.tanh(pre), p["v"])
    assert name == "cosine"
    wq = torch.einsum("rp,bip->bir", p["weight"], q)
    cos = torch.einsum("bir,bjr->bij", wq, k)
    cos = cos / (wq.norm(dim=-1)[:, :, None] * k.norm(dim=-1)[:, None, :])
    return cos / p["log_temperature"].exp()


@pytest.mark.parametrize("name", list(MODULES))
@pytest.mark.parametrize("mask_kind", [None, "padding", "full"])
def test_module_equals_formula(name: str, mask_kind: str | None) -> None:
    module = make(name)
    q, k, v = rand(B, NQ, query_dim(name), seed=1), rand(B, NK, DK, seed=2), rand(B, NK, DV, seed=3)
    mask = {
        None: None,
        "padding": random_mask(B, NK, seed=4),
        "full": random_mask(B, NQ, NK, seed=4),
    }[mask_kind]
    context, weights = module(q, k, v, mask=mask)
    gold_mask = mask[:, None] if mask is not None and mask.ndim == 2 else mask
    gold_context, gold_weights = gold_attention(gold_scores(name, module, q, k), v, gold_mask)
    assert context.shape == (B, NQ, DV) and weights.shape == (B, NQ, NK)
    torch.testing.assert_close(weights, gold_weights)
    torch.testing.assert_close(context, gold_context)


@pytest.mark.parametrize("name", list(MODULES))
def test_values_default_to_keys(name: str) -> None:
    module = make(name)
    q, k = rand(B, NQ, query_dim(name), seed=1), rand(B, NK, DK, seed=2)
    context, weights = module(q, k)
    torch.testing.assert_close(context, weights @ k)


@pytest.mark.parametrize("name", list(MODULES))
def test_single_step_query_equals_one_query(name: str) -> None:
    module = make(name)
    q, k, v = rand(B, query_dim(name), seed=1), rand(B, NK, DK, seed=2), rand(B, NK, DV, seed=3)
    mask = random_mask(B, NK, seed=4)
    context, weights = module(q, k, v, mask=mask)
    context3, weights3 = module(q[:, None], k, v, mask=mask)
    assert context.shape == (B, DV) and weights.shape == (B, NK)
    torch.testing.assert_close(context, context3[:, 0])
    torch.testing.assert_close(weights, weights3[:, 0])
    context_m, _ = module(q, k, v, mask=mask[:, None])  # (B, 1, Nk) mask form, same result
    torch.testing.assert_close(context, context_m)


@pytest.mark.parametrize("name", list(MODULES))
def test_module_fully_masked_rows_give_zeros_and_finite_grads(name: str) -> None:
    module = make(name)
    q = rand(B, NQ, query_dim(name), seed=1).requires_grad_()
    k, v = rand(B, NK, DK, seed=2).requires_grad_(), rand(B, NK, DV, seed=3).requires_grad_()
    mask = random_mask(B, NQ, NK, seed=4)
    mask[0, 3] = False  # one query with nothing to attend to
    context, weights = module(q, k, v, mask=mask)
    assert torch.equal(context[0, 3], torch.zeros(DV, dtype=F64))
    assert torch.equal(weights[0, 3], torch.zeros(NK, dtype=F64))
    assert context[0, 2].abs().sum() > 0
    (context * rand(B, NQ, DV, seed=5)).sum().backward()
    tensors = {"query": q, "keys": k, "values": v, **dict(module.named_parameters())}
    for tname, t in tensors.items():
        assert t.grad is not None and torch.isfinite(t.grad).all(), tname
    assert q.grad is not None and not q.grad[0, 3].any()  # a masked-out query learns nothing


@pytest.mark.parametrize("name", list(MODULES))
def test_gradients_reach_every_parameter_and_input(name: str) -> None:
    module = make(name)
    q = rand(B, NQ, query_dim(name), seed=1).requires_grad_()
    k, v = rand(B, NK, DK, seed=2).requires_grad_(), rand(B, NK, DV, seed=3).requires_grad_()
    context, _ = module(q, k, v, mask=random_mask(B, NQ, NK, seed=4))
    (context * rand(B, NQ, DV, seed=5)).sum().backward()
    expected = {
        "additive": {"w_q", "w_k", "bias", "v"},
        "dot": set(),  # Luong's dot score has no parameters
        "general": {"weight"},
        "concat": {"weight", "v"},
        "cosine": {"weight", "log_temperature"},
    }[name]
    tensors = {"query": q, "keys": k, "values": v, **dict(module.named_parameters())}
    assert set(tensors) == {"query", "keys", "values"} | expected
    for tname, t in tensors.items():
        assert t.grad is not None and t.grad.abs().sum() > 0, tname


def test_temperature_is_learnable_and_positive() -> None:
    module = CosineAttention(DQ, DK, init_temperature=0.2)
    torch.testing.assert_close(module.temperature, torch.tensor(0.2))
    q, k = (
        rand(B, NQ, DQ, seed=1, dtype=torch.float32),
        rand(B, NK, DK, seed=2, dtype=torch.float32),
    )
    _, w_hot = module(q, k)
    with torch.no_grad():
        module.log_temperature.fill_(10.0)  # a huge temperature: near-uniform weights
    _, w_cold = module(q, k)
    torch.testing.assert_close(w_cold, torch.full_like(w_cold, 1 / NK), atol=1e-3, rtol=0)
    assert (w_hot - 1 / NK).abs().max() > 1e-2


@pytest.mark.parametrize("name", ["dot", "general"])
def test_luong_dot_and_general_agree_with_reference_attention(name: str) -> None:
    module = make(name)
    assert isinstance(module, LuongAttention)
    module.backend = "reference"
    q, k, v = rand(B, NQ, query_dim(name), seed=1), rand(B, NK, DK, seed=2), rand(B, NK, DV, seed=3)
    mask = random_mask(B, NQ, NK, seed=4)
    qq = q if module.weight is None else q @ module.weight  # general: q W, then a dot product
    out, w = qkv.attention(
        qq[:, None],
        k[:, None],
        v[:, None],
        mask=mask[:, None],
        scale=1.0,
        return_weights=True,
        backend="reference",
    )
    context, weights = module(q, k, v, mask=mask)
    torch.testing.assert_close(context, out[:, 0])
    torch.testing.assert_close(weights, w[:, 0])
    module.backend = "auto"  # the auto-selected backend gives the same answer
    torch.testing.assert_close(module(q, k, v, mask=mask)[0], context)


@pytest.mark.parametrize("name", list(MODULES))
@pytest.mark.parametrize("single_step", [False, True])
def test_need_weights_false_gives_the_same_context(name: str, single_step: bool) -> None:
    module = make(name)
    q, k, v = _inputs(name)
    if single_step:
        q = q[:, 0]  # (B, Dq)
    mask = random_mask(B, NK, seed=4)
    context, weights = module(q, k, v, mask=mask)
    context_only, none = module(q, k, v, mask=mask, need_weights=False)
    assert weights is not None and none is None
    torch.testing.assert_close(context_only, context)


@pytest.mark.parametrize("name", ["dot", "general", "cosine"])
def test_dot_product_scores_run_on_sdpa_without_weights(name: str) -> None:
    """SDPA cannot return weights, so naming it works exactly when need_weights=False."""
    module = make(name)
    q, k, v = _inputs(name)
    mask = random_mask(B, NQ, NK, seed=4)
    context, _ = module(q, k, v, mask=mask)
    assert isinstance(module, LuongAttention | CosineAttention)
    module.backend = "sdpa"
    context_sdpa, _ = module(q, k, v, mask=mask, need_weights=False)
    torch.testing.assert_close(context_sdpa, context)
    with pytest.raises(ValueError, match="return_weights"):
        module(q, k, v, mask=mask)


# --- errors ---------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("build", "error", "match"),
    [
        (lambda: LuongAttention(4, score="bilinear"), ValueError, r"score must be .*'bilinear'"),
        (lambda: LuongAttention(4, 6, score="dot"), ValueError, r"query_dim 4, key_dim 6"),
        (lambda: LuongAttention(4, score="dot", hidden_dim=8), ValueError, r"hidden_dim"),
        (lambda: LuongAttention(0), ValueError, r"query_dim must be a positive int; got 0"),
        (lambda: AdditiveAttention(4, 4, -2), ValueError, r"hidden_dim must be .* got -2"),
        (lambda: AdditiveAttention(4, 2.5, 8), ValueError, r"key_dim must be .* got 2.5"),
        (lambda: CosineAttention(4, 4, init_temperature=0.0), ValueError, r"init_temperature"),
        (lambda: CosineAttention(4, 4, init_temperature=-1.0), ValueError, r"got -1.0"),
    ],
)
def test_bad_constructor_arguments(
    build: Callable[[], nn.Module], error: type[Exception], match: str
) -> None:
    with pytest.raises(error, match=match):
        build()


BAD_FORWARD: list[tuple[str, Callable[..., dict[str, object]], type[Exception], str]] = [
    (
        "query rank",
        lambda q, k, v: {"query": q[0, 0]},
        ValueError,
        r"query must have shape \(B, Nq, Dq\) or \(B, Dq\); got a 1-d",
    ),
    ("query 4-d", lambda q, k, v: {"query": q[None]}, ValueError, r"query must .* 4-d"),
    (
        "keys rank",
        lambda q, k, v: {"keys": k[0]},
        ValueError,
        r"keys must have shape \(B, Nk, Dk\)",
    ),
    ("values rank", lambda q, k, v: {"values": v[0]}, ValueError, r"values must have shape"),
    (
        "query type",
        lambda q, k, v: {"query": q.numpy()},
        TypeError,
        r"query must be a torch.Tensor",
    ),
    ("keys int", lambda q, k, v: {"keys": k.long()}, TypeError, r"keys must be a floating"),
    ("dtype", lambda q, k, v: {"values": v.float()}, TypeError, r"values torch.float32"),
    (
        "batch",
        lambda q, k, v: {"keys": k[:1], "values": v[:1]},
        ValueError,
        r"query, keys and values must share the batch size B .* keys \(1, 7, 4\)",
    ),
    (
        "query_dim",
        lambda q, k, v: {"query": q[..., :1]},
        ValueError,
        r"query's last dim \(1\) must equal query_dim \([46]\); got query \(2, 5, 1\)",
    ),
    (
        "query_dim single step",
        lambda q, k, v: {"query": q[:, 0, :1]},
        ValueError,
        r"query's last dim \(1\) must equal query_dim .* got query \(2, 1\),",
    ),
    (
        "key_dim",
        lambda q, k, v: {"keys": k[..., :1]},
        ValueError,
        r"keys' last dim \(1\) must equal key_dim \(4\)",
    ),
    (
        "device",
        lambda q, k, v: {"keys": k.to("meta")},
        ValueError,
        r"query, keys and values must be on one device; .* keys meta",
    ),
    (
        "mask device",
        lambda q, k, v: {"mask": torch.ones(B, NK, dtype=torch.bool, device="meta")},
        ValueError,
        r"mask is on meta but query is on cpu",
    ),
    ("Nk", lambda q, k, v: {"values": v[:, :3]}, ValueError, r"length Nk .* values \(2, 3, 3\)"),
    (
        "mask dtype",
        lambda q, k, v: {"mask": torch.ones(B, NK)},
        TypeError,
        r"mask must be a bool tensor .* torch.float32",
    ),
    (
        "mask shape",
        lambda q, k, v: {"mask": torch.ones(B, 1, 1, NK, dtype=torch.bool)},
        ValueError,
        r"mask must have shape \(B, Nk\) = \(2, 7\) or \(B, Nq, Nk\) = \(2, 5, 7\); got \(2, 1, 1, 7\)",
    ),
]


@pytest.mark.parametrize("name", list(MODULES))
@pytest.mark.parametrize(("case", "change", "error", "match"), BAD_FORWARD)
def test_bad_forward_arguments(
    name: str,
    case: str,
    change: Callable[..., dict[str, object]],
    error: type[Exception],
    match: str,
) -> None:
    q, k, v = _inputs(name)
    args: dict[str, object] = {"query": q, "keys": k, "values": v, "mask": None}
    args.update(change(q, k, v))
    with pytest.raises(error, match=match):
        make(name)(**args)


@pytest.mark.parametrize(
    ("call", "error", "match"),
    [
        (
            lambda q, k: general_scores(q, k, rand(DK, DQ, seed=9)),
            ValueError,
            r"weight must have shape \(Dq, Dk\) = \(6, 4\); got \(4, 6\)",
        ),
        (
            lambda q, k: additive_scores(
                q, k, rand(H, DK, seed=9), rand(H, DK, seed=9), rand(H, seed=9)
            ),
            ValueError,
            r"w_q must have shape \(8, 6\)",
        ),
        (
            lambda q, k: concat_scores(q, k, rand(H, DQ, seed=9), rand(H, seed=9)),
            ValueError,
            r"weight must have shape \(H, Dq \+ Dk\) = \(H, 10\)",
        ),
        (lambda q, k: dot_scores(q, k), ValueError, r"q and k must share .* q \(2, 5, 6\)"),
        (
            lambda q, k: additive_scores(
                q, k, rand(H, DQ, seed=9), rand(H, DK, seed=9), rand(1, H, seed=9)
            ),
            ValueError,
            r"v must have shape \(H,\); got \(1, 8\)",
        ),
        (lambda q, k: cosine_scores(q, q, 0.0), ValueError, r"temperature .* got 0.0"),
        (
            lambda q, k: score_attention(
                rand(B, NQ, NK, seed=9), k, torch.ones(B, 2, NQ, NK, dtype=torch.bool)
            ),
            ValueError,
            r"mask of shape \(2, 2, 5, 7\) does not broadcast to the scores .* \(2, 5, 7\)",
        ),
        (
            lambda q, k: score_attention(rand(B, NQ, NK, seed=9), k, torch.ones(B, NQ, NK)),
            TypeError,
            r"mask must be a bool tensor",
        ),
        (
            lambda q, k: score_attention(rand(B, NQ, NK, seed=9), q),
            ValueError,
            r"share Nk; got scores \(2, 5, 7\), values \(2, 5, 6\)",
        ),
    ],
)
def test_bad_function_arguments(
    call: Callable[[Tensor, Tensor], object], error: type[Exception], match: str
) -> None:
    q, k = rand(B, NQ, DQ, seed=1), rand(B, NK, DK, seed=2)
    with pytest.raises(error, match=match):
        call(q, k)


# --- additive attention over query chunks ------------------------------------------------------


@pytest.mark.parametrize("mask_shape", [None, (2, 1, 11), (2, 7, 11)])
def test_chunked_additive_attention_equals_eager_with_gradients(
    mask_shape: tuple[int, ...] | None,
) -> None:
    from qkv.functional.score_functions import additive_attention

    g = torch.Generator().manual_seed(21)
    q = torch.randn(2, 7, 5, generator=g, dtype=torch.float64, requires_grad=True)
    k = torch.randn(2, 11, 6, generator=g, dtype=torch.float64, requires_grad=True)
    values = torch.randn(2, 11, 3, generator=g, dtype=torch.float64, requires_grad=True)
    w_q, w_k = (
        torch.randn(4, d, generator=g, dtype=torch.float64, requires_grad=True) for d in (5, 6)
    )
    v, b = (torch.randn(4, generator=g, dtype=torch.float64, requires_grad=True) for _ in range(2))
    mask = None if mask_shape is None else torch.rand(mask_shape, generator=g) < 0.7
    if mask is not None:
        mask[0, -1] = False  # a fully masked row, inside the last chunk
    inputs = (q, k, w_q, w_k, v, values, b)

    def grads(context: torch.Tensor) -> list[torch.Tensor]:
        return list(torch.autograd.grad(context.square().sum(), inputs))

    eager_ctx, eager_w = score_attention(additive_scores(q, k, w_q, w_k, v, b), values, mask)
    # 2 * 11 * 4 * 8 bytes = one query row: a budget of 2 rows gives chunks of 2, 2, 2, 1.
    ctx, w = additive_attention(q, k, w_q, w_k, v, values, b, mask, chunk_bytes=2 * 2 * 11 * 4 * 8)
    torch.testing.assert_close(ctx, eager_ctx)
    torch.testing.assert_close(w, eager_w)
    for got, want in zip(grads(ctx), grads(eager_ctx), strict=True):
        torch.testing.assert_close(got, want)
    no_weights = additive_attention(
        q, k, w_q, w_k, v, values, b, mask, need_weights=False, chunk_bytes=1
    )
    assert no_weights[1] is None
    torch.testing.assert_close(no_weights[0], eager_ctx)


def test_chunked_additive_attention_keeps_no_hidden_tensor_for_backward() -> None:
    from qkv.functional.score_functions import additive_attention

    g = torch.Generator().manual_seed(3)
    q = torch.randn(1, 64, 8, generator=g, requires_grad=True)
    k = torch.randn(1, 64, 8, generator=g)
    w_q, w_k = torch.randn(32, 8, generator=g), torch.randn(32, 8, generator=g)
    v = torch.randn(32, generator=g)
    saved: list[int] = []

    def count(t: torch.Tensor) -> torch.Tensor:
        saved.append(t.numel())
        return t

    with torch.autograd.graph.saved_tensors_hooks(count, lambda t: t):
        additive_attention(q, k, w_q, w_k, v, k, chunk_bytes=8 * 64 * 32 * 4)
    chunk_hidden_numel = 8 * 64 * 32  # (Tq, Nk, H) of one 8-row chunk
    assert saved, "nothing was saved for backward"
    assert max(saved) < chunk_hidden_numel, "a chunk's hidden tensor was kept instead of recomputed"
