r"""Is the attention of a trained classifier an explanation of its decision? Measured.

For an :class:`~qkv.models.classifier.AttentionClassifier` and one text (token ids ``(n,)``),
each function here scores every token; the report compares the attention-based scores with
scores that follow from the model's computation:

==========================  ===================================================================
attention-based             ``attention``: the pooling weights (mean over the ``r`` queries);
                            ``rollout``: the pooling weights carried through the encoder's
                            self-attention by attention rollout (Transformer encoders only);
                            ``attention_x_gradient``: ``|a_i * d logit / d a_i|``
reference                   ``gradient``: ``||d logit / d e_i||`` (embedding gradient norm);
                            ``integrated_gradients``: ``|sum_d (e_i - 0) * mean_alpha
                            d logit(alpha e) / d e_i|`` (Sundararajan et al. 2017, zero
                            embeddings as the baseline, 32 steps);
                            ``leave_one_out``: ``p(y | x) - p(y | x without token i)``
==========================  ===================================================================

``logit`` and ``p`` are those of the class the model predicts for the text. Tokens are erased by
deleting them (the text gets shorter), not by a replacement token the model never saw.

The report gives (Jain & Wallace 2019, "Attention is not Explanation"; Wiegreffe & Pinter 2019,
"Attention is not not Explanation"):

- **rank agreement**: Kendall's tau-b between each attention-based and each reference score;
- **erasure**: how much ``p(y)`` drops, and how often the decision flips, when the ``k`` most
  attended tokens are deleted, against ``k`` random tokens (and the top-``k`` by leave-one-out,
  the best this greedy test can do);
- **permuted attention**: the pooling weights shuffled over the text's tokens (the encoder's
  states kept), the median total-variation distance (TVD) of the output distribution;
- **adversarial attention**: pooling weights found by gradient ascent to be as far as possible
  from the model's own (Jensen-Shannon divergence, at most ``ln 2 = 0.693``) while the output
  moves by at most ``TVD <= 0.01``.

The last two change the pooling weights *after* the encoder, as Jain & Wallace did; a weight
vector the model could not itself produce may still leave the output unchanged (Wiegreffe &
Pinter's objection), so a large adversarial divergence shows that the attention is not the only
possible explanation, not that it is a wrong one.

Shapes: ``n`` tokens of one text, ``r`` pooling queries, ``C`` classes, ``E`` embedding size,
``Dh`` encoder state size, ``H`` heads of a Transformer encoder layer.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor

from qkv.models.classifier import AttentionClassifier

__all__ = [
    "ATTENTION_METHODS",
    "REFERENCE_METHODS",
    "ErasureResult",
    "FaithfulnessReport",
    "adversarial_attention",
    "attention_gradient_importance",
    "attention_importance",
    "erase",
    "erasure_test",
    "faithfulness_report",
    "gradient_importance",
    "integrated_gradients",
    "kendall_tau",
    "leave_one_out",
    "permutation_test",
    "pooled_logits",
    "pooling_weights",
    "predict",
    "rollout_importance",
    "self_attention",
]

ATTENTION_METHODS = ("attention", "rollout", "attention_x_gradient")
REFERENCE_METHODS = ("gradient", "integrated_gradients", "leave_one_out")


def _check_ids(ids: object) -> Tensor:
    if not isinstance(ids, Tensor) or ids.dtype not in (torch.int64, torch.int32):
        raise TypeError(f"ids must be an int64 tensor (n,), got {getattr(ids, 'dtype', ids)!r}")
    if ids.ndim != 1 or ids.numel() == 0:
        raise ValueError(
            f"ids must be the (n,) token ids of one text, n >= 1; got {tuple(ids.shape)}"
        )
    if bool((ids == 0).any()):
        raise ValueError("ids must not hold the padding id 0: pass the text's real tokens only")
    return ids.long()


def _batch(rows: Sequence[Tensor]) -> tuple[Tensor, Tensor]:
    """Right-padded ``(B, N)`` ids and mask; an empty row is one masked pad token."""
    width = max(1, max(int(r.numel()) for r in rows))
    ids = torch.zeros(len(rows), width, dtype=torch.long)
    for i, row in enumerate(rows):
        ids[i, : row.numel()] = row
    return ids, ids != 0


# --- the model's pieces, so the pooling weights can be read and replaced ---------------------


def encode(model: AttentionClassifier, embedded: Tensor, mask: Tensor) -> Tensor:
    """Encoder states ``(B, N, Dh)`` of embeddings ``(B, N, E)`` (eval mode: no dropout)."""
    return model.encoder(embedded, mask)


def pooling_weights(model: AttentionClassifier, states: Tensor, mask: Tensor) -> Tensor:
    """The pooling weights ``(B, r, N)`` for states ``(B, N, Dh)``, as the model computes them
    (scale 1, padding masked; a text with no token gets zeros)."""
    keys = torch.tanh(model.pool.key_proj(states))  # (B, N, Da)
    scores = torch.einsum("rd,bnd->brn", model.pool.queries, keys)
    scores = scores.masked_fill(~mask[:, None, :], float("-inf"))
    return torch.nan_to_num(scores.softmax(dim=-1), nan=0.0)


def pooled_logits(model: AttentionClassifier, states: Tensor, weights: Tensor) -> Tensor:
    """Logits ``(B, C)`` of states ``(B, N, Dh)`` pooled with any weights ``(B, r, N)``."""
    pooled = weights @ states  # (B, r, Dh)
    return model.head(pooled.flatten(1))


def _logits(model: AttentionClassifier, embedded: Tensor, mask: Tensor) -> Tensor:
    states = encode(model, embedded, mask)
    return pooled_logits(model, states, pooling_weights(model, states, mask))


def predict(model: AttentionClassifier, rows: Sequence[Tensor]) -> Tensor:
    """Class probabilities ``(B, C)`` of texts given as id rows (of any lengths, empty allowed)."""
    ids, mask = _batch(rows)
    with torch.no_grad():
        return model(ids, mask).logits.float().softmax(dim=-1)


# --- token importance --------------------------------------------------------------------------


def attention_importance(model: AttentionClassifier, ids: Tensor) -> Tensor:
    """``(n,)`` pooling weights of the text, averaged over the ``r`` pooling queries."""
    ids = _check_ids(ids)
    with torch.no_grad():
        return model(ids[None]).weights[0].float().mean(dim=0)


def self_attention(model: AttentionClassifier, ids: Tensor) -> list[Tensor]:
    """The Transformer encoder's self-attention weights, one ``(1, H, n, n)`` per layer.

    Raises:
        ValueError: the encoder is not a Transformer (a GRU has no attention to roll out).
    """
    ids = _check_ids(ids)
    if model.config.encoder != "transformer":
        raise ValueError(
            f"rollout needs a Transformer encoder; this one is {model.config.encoder!r}"
        )
    x = model.embed(ids[None])
    mask = torch.ones_like(ids[None], dtype=torch.bool)
    layers = []
    with torch.no_grad():
        blocks: Any = model.encoder.blocks  # the Transformer encoder's pre-norm blocks
        for block in blocks:
            attended, weights = block.attn(
                block.norm1(x), key_padding_mask=mask, need_weights=True, average_attn_weights=False
            )
            layers.append(weights)
            x = x + attended
            x = x + block.ffn(block.norm2(x))
    return layers


def rollout_importance(model: AttentionClassifier, ids: Tensor) -> Tensor:
    """``(n,)``: the pooling weights carried through the encoder by attention rollout (Abnar &
    Zuidema 2020): ``a R`` with ``R`` the rollout of the self-attention layers (rows: states,
    columns: input tokens)."""
    from qkv.viz.rollout import attention_rollout

    rollout = attention_rollout(self_attention(model, ids))[0]  # (n, n)
    return attention_importance(model, ids) @ rollout.float()


def _predicted(model: AttentionClassifier, ids: Tensor) -> int:
    return int(predict(model, [ids])[0].argmax())


def attention_gradient_importance(model: AttentionClassifier, ids: Tensor) -> Tensor:
    """``(n,)``: ``sum_r |a_ri * d logit_y / d a_ri|``, the pooling weights times the gradient of
    the predicted class's logit with respect to them."""
    ids = _check_ids(ids)
    y = _predicted(model, ids)
    mask = torch.ones(1, ids.numel(), dtype=torch.bool)
    with torch.no_grad():
        states = encode(model, model.embed(ids[None]), mask)
        weights = pooling_weights(model, states, mask)
    weights.requires_grad_(True)
    pooled_logits(model, states, weights)[0, y].backward()
    assert weights.grad is not None
    return (weights * weights.grad).abs().sum(dim=1)[0].detach()


def gradient_importance(model: AttentionClassifier, ids: Tensor) -> Tensor:
    """``(n,)``: the L2 norm of the predicted logit's gradient with respect to each embedding."""
    ids = _check_ids(ids)
    y = _predicted(model, ids)
    embedded = model.embed(ids[None]).detach().requires_grad_(True)
    _logits(model, embedded, torch.ones(1, ids.numel(), dtype=torch.bool))[0, y].backward()
    assert embedded.grad is not None
    return embedded.grad[0].norm(dim=-1)


def integrated_gradients(
    model: AttentionClassifier, ids: Tensor, *, steps: int = 32, signed: bool = False
) -> Tensor:
    """``(n,)`` integrated gradients of the predicted logit from zero embeddings to the text's
    (midpoint rule, ``steps`` points). ``signed=True`` keeps the sign: the attributions then sum
    to ``logit(x) - logit(0)`` up to the quadrature error (completeness)."""
    ids = _check_ids(ids)
    if steps < 1:
        raise ValueError(f"steps must be >= 1, got {steps}")
    y = _predicted(model, ids)
    with torch.no_grad():
        embedded = model.embed(ids[None])  # (1, n, E)
    alphas = (torch.arange(steps, dtype=torch.float32) + 0.5) / steps
    path = (alphas.view(-1, 1, 1) * embedded).requires_grad_(True)  # (steps, n, E)
    mask = torch.ones(steps, ids.numel(), dtype=torch.bool)
    _logits(model, path, mask)[:, y].sum().backward()
    assert path.grad is not None
    attribution = (embedded[0] * path.grad.mean(dim=0)).sum(dim=-1)  # (n,)
    return attribution if signed else attribution.abs()


def erase(ids: Tensor, positions: Tensor | Sequence[int]) -> Tensor:
    """``ids`` without the tokens at ``positions`` (the text gets shorter)."""
    keep = torch.ones(ids.numel(), dtype=torch.bool)
    keep[torch.as_tensor(positions, dtype=torch.long)] = False
    return ids[keep]


def leave_one_out(model: AttentionClassifier, ids: Tensor) -> Tensor:
    """``(n,)``: ``p(y | x) - p(y | x without token i)`` for the predicted class ``y``."""
    ids = _check_ids(ids)
    probs = predict(model, [ids, *(erase(ids, [i]) for i in range(ids.numel()))])
    y = int(probs[0].argmax())
    return probs[0, y] - probs[1:, y]


IMPORTANCE: dict[str, Callable[[AttentionClassifier, Tensor], Tensor]] = {
    "attention": attention_importance,
    "rollout": rollout_importance,
    "attention_x_gradient": attention_gradient_importance,
    "gradient": gradient_importance,
    "integrated_gradients": integrated_gradients,
    "leave_one_out": leave_one_out,
}


# --- comparisons -------------------------------------------------------------------------------


def kendall_tau(a: Tensor, b: Tensor) -> float:
    """Kendall's tau-b of two ``(n,)`` score vectors (ties counted as in tau-b).

    0 when either vector is constant (no order to agree with), by convention, so a uniform
    attention correlates with nothing.
    """
    if a.shape != b.shape or a.ndim != 1:
        raise ValueError(
            f"a and b must be (n,) of one length; got {tuple(a.shape)}, {tuple(b.shape)}"
        )
    da = torch.sign(a[:, None] - a[None, :]).double()
    db = torch.sign(b[:, None] - b[None, :]).double()
    upper = torch.triu(torch.ones_like(da, dtype=torch.bool), diagonal=1)
    concordance = float((da * db)[upper].sum())
    pairs_a = float((da != 0)[upper].sum())
    pairs_b = float((db != 0)[upper].sum())
    if pairs_a == 0 or pairs_b == 0:
        return 0.0
    return concordance / math.sqrt(pairs_a * pairs_b)


@dataclass(frozen=True)
class ErasureResult:
    """Deleting ``k`` tokens from one text.

    Attributes:
        drop: ``p(y | x) - p(y | x without them)``, for the class ``y`` predicted on ``x``.
        flipped: 1.0 when the decision changed, else 0.0 (for an average over random
            subsets, the share of them that changed it).
    """

    drop: float
    flipped: float


def erasure_test(model: AttentionClassifier, ids: Tensor, positions: Tensor) -> ErasureResult:
    """The change of the decision when the tokens at ``positions`` are deleted."""
    ids = _check_ids(ids)
    probs = predict(model, [ids, erase(ids, positions)])
    y = int(probs[0].argmax())
    return ErasureResult(float(probs[0, y] - probs[1, y]), float(int(probs[1].argmax()) != y))


def _tvd(p: Tensor, q: Tensor) -> Tensor:
    return 0.5 * (p - q).abs().sum(dim=-1)


def _jsd(p: Tensor, q: Tensor) -> Tensor:
    """Jensen-Shannon divergence (nats) along the last axis; at most ln 2."""
    m = 0.5 * (p + q)

    def kl(a: Tensor, b: Tensor) -> Tensor:
        return torch.where(a > 0, a * (a.clamp_min(1e-30).log() - b.clamp_min(1e-30).log()), 0).sum(
            -1
        )

    return 0.5 * kl(p, m) + 0.5 * kl(q, m)


def _states_and_weights(model: AttentionClassifier, ids: Tensor) -> tuple[Tensor, Tensor]:
    mask = torch.ones(1, ids.numel(), dtype=torch.bool)
    with torch.no_grad():
        states = encode(model, model.embed(ids[None]), mask)
        return states, pooling_weights(model, states, mask)


def permutation_test(
    model: AttentionClassifier, ids: Tensor, *, permutations: int = 64, seed: int = 0
) -> float:
    """Median TVD of the output when the pooling weights are shuffled over the tokens (each of
    the ``r`` queries by one permutation; the encoder states are kept)."""
    ids = _check_ids(ids)
    states, weights = _states_and_weights(model, ids)
    generator = torch.Generator().manual_seed(seed)
    order = torch.stack(
        [torch.randperm(ids.numel(), generator=generator) for _ in range(permutations)]
    )
    shuffled = weights[0][:, order].transpose(0, 1)  # (P, r, n)
    with torch.no_grad():
        base = pooled_logits(model, states, weights).softmax(-1)  # (1, C)
        moved = pooled_logits(model, states.expand(permutations, -1, -1), shuffled).softmax(-1)
    return float(_tvd(moved, base).median())


def adversarial_attention(
    model: AttentionClassifier,
    ids: Tensor,
    *,
    epsilon: float = 0.01,
    steps: int = 100,
    restarts: int = 4,
    seed: int = 0,
) -> tuple[float, Tensor]:
    """Pooling weights as far as possible from the model's (JSD) with the output within
    ``TVD <= epsilon`` of the model's own (Jain & Wallace's adversarial attention).

    Gradient ascent on ``JSD(a', a) - 100 * max(0, TVD - epsilon)`` over the logits of ``a'``
    (Adam, ``steps`` steps, ``restarts`` starts: the first with the mass on the least attended
    tokens, the others random; encoder states fixed); the best feasible
    point is kept (the model's own weights, JSD 0, are always feasible).

    Returns:
        ``(jsd, weights)``: the divergence reached (nats, at most ln 2) and the weights
        ``(r, n)``.
    """
    ids = _check_ids(ids)
    states, weights = _states_and_weights(model, ids)
    with torch.no_grad():
        base = pooled_logits(model, states, weights).softmax(-1)
    generator = torch.Generator().manual_seed(seed)
    best_jsd, best = 0.0, weights[0]
    n, r = ids.numel(), weights.shape[1]
    for restart in range(restarts):
        if restart == 0:  # start with the mass on the least attended tokens: far, if allowed
            start = -10.0 * weights / weights.amax(dim=-1, keepdim=True)
        else:
            start = torch.randn(1, r, n, generator=generator) * 3
        logits = start.clone().requires_grad_(True)
        optimizer = torch.optim.Adam([logits], lr=0.3)
        for _ in range(steps):
            candidate = logits.softmax(dim=-1)  # (1, r, n)
            tvd = _tvd(pooled_logits(model, states, candidate).softmax(-1), base)[0]
            jsd = _jsd(candidate, weights).mean()
            with torch.no_grad():
                if float(tvd) <= epsilon and float(jsd) > best_jsd:
                    best_jsd, best = float(jsd), candidate[0].detach().clone()
            loss = -jsd + 100.0 * F.relu(tvd - epsilon)
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
    return best_jsd, best


# --- the report --------------------------------------------------------------------------------


@dataclass
class FaithfulnessReport:
    """Faithfulness of a classifier's attention over ``examples`` held-out texts.

    Attributes:
        examples: texts measured.
        mean_tokens: their mean length in tokens.
        methods: the importance scores computed (``rollout`` only for Transformer encoders).
        tau: ``{attention method: {reference method: (mean, std) of Kendall's tau-b}}``.
        erasure: ``{k: {"attention" | "random" | "leave_one_out" | "gradient": {"drop": mean
            p(y) drop, "flip": share of decisions flipped}}}`` over texts longer than ``k``.
        permutation_tvd: ``(median over texts, share of texts under 0.05)`` of the median TVD
            when the pooling weights are permuted.
        adversarial_jsd: ``(mean, share of texts above 0.5)`` of the JSD the adversary reaches
            with ``TVD <= epsilon``.
        epsilon: the adversary's output budget.
        accuracy: share of the texts the model classifies correctly (None without labels).
        per_example: the raw per-text values behind the summaries (for the plot).
    """

    examples: int
    mean_tokens: float
    methods: list[str]
    tau: dict[str, dict[str, tuple[float, float]]]
    erasure: dict[int, dict[str, dict[str, float]]]
    permutation_tvd: tuple[float, float]
    adversarial_jsd: tuple[float, float]
    epsilon: float
    accuracy: float | None = None
    per_example: dict[str, list[float]] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    def table(self, title: str = "") -> str:
        """The report as Markdown tables."""
        lines = [f"### {title}", ""] if title else []
        acc = f", accuracy {self.accuracy:.3f}" if self.accuracy is not None else ""
        lines += [
            f"{self.examples} held-out texts, {self.mean_tokens:.1f} tokens on average{acc}.",
            "",
            "Kendall tau-b (mean +- std over texts) of attention-based vs reference importance:",
            "",
            "| attention-based | " + " | ".join(REFERENCE_METHODS) + " |",
            "|---|" + "---|" * len(REFERENCE_METHODS),
        ]
        for method, row in self.tau.items():
            cells = [f"{row[ref][0]:+.3f} +- {row[ref][1]:.3f}" for ref in REFERENCE_METHODS]
            lines.append(f"| {method} | " + " | ".join(cells) + " |")
        kinds = list(next(iter(self.erasure.values())))
        lines += [
            "",
            "Deleting k tokens: mean drop of p(predicted class) / share of decisions flipped:",
            "",
            "| k | "
            + " | ".join(f"top-k {kind}" if kind != "random" else "k random" for kind in kinds)
            + " |",
            "|---|" + "---|" * len(kinds),
        ]
        for k, erased in self.erasure.items():
            cells = [f"{erased[kind]['drop']:.3f} / {erased[kind]['flip']:.2f}" for kind in kinds]
            lines.append(f"| {k} | " + " | ".join(cells) + " |")
        tvd, tvd_small = self.permutation_tvd
        jsd, jsd_big = self.adversarial_jsd
        lines += [
            "",
            f"Permuted pooling weights: median output TVD {tvd:.3f}; {tvd_small:.0%} of texts "
            "under 0.05.",
            f"Adversarial pooling weights (output TVD <= {self.epsilon}): mean JSD from the "
            f"model's {jsd:.3f} (max ln 2 = 0.693); {jsd_big:.0%} of texts above 0.5.",
        ]
        return "\n".join(lines) + "\n"

    def figure(self, title: str = "") -> Any:
        """Two panels: erasure curves (p(y) drop vs k) and the adversarial JSD histogram."""
        import matplotlib

        matplotlib.use("Agg")
        from matplotlib.figure import Figure

        fig = Figure(figsize=(9.5, 3.6), layout="constrained")
        left, right = fig.subplots(1, 2)
        ks = list(self.erasure)
        for kind in next(iter(self.erasure.values())):
            label = "k random" if kind == "random" else f"top-k by {kind}"
            left.plot(ks, [self.erasure[k][kind]["drop"] for k in ks], marker="o", label=label)
        left.set_xlabel("tokens deleted, k")
        left.set_ylabel("mean drop of p(predicted class)")
        left.set_xticks(ks)
        left.legend(fontsize=8)
        left.set_title("erasure", fontsize=10)
        right.hist(
            self.per_example["adversarial_jsd"], bins=20, range=(0, math.log(2)), color="#e6550d"
        )
        right.set_xlabel(f"JSD of adversarial pooling weights (output TVD <= {self.epsilon})")
        right.set_ylabel("texts")
        right.set_title("Jain-Wallace adversarial attention", fontsize=10)
        if title:
            fig.suptitle(title, fontsize=11)
        return fig


def _mean_std(values: Sequence[float]) -> tuple[float, float]:
    t = torch.tensor(list(values), dtype=torch.float64)
    return float(t.mean()), float(t.std(unbiased=False)) if t.numel() > 1 else 0.0


def faithfulness_report(
    model: AttentionClassifier,
    texts: Sequence[Tensor],
    labels: Sequence[int] | None = None,
    *,
    ks: Sequence[int] = (1, 2, 3, 5),
    epsilon: float = 0.01,
    random_draws: int = 5,
    adversary_steps: int = 100,
    seed: int = 0,
    progress: Callable[[int, int], None] | None = None,
) -> FaithfulnessReport:
    """Every measurement of the module docstring over ``texts`` (each ``(n,)`` ids, no padding).

    Args:
        model: the classifier (put in eval mode here).
        texts: token ids of held-out texts.
        labels: their class indices, for the accuracy line (optional).
        ks: numbers of tokens deleted in the erasure test.
        epsilon: the adversary's output budget (TVD).
        random_draws: random k-subsets averaged per text.
        adversary_steps: Adam steps per restart of the adversary.
        seed: of the random subsets, permutations and adversary starts.
        progress: called with ``(done, total)`` after each text.

    Raises:
        TypeError: ``model`` is not an AttentionClassifier.
        ValueError: no texts, or a text that is not ``(n,)`` real token ids.
    """
    if not isinstance(model, AttentionClassifier):
        raise TypeError(f"model must be an AttentionClassifier, got {type(model).__name__}")
    if not texts:
        raise ValueError("texts is empty: nothing to measure")
    model.eval()
    methods = [m for m in IMPORTANCE if m != "rollout" or model.config.encoder == "transformer"]
    attention_methods = [m for m in ATTENTION_METHODS if m in methods]
    taus: dict[str, dict[str, list[float]]] = {
        a: {r: [] for r in REFERENCE_METHODS} for a in attention_methods
    }
    kinds = ("attention", "random", "leave_one_out", "gradient")
    erasure: dict[int, dict[str, list[ErasureResult]]] = {k: {c: [] for c in kinds} for k in ks}
    permuted, adversarial, correct = [], [], []
    generator = torch.Generator().manual_seed(seed)
    for index, raw in enumerate(texts):
        ids = _check_ids(raw)
        scores = {m: IMPORTANCE[m](model, ids).float() for m in methods}
        for a in attention_methods:
            for r in REFERENCE_METHODS:
                taus[a][r].append(kendall_tau(scores[a], scores[r]))
        n = ids.numel()
        for k in ks:
            if n <= k:
                continue
            for kind in ("attention", "leave_one_out", "gradient"):
                erasure[k][kind].append(erasure_test(model, ids, scores[kind].topk(k).indices))
            draws = [
                erasure_test(model, ids, torch.randperm(n, generator=generator)[:k])
                for _ in range(random_draws)
            ]
            erasure[k]["random"].append(
                ErasureResult(
                    sum(d.drop for d in draws) / len(draws),
                    sum(d.flipped for d in draws) / len(draws),
                )
            )
        permuted.append(permutation_test(model, ids, seed=seed + index))
        adversarial.append(
            adversarial_attention(
                model, ids, epsilon=epsilon, steps=adversary_steps, seed=seed + index
            )[0]
        )
        if labels is not None:
            correct.append(float(_predicted(model, ids) == int(labels[index])))
        if progress is not None:
            progress(index + 1, len(texts))

    summary = {
        k: {
            kind: {
                "drop": sum(r.drop for r in rows[kind]) / max(1, len(rows[kind])),
                "flip": sum(r.flipped for r in rows[kind]) / max(1, len(rows[kind])),
                "texts": float(len(rows[kind])),
            }
            for kind in kinds
        }
        for k, rows in erasure.items()
    }
    perm = torch.tensor(permuted)
    adv = torch.tensor(adversarial)
    return FaithfulnessReport(
        examples=len(texts),
        mean_tokens=sum(int(t.numel()) for t in texts) / len(texts),
        methods=methods,
        tau={a: {r: _mean_std(v) for r, v in row.items()} for a, row in taus.items()},
        erasure=summary,
        permutation_tvd=(float(perm.median()), float((perm < 0.05).double().mean())),
        adversarial_jsd=(float(adv.mean()), float((adv > 0.5).double().mean())),
        epsilon=epsilon,
        accuracy=sum(correct) / len(correct) if correct else None,
        per_example={"permutation_tvd": permuted, "adversarial_jsd": adversarial},
    )
