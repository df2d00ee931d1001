"""qkv.viz figures: right axes, right pixels, valid image files. Skipped without matplotlib."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

pytest.importorskip("matplotlib")

from qkv import masks
from qkv.viz import (
    attention_heatmap,
    head_grid,
    head_stats,
    head_stats_figure,
    mask_grid,
    mask_picture,
    save_figure,
)

PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"


def random_weights(*shape: int, seed: int = 0) -> torch.Tensor:
    generator = torch.Generator().manual_seed(seed)
    return torch.randn(*shape, generator=generator).mul(2).softmax(dim=-1)


def image_data(fig: object, index: int = 0) -> torch.Tensor:
    """The array drawn by the first image of axes ``index``."""
    return torch.as_tensor(fig.axes[index].images[0].get_array().data)  # type: ignore[attr-defined]


def test_heatmap_draws_the_weights_with_token_labels(tmp_path: Path) -> None:
    weights = random_weights(3, 5, seed=1)
    source, target = ["le", "chat", "<s>", "noir", "."], ["the", "black", "cat"]
    fig = attention_heatmap(weights, source, target, title="cross-attention")
    assert len(fig.axes) == 2  # the map and its colour bar
    ax = fig.axes[0]
    assert [t.get_text() for t in ax.get_xticklabels()] == source
    assert [t.get_text() for t in ax.get_yticklabels()] == target
    assert ax.get_title() == "cross-attention"
    torch.testing.assert_close(image_data(fig).float(), weights)
    path = save_figure(fig, tmp_path / "map.png")
    assert path.read_bytes().startswith(PNG_SIGNATURE)


def test_heatmap_without_tokens_numbers_positions() -> None:
    fig = attention_heatmap(random_weights(2, 4, seed=2))
    assert [t.get_text() for t in fig.axes[0].get_xticklabels()] == ["0", "1", "2", "3"]


def test_heatmap_takes_half_precision_weights_that_need_grad() -> None:
    weights = random_weights(3, 4, seed=6).to(torch.bfloat16).requires_grad_()
    fig = attention_heatmap(weights, x_label="input token", y_label="output position")
    torch.testing.assert_close(image_data(fig).float(), weights.detach().float())
    assert fig.axes[0].get_xlabel() == "input token"


def test_heatmap_thins_labels_on_long_sequences() -> None:
    fig = attention_heatmap(random_weights(5, 150, seed=7), [f"w{i}" for i in range(150)])
    labels = [t.get_text() for t in fig.axes[0].get_xticklabels()]
    assert labels == [f"w{i}" for i in range(0, 150, 3)]  # at most 60 labels
    assert image_data(fig).shape == (5, 150)


@pytest.mark.parametrize(("heads", "columns", "rows"), [(6, 4, 2), (3, 4, 1), (1, 2, 1)])
def test_head_grid_has_one_axes_per_head(heads: int, columns: int, rows: int) -> None:
    weights = random_weights(heads, 4, 5, seed=heads)
    fig = head_grid(weights, columns=columns, title="layer 0")
    assert len(fig.axes) == heads + 1  # plus the shared colour bar
    assert fig.axes[0].get_subplotspec().get_gridspec().get_geometry() == (
        rows,
        min(columns, heads),
    )
    torch.testing.assert_close(image_data(fig, heads - 1).float(), weights[heads - 1])
    assert fig.axes[heads - 1].get_title() == f"head {heads - 1}"


def test_mask_picture_of_causal_alignments() -> None:
    top_left = mask_picture(masks.causal(), 2, 5)
    bottom_right = mask_picture(masks.causal_bottom_right(2, 5), 2, 5)
    assert len(top_left.axes) == 1
    expected_top_left = torch.tensor([[1, 0, 0, 0, 0], [1, 1, 0, 0, 0]], dtype=torch.float32)
    expected_bottom_right = torch.tensor([[1, 1, 1, 1, 0], [1, 1, 1, 1, 1]], dtype=torch.float32)
    torch.testing.assert_close(image_data(top_left).float(), expected_top_left)
    torch.testing.assert_close(image_data(bottom_right).float(), expected_bottom_right)
    assert bottom_right.axes[0].get_title() == "causal(offset=3)"


def test_mask_picture_of_a_bool_tensor_and_a_plain_function() -> None:
    mask = torch.rand(1, 1, 4, 6, generator=torch.Generator().manual_seed(3)) > 0.5
    fig = mask_picture(mask, 4, 6, title="random")
    torch.testing.assert_close(image_data(fig), mask[0, 0].float())

    def even_keys(
        b: torch.Tensor, h: torch.Tensor, q: torch.Tensor, kv: torch.Tensor
    ) -> torch.Tensor:
        # The layout qkv.attention hands a mask function: four broadcastable 4-d index tensors.
        if (b.ndim, h.ndim, q.shape, kv.shape) != (4, 4, (1, 1, 3, 1), (1, 1, 1, 4)):
            raise AssertionError(f"unexpected index shapes {q.shape} {kv.shape}")
        return kv % 2 == 0

    even = image_data(mask_picture(even_keys, 3, 4))
    torch.testing.assert_close(even, torch.tensor([[1.0, 0.0, 1.0, 0.0]] * 3))


def test_mask_grid_draws_every_mask(tmp_path: Path) -> None:
    ids = torch.tensor([0, 0, 0, 1, 1, 2, 2, 2])
    fig = mask_grid(
        {
            "causal": masks.causal(),
            "window 2": masks.sliding_window(2),
            "documents": masks.document(ids),
        },
        8,
        8,
    )
    assert [ax.get_title() for ax in fig.axes] == ["causal", "window 2", "documents"]
    documents = image_data(fig, 2).bool()
    torch.testing.assert_close(documents, ids.view(-1, 1) == ids.view(1, -1))
    assert save_figure(fig, tmp_path / "masks.svg").read_text().lstrip().startswith("<?xml")


@pytest.mark.parametrize(
    ("mask", "nq", "nk", "error", "message"),
    [
        (torch.ones(3, 3), 3, 3, TypeError, "bool tensor"),
        (torch.ones(2, 3, dtype=torch.bool), 3, 3, ValueError, "does not broadcast"),
        (masks.causal(), 0, 3, ValueError, "num_queries"),
        ("causal", 3, 3, TypeError, "mask function"),
    ],
)
def test_mask_picture_rejects_bad_input(
    mask: object, nq: int, nk: int, error: type[Exception], message: str
) -> None:
    with pytest.raises(error, match=message):
        mask_picture(mask, nq, nk)


def test_head_stats_figures(tmp_path: Path) -> None:
    stats = [head_stats(random_weights(2, 4, 6, 6, seed=s)) for s in range(3)]
    bars = head_stats_figure(stats[0])
    assert len(bars.axes) == 5
    heights = [patch.get_height() for patch in bars.axes[0].patches]
    torch.testing.assert_close(torch.tensor(heights), stats[0].entropy.mean(dim=0).double())
    maps = head_stats_figure(stats, title="3 layers")
    assert len(maps.axes) == 10  # five maps and their colour bars
    assert image_data(maps).shape == (3, 4)
    assert save_figure(maps, tmp_path / "stats.png").read_bytes().startswith(PNG_SIGNATURE)
    with pytest.raises(ValueError, match="same head count"):
        head_stats_figure([stats[0], head_stats(random_weights(1, 2, 3, 3))])


def test_figure_argument_errors(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match=r"\(Nt, Ns\)"):
        attention_heatmap(random_weights(2, 3, 4))
    with pytest.raises(ValueError, match="target_tokens has 1 tokens"):
        attention_heatmap(random_weights(2, 3), ["a", "b", "c"], ["x"])
    with pytest.raises(ValueError, match="columns"):
        head_grid(random_weights(2, 3, 3), columns=0)
    with pytest.raises(ValueError, match="suffix"):
        save_figure(attention_heatmap(random_weights(2, 3)), tmp_path / "noext")
