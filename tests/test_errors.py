"""Every bad input raises TypeError or ValueError naming the argument and what was wrong."""

from __future__ import annotations

import pytest
import torch

import qkv
from qkv import masks, scores


def qkv_tensors(B=2, Hq=4, Hkv=2, Nq=5, Nk=7, D=8, Dv=6):  # type: ignore[no-untyped-def]
    g = torch.Generator().manual_seed(0)
    return (
        torch.randn(B, Hq, Nq, D, generator=g),
        torch.randn(B, Hkv, Nk, D, generator=g),
        torch.randn(B, Hkv, Nk, Dv, generator=g),
    )


@pytest.mark.parametrize(
    ("change", "error", "match"),
    [
        (
            lambda q, k, v: (q[0], k, v),
            ValueError,
            r"q must have shape \(B, Hq, Nq, D\); got a 3-d tensor of shape \(4, 5, 8\)",
        ),
        (lambda q, k, v: (q, k.unsqueeze(0), v), ValueError, r"k must have shape .* 5-d"),
        (lambda q, k, v: (q, k, v.numpy()), TypeError, r"v must be a torch.Tensor; got ndarray"),
        (
            lambda q, k, v: (q.long(), k, v),
            TypeError,
            r"q must be float16, bfloat16, float32 or float64; got torch.int64",
        ),
        (
            lambda q, k, v: (q, k.double(), v),
            TypeError,
            r"share a dtype; got q torch.float32, k torch.float64",
        ),
        (
            lambda q, k, v: (q[:1], k, v),
            ValueError,
            r"batch size B .* q \(1, 4, 5, 8\), k \(2, 2, 7, 8\)",
        ),
        (lambda q, k, v: (q, k, v[:, :1]), ValueError, r"same number of heads Hkv"),
        (
            lambda q, k, v: (q[:, :3], k, v),
            ValueError,
            r"query heads Hq \(3\) must be a multiple of key/value heads Hkv \(2\)",
        ),
        (lambda q, k, v: (q, k, v[:, :, :6]), ValueError, r"same length Nk"),
        (lambda q, k, v: (q[..., :4], k, v), ValueError, r"same head dim D .* q \(2, 4, 5, 4\)"),
    ],
)
def test_bad_tensors(change, error, match) -> None:  # type: ignore[no-untyped-def]
    with pytest.raises(error, match=match):
        qkv.attention(*change(*qkv_tensors()))


def test_mask_wrong_dtype_and_shape() -> None:
    q, k, v = qkv_tensors()
    with pytest.raises(
        TypeError, match=r"mask must be a bool tensor \(True = attend\); got dtype torch.float32"
    ):
        qkv.attention(q, k, v, mask=torch.ones(5, 7))
    with pytest.raises(
        ValueError,
        match=r"mask of shape \(5, 6\) does not broadcast to \(B, Hq, Nq, Nk\) = \(2, 4, 5, 7\)",
    ):
        qkv.attention(q, k, v, mask=torch.ones(5, 6, dtype=torch.bool))
    with pytest.raises(ValueError, match=r"mask of shape \(3, 1, 5, 7\)"):
        qkv.attention(q, k, v, mask=torch.ones(3, 1, 5, 7, dtype=torch.bool))
    with pytest.raises(
        TypeError, match=r"mask must be a bool tensor, a mask function or None; got str"
    ):
        qkv.attention(q, k, v, mask="causal")  # type: ignore[arg-type]


def test_bias_wrong_dtype_and_shape() -> None:
    q, k, v = qkv_tensors()
    with pytest.raises(
        TypeError, match=r"bias must be a floating-point tensor; got dtype torch.bool"
    ):
        qkv.attention(q, k, v, bias=torch.ones(5, 7, dtype=torch.bool))
    with pytest.raises(ValueError, match=r"bias of shape \(4, 7, 5\) does not broadcast"):
        qkv.attention(q, k, v, bias=torch.ones(4, 7, 5))


@pytest.mark.parametrize("p", [-0.1, 1.0, 1.5, float("nan")])
def test_dropout_out_of_range(p: float) -> None:
    with pytest.raises(ValueError, match=r"dropout_p must be in \[0, 1\); got"):
        qkv.attention(*qkv_tensors(), dropout_p=p)


def test_bad_causal_and_scale() -> None:
    with pytest.raises(
        ValueError, match=r'causal must be False, True, "top_left" or "bottom_right"; got \'lower\''
    ):
        qkv.attention(*qkv_tensors(), causal="lower")  # type: ignore[arg-type]
    with pytest.raises(ValueError, match=r"scale must be a finite Python number or None; got inf"):
        qkv.attention(*qkv_tensors(), scale=float("inf"))


def test_unknown_backend_lists_known_ones() -> None:
    with pytest.raises(
        ValueError, match=r"unknown backend 'flash'; known backends: auto, .*reference"
    ):
        qkv.attention(*qkv_tensors(), backend="flash")


def test_named_backend_that_cannot_serve_raises_its_reason() -> None:
    with pytest.raises(
        ValueError,
        match=r"backend 'sdpa' cannot serve this call: SDPA does not return the attention probabilities",
    ):
        qkv.attention(*qkv_tensors(), return_weights=True, backend="sdpa")
    with pytest.raises(
        ValueError,
        match=r"backend 'sdpa' cannot serve this call: score function softcap\(3.0\) is not an additive",
    ):
        qkv.attention(*qkv_tensors(), bias=scores.softcap(3.0), backend="sdpa")


def test_mask_factory_arguments() -> None:
    with pytest.raises(
        ValueError, match=r"sliding_window needs left >= 0 and right >= 0; got left=-1, right=0"
    ):
        masks.sliding_window(-1)
    with pytest.raises(
        ValueError, match=r"lengths must be a 1-d integer tensor of shape \(B,\); got \(2, 2\)"
    ):
        masks.key_padding(torch.ones(2, 2, dtype=torch.long))
    with pytest.raises(
        ValueError,
        match=r"query_ids must be an integer tensor of shape \(B, N\) or \(N,\); got \(4,\) torch.float32",
    ):
        masks.document(torch.ones(4))
    with pytest.raises(ValueError, match=r"softcap needs a finite cap > 0; got 0"):
        scores.softcap(0)
    with pytest.raises(ValueError, match=r"num_heads must be >= 1; got 0"):
        scores.alibi_slopes(0)


# --- mask helpers and score functions checked against the call -----------------------------------


def _call(mask=None, bias=None, backend="auto", **sizes):  # type: ignore[no-untyped-def]
    """qkv.attention on B=3, Hq=4, Nq=5, Nk=7 (or ``sizes``) with ``mask`` / ``bias``."""
    shape = {"B": 3, "Hq": 4, "Hkv": 2, "Nq": 5, "Nk": 7, **sizes}
    return qkv.attention(*qkv_tensors(**shape), mask=mask, bias=bias, backend=backend)


ids = torch.zeros  # document ids (all one document) of a given length


@pytest.mark.parametrize("backend", ["reference", "chunked", "sdpa", "auto"])
@pytest.mark.parametrize(
    ("make", "error", "names", "shows"),
    [
        (lambda: masks.key_padding([2, 7]), ValueError, "key_padding lengths", "B = 3"),
        (lambda: masks.key_padding([2, 7, 3, 4]), ValueError, "key_padding lengths", "4 entries"),
        (lambda: masks.key_padding([2, 8, 3]), ValueError, "key_padding lengths", "Nk = 7"),
        (lambda: masks.query_padding([1, 2]), ValueError, "query_padding lengths", "B = 3"),
        (lambda: masks.query_padding([1, 6, 2]), ValueError, "query_padding lengths", "Nq = 5"),
        (lambda: masks.prefix_lm([1, 2, 3, 4]), ValueError, "prefix_lm prefix_lengths", "B = 3"),
        (
            lambda: masks.document(ids(8, dtype=torch.long), ids(7, dtype=torch.long)),
            ValueError,
            "document query_ids",
            "Nq = 5",
        ),
        (
            lambda: masks.document(ids(4, dtype=torch.long), ids(7, dtype=torch.long)),
            ValueError,
            "document query_ids",
            "Nq = 5",
        ),
        (
            lambda: masks.document(ids(5, dtype=torch.long), ids(6, dtype=torch.long)),
            ValueError,
            "document key_ids",
            "Nk = 7",
        ),
        (
            lambda: masks.document(ids(4, 5, dtype=torch.long), ids(7, dtype=torch.long)),
            ValueError,
            "document query_ids",
            "B = 3",
        ),
        (lambda: masks.document(ids(5, dtype=torch.long)), ValueError, "key_ids", "Nk = 7"),
        (
            lambda: masks.document(ids(0, dtype=torch.long), ids(7, dtype=torch.long)),
            ValueError,
            "document query_ids",
            "(1, 0)",
        ),
        (
            lambda: masks.dense(torch.ones(5, 8, dtype=torch.bool)),
            ValueError,
            "dense mask",
            "(5, 8)",
        ),
        (
            lambda: masks.causal() & masks.key_padding([1, 2]),
            ValueError,
            "key_padding lengths",
            "B = 3",
        ),
        (
            lambda: ~masks.document(ids(6, dtype=torch.long)),
            ValueError,
            "document",
            "Nk = 7",
        ),
        (
            lambda: lambda b, h, q, kv: (kv <= q).float(),
            TypeError,
            "mask",
            "torch.float32",
        ),
        (
            lambda: lambda b, h, q, kv: torch.ones(5, 7, dtype=torch.bool),
            ValueError,
            "mask",
            "(5, 7)",
        ),
        (lambda: lambda b, h, q, kv: True, TypeError, "mask", "got bool True"),
        (lambda: lambda b, h, q, kv: (kv <= q) and (kv >= 0), ValueError, "mask", "ambiguous"),
        (
            lambda: masks.mask_function(lambda b, h, q, kv: kv.float()) | masks.causal(),
            TypeError,
            "mask",
            "torch.float32",
        ),
    ],
)
def test_mask_checked_against_the_call(make, error, names, shows, backend) -> None:  # type: ignore[no-untyped-def]
    with pytest.raises(error) as caught:
        _call(mask=make(), backend=backend)
    assert names in str(caught.value) and shows in str(caught.value)


@pytest.mark.parametrize(
    ("make", "error", "names"),
    [
        (lambda: masks.key_padding([-1, 2, 3]), ValueError, "key_padding lengths must be >= 0"),
        (lambda: masks.key_padding([1.5, 2]), TypeError, "key_padding lengths must be integers"),
        (lambda: masks.query_padding(-2), ValueError, "query_padding lengths must be >= 0"),
        (lambda: masks.prefix_lm(-1), ValueError, "prefix_lm prefix_lengths must be >= 0"),
        (lambda: masks.prefix_lm([2, -1]), ValueError, "prefix_lm prefix_lengths must be >= 0"),
        (lambda: masks.sliding_window(1.5), TypeError, "sliding_window left must be an integer"),
        (
            lambda: masks.sliding_window(float("nan")),
            TypeError,
            "sliding_window left must be an integer",
        ),
        (
            lambda: masks.sliding_window(4, 2.5),
            TypeError,
            "sliding_window right must be an integer",
        ),
        (lambda: masks.causal(0.5), TypeError, "causal offset must be an integer"),
        (lambda: scores.softcap(float("inf")), ValueError, "softcap needs a finite cap > 0"),
        (lambda: scores.softcap(float("nan")), ValueError, "softcap needs a finite cap > 0"),
        (lambda: scores.alibi(2.0), TypeError, "alibi num_heads"),  # type: ignore[arg-type]
        (lambda: masks.dense(torch.ones(1, 1, 1, 5, 7, dtype=torch.bool)), ValueError, "dense"),
    ],
)
def test_mask_and_score_factories_refuse_bad_values(make, error, names) -> None:  # type: ignore[no-untyped-def]
    with pytest.raises(error, match=names.replace("(", r"\(")):
        make()


@pytest.mark.parametrize("backend", ["reference", "chunked", "sdpa", "auto"])
def test_score_functions_checked_against_the_heads(backend: str) -> None:
    with pytest.raises(ValueError, match=r"alibi was built for 2 heads but the call has Hq = 4"):
        _call(bias=scores.alibi(2), backend=backend)
    with pytest.raises(ValueError, match=r"alibi was built for 2 heads"):
        _call(bias=scores.chain(scores.alibi(2), scores.alibi(4)), backend=backend)
    with pytest.raises(ValueError, match=r"RelativePositionBias has 3 heads .* Hq = 4"):
        _call(bias=scores.RelativePositionBias(3, 4), backend=backend)


def test_masks_that_fit_the_call_still_work_and_match_the_reference() -> None:
    """The checks accept what fits: one length shared by the batch, zero lengths, B rows."""
    q, k, v = qkv_tensors(B=3, Hq=4, Hkv=2, Nq=5, Nk=7)
    doc_q = torch.tensor([[0, 0, 1, 1, 1]] * 3)
    doc_k = torch.tensor([0, 0, 0, 1, 1, 1, 1])
    for mask in (
        masks.key_padding([7]),
        masks.key_padding(torch.tensor([0, 3, 7])),
        masks.query_padding(5),
        masks.prefix_lm([0, 2, 9]),
        masks.document(doc_q, doc_k),
        masks.dense(torch.rand(5, 7) > 0.5),
    ):
        expected = qkv.attention(q.double(), k.double(), v.double(), mask=mask, backend="reference")
        for backend in ("chunked", "sdpa"):
            out = qkv.attention(q, k, v, mask=mask, backend=backend)
            torch.testing.assert_close(out.double(), expected, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("backend", ["reference", "chunked", "sdpa", "auto"])
def test_zero_query_heads_give_an_empty_output(backend: str) -> None:
    q, k, v = qkv_tensors(B=2, Hq=0, Hkv=1, Nq=5, Nk=7)
    assert qkv.attention(q, k, v, backend=backend).shape == (2, 0, 5, 6)


_TABLE = torch.tensor([True, False] * 5)  # a 10-entry lookup: fine for Nk <= 10 only
MALFORMED_MASKS = {
    "fixed (2, 2) tensor": lambda b, h, q, kv: torch.ones(2, 2, dtype=torch.bool),
    "first two keys only": lambda b, h, q, kv: kv[..., :2] <= q,
    "first three keys only": lambda b, h, q, kv: kv[..., :3] <= q,  # passes the corner
    "10-entry table": lambda b, h, q, kv: _TABLE[kv] & (q >= 0),
    "(Tk, Tq) layout": lambda b, h, q, kv: kv.transpose(-1, -2) <= q.transpose(-1, -2),
}


@pytest.mark.parametrize("backend", ["reference", "sdpa", "chunked", "auto", "weights"])
@pytest.mark.parametrize("n", [12, 300])
@pytest.mark.parametrize("name", list(MALFORMED_MASKS))
def test_malformed_mask_function_is_a_clear_error_naming_it(
    name: str, n: int, backend: str
) -> None:
    # Each passes a 2 x 2 corner check; on a real tile it raised raw torch errors from inside
    # a backend, and the (Tk, Tq) one ran without error when Nq == Nk.
    fn = MALFORMED_MASKS[name]
    g = torch.Generator().manual_seed(1)
    q, k, v = (torch.randn(1, 2, n, 8, generator=g) for _ in range(3))
    with pytest.raises((ValueError, TypeError), match=r"mask: the mask function <lambda>"):
        if backend == "weights":
            qkv.attention_weights(q, k, v, mask=fn)
        else:
            qkv.attention(q, k, v, mask=fn, backend=backend)


def test_mask_function_returning_a_wrong_dtype_on_a_real_tile_is_named() -> None:
    def sneaky(b: torch.Tensor, h: torch.Tensor, q: torch.Tensor, kv: torch.Tensor) -> torch.Tensor:
        out = kv <= q
        return out if q.shape[-2] <= 2 else out.float()

    q, k, v = qkv_tensors(Nq=40, Nk=40)
    with pytest.raises(
        TypeError, match=r"sneaky must return a bool tensor; got dtype torch.float32"
    ):
        qkv.attention(q, k, v, mask=sneaky, backend="chunked")


def test_corner_check_uses_unequal_sides() -> None:
    # With Nq = Nk = 2 the corner is 2 x 1, so a (Tk, Tq) result cannot pass either.
    q, k, v = qkv_tensors(Nq=2, Nk=2)
    with pytest.raises(ValueError, match=r"returned shape \(1, 1, 1, 2\) on a corner"):
        qkv.attention(q, k, v, mask=MALFORMED_MASKS["(Tk, Tq) layout"])


@pytest.mark.parametrize(
    "make",
    [masks.key_padding, masks.query_padding, masks.prefix_lm],
    ids=["key_padding", "query_padding", "prefix_lm"],
)
def test_empty_lengths_say_how_many_the_call_needs(make) -> None:  # type: ignore[no-untyped-def]
    q, k, v = qkv_tensors()
    with pytest.raises(
        ValueError, match=r"has 0 entries \(\[\]\) but the call has batch size B = 2"
    ):
        qkv.attention(q, k, v, mask=make([]))
    # With no batch entries at all, no lengths is exactly right.
    out = qkv.attention(q[:0], k[:0], v[:0], mask=make([]))
    assert out.shape == (0, 4, 5, 6)


def test_empty_selections_select_nothing_as_indexing_does() -> None:
    q, k, v = qkv_tensors()
    full = qkv.attention(q, k, v, return_weights=True, backend="reference")[1]
    for heads, rows in (([], None), (None, []), (slice(6, 2), None), (None, range(3, 3))):
        got = qkv.attention_weights(q, k, v, heads=heads, rows=rows)
        expected = full[:, heads if heads is not None else slice(None)]
        expected = expected[:, :, rows if rows is not None else slice(None)]
        assert got.shape == expected.shape
        summary = qkv.attention_summary(q, k, v, heads=heads, rows=rows)
        assert summary.entropy.shape == expected.shape[:3]


META = torch.device("meta")


@pytest.mark.parametrize(
    ("build", "match"),
    [
        (
            lambda: {"mask": masks.dense(torch.ones(5, 7, dtype=torch.bool, device=META))},
            r"dense mask 'dense' is on the meta device",
        ),
        (
            lambda: {"mask": masks.key_padding(torch.tensor([3, 4], device=META))},
            r"key_padding lengths is on the meta device",
        ),
        (
            lambda: {"mask": masks.document(torch.zeros(2, 5, dtype=torch.long, device=META))},
            r"document query_ids is on the meta device",
        ),
        (
            lambda: {"bias": scores.alibi(torch.ones(4, device=META))},
            r"alibi slopes are on the meta device",
        ),
        (
            lambda: {"bias": scores.RelativePositionBias(4, 3).to(META)},
            r"RelativePositionBias\(.*\) holds table on meta but q is on cpu; move it",
        ),
    ],
    ids=["dense", "key_padding", "document", "alibi", "relative"],
)
def test_helpers_given_tensors_without_values_say_so(build, match: str) -> None:  # type: ignore[no-untyped-def]
    q, k, v = qkv_tensors()
    with pytest.raises(ValueError, match=match):
        qkv.attention(q, k, v, **build())


def test_qkv_on_the_meta_device_is_refused() -> None:
    q, k, v = (t.to(META) for t in qkv_tensors())
    for backend in ("auto", "reference", "chunked"):
        with pytest.raises(ValueError, match=r"q, k and v are on the meta device"):
            qkv.attention(q, k, v, backend=backend)
