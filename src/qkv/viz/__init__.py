"""See inside attention: heat maps, per-head grids, mask pictures, rollout, per-head
statistics, shaded tokens (terminal and HTML) and an offline interactive page.

Everything here takes tensors (and lists of token strings) and returns a value: a
``matplotlib.figure.Figure``, a tensor, a dataclass or a string. Nothing prints or shows a
window. matplotlib is imported only by the figure functions, when called (``pip install -e
'.[viz]'``); rollout, statistics, shading and the page need only torch.

Notation: ``B`` batch, ``H`` heads, ``Nq``/``Nk`` query/key positions (``Nt``/``Ns`` target and
source tokens for cross-attention), ``N`` when they are equal.
"""

from qkv.viz.figures import (
    attention_heatmap,
    head_grid,
    head_stats_figure,
    mask_grid,
    mask_picture,
    save_figure,
)
from qkv.viz.page import AttentionRows, attention_page, weights_from_qk, write_page
from qkv.viz.pretrained import PretrainedPictures, attention_summary, encoder_pictures
from qkv.viz.rollout import attention_rollout
from qkv.viz.shading import html_document, shade_tokens_ansi, shade_tokens_html
from qkv.viz.stats import HeadStats, head_stats

__all__ = [
    "AttentionRows",
    "HeadStats",
    "PretrainedPictures",
    "attention_heatmap",
    "attention_page",
    "attention_rollout",
    "attention_summary",
    "encoder_pictures",
    "head_grid",
    "head_stats",
    "head_stats_figure",
    "html_document",
    "mask_grid",
    "mask_picture",
    "save_figure",
    "shade_tokens_ansi",
    "shade_tokens_html",
    "weights_from_qk",
    "write_page",
]
