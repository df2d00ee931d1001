"""An offline, interactive page of attention weights that scales to 10,000 tokens and more.

One HTML file, nothing fetched: inline CSS, about 250 lines of plain JavaScript, and the weights
as a compact binary payload (base64 inside a JSON ``<script>`` element). For each layer and each
map (the mean of the heads first, then every head) the page stores:

- an **overview**: the ``(Nq, Nk)`` map averaged over blocks of rows and columns down to at most
  ``max_cells x max_cells`` cells (block *mean*, so a downsampled row keeps the row's mass), each
  cell quantized to ``uint8`` against the map's largest cell. With ``Nq, Nk <= max_cells`` it is
  the map itself, to 1/255 of its maximum;
- the **top-k of every row**: the ``top_k`` largest weights of each query row, exact key
  positions (``uint16``, or ``uint32`` above 65,535 keys) and their weights as ``float16``.

Nothing else: one head of a 10,000-token sequence has 10^8 weights, too many to embed, so the
page shows the whole map zoomed out on a canvas, and on hover the exact top-k of the row under
the pointer and, for the column, every row whose top-k holds that key. Weights outside a row's
top-k are known only through the overview. Layers can be given as tensors or, for long inputs,
as queries and keys (:func:`weights_from_qk`), whose probabilities are computed a block of rows
at a time with :func:`qkv.attention_weights` and never held whole.

Token text reaches the page only as JSON data (``<``, ``>``, ``&`` escaped) and is drawn with
``fillText`` or inserted with ``textContent``, never as markup, so a token like ``<script>`` is
shown, not run.
"""

from __future__ import annotations

import base64
import html
import json
import os
import sys
from array import array
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Protocol

import torch
from torch import Tensor

from qkv.viz._checks import as_weights, check_nonnegative, token_labels, write_atomically

__all__ = ["AttentionRows", "attention_page", "weights_from_qk", "write_page"]

#: Default overview resolution: 512 x 512 cells, 256 KiB per map before base64.
MAX_CELLS = 512
#: Default number of exact weights kept per query row.
TOP_K = 8
# Rows are encoded in blocks of about this many weights (all heads together): 64 MiB of float32.
_BLOCK_WEIGHTS = 1 << 24


class AttentionRows(Protocol):
    """Attention probabilities of one layer, readable a block of query rows at a time.

    Attributes:
        num_heads: ``H``.
        q_len: ``Nq``.
        kv_len: ``Nk``.
    """

    @property
    def num_heads(self) -> int: ...

    @property
    def q_len(self) -> int: ...

    @property
    def kv_len(self) -> int: ...

    def rows(self, start: int, stop: int) -> Tensor:
        """``(H, stop - start, Nk)`` probabilities of query rows ``start .. stop - 1``."""
        ...


@dataclass
class _TensorRows:
    """An ``(H, Nq, Nk)`` tensor seen as :class:`AttentionRows`."""

    weights: Tensor

    @property
    def num_heads(self) -> int:
        return int(self.weights.shape[0])

    @property
    def q_len(self) -> int:
        return int(self.weights.shape[1])

    @property
    def kv_len(self) -> int:
        return int(self.weights.shape[2])

    def rows(self, start: int, stop: int) -> Tensor:
        return self.weights[:, start:stop]


@dataclass
class _QueryKeyRows:
    """Probabilities of ``softmax(q k^T * scale + bias)`` computed on demand, a block at a time."""

    q: Tensor  # (1, H, Nq, D)
    k: Tensor  # (1, Hkv, Nk, D)
    causal: bool
    scale: float | None

    @property
    def num_heads(self) -> int:
        return int(self.q.shape[1])

    @property
    def q_len(self) -> int:
        return int(self.q.shape[2])

    @property
    def kv_len(self) -> int:
        return int(self.k.shape[2])

    def rows(self, start: int, stop: int) -> Tensor:
        # softmax(q k^T * scale) for the rows asked, as qkv.attention_weights gives them (a test
        # checks the two agree), in one pass: its two-pass log-sum-exp is not needed here.
        q = self.q[0, :, start:stop].float()  # (H, R, D)
        k = self.k[0].float()  # (Hkv, Nk, D)
        k = k.repeat_interleave(q.shape[0] // k.shape[0], dim=0)  # (H, Nk, D)
        scale = self.scale if self.scale is not None else q.shape[-1] ** -0.5
        scores = q @ k.transpose(1, 2) * scale  # (H, R, Nk)
        if self.causal:
            later = torch.arange(self.kv_len) > torch.arange(start, stop).view(-1, 1)
            scores.masked_fill_(later, float("-inf"))
        return scores.softmax(dim=-1)


def weights_from_qk(
    q: Tensor, k: Tensor, *, causal: bool = False, scale: float | None = None
) -> AttentionRows:
    """A layer for :func:`attention_page` given by its queries and keys, for long inputs.

    The page builder asks for a block of query rows at a time, so an ``Nq x Nk`` map is never
    held whole (10,000 tokens x 4 heads would be 1.6 GB of float32).

    Args:
        q: ``(1, H, Nq, D)`` or ``(H, Nq, D)`` queries of one example.
        k: ``(1, Hkv, Nk, D)`` or ``(Hkv, Nk, D)`` keys (``H`` divisible by ``Hkv``).
        causal: mask keys after each query (top-left aligned, as :func:`qkv.attention`).
        scale: score scale; default ``1/sqrt(D)``.

    Raises:
        TypeError: ``q`` or ``k`` is not a floating-point tensor.
        ValueError: wrong ranks, or a batch of more than one example.
    """
    batched = []
    for name, t in (("q", q), ("k", k)):
        if not isinstance(t, Tensor) or not t.dtype.is_floating_point:
            raise TypeError(f"{name} must be a floating-point torch.Tensor; got {type(t).__name__}")
        if t.ndim == 3:
            t = t.unsqueeze(0)
        if t.ndim != 4 or t.shape[0] != 1:
            raise ValueError(
                f"{name} must be (1, H, N, D) or (H, N, D), one example; got {tuple(t.shape)}"
            )
        batched.append(t.detach())
    if batched[0].shape[-1] != batched[1].shape[-1] or batched[0].shape[1] % batched[1].shape[1]:
        raise ValueError(
            f"q {tuple(q.shape)} and k {tuple(k.shape)} need the same D and H divisible by Hkv"
        )
    return _QueryKeyRows(batched[0], batched[1], causal, scale)


def _as_rows(layer: object, name: str) -> AttentionRows:
    if isinstance(layer, Tensor):
        values = as_weights(layer, name, 3, "(H, Nq, Nk)")
        check_nonnegative(values, name)
        return _TensorRows(values)
    if all(hasattr(layer, a) for a in ("num_heads", "q_len", "kv_len", "rows")):
        return layer  # type: ignore[return-value]
    raise TypeError(
        f"{name} must be an (H, Nq, Nk) tensor or qkv.viz.weights_from_qk(q, k); "
        f"got {type(layer).__name__}"
    )


def _blocks(length: int, cells: int) -> tuple[int, int]:
    """``(size, count)``: ``length`` positions in ``count <= cells`` blocks of ``size`` positions
    (the last one possibly shorter), so a block sum is a reshape, not a scatter."""
    size = -(-length // cells)
    return size, -(-length // size)


def _block_sums(part: Tensor, size: int, count: int) -> Tensor:
    """Sums of ``part (..., N)`` over consecutive blocks of ``size`` along the last axis."""
    n = part.shape[-1]
    if size == 1:
        return part
    full = n // size
    sums = part[..., : full * size].unflatten(-1, (full, size)).sum(dim=-1)
    if count > full:  # the short last block
        sums = torch.cat([sums, part[..., full * size :].sum(dim=-1, keepdim=True)], dim=-1)
    return sums


def _b64(tensor: Tensor, code: str) -> str:
    """``tensor``'s values packed little-endian with the ``array`` type ``code`` (``"B"``,
    ``"H"``, ``"I"``, ``"h"``), base64. (No numpy: the page needs only torch.)"""
    packed = array(code, tensor.flatten().tolist())
    if sys.byteorder == "big":
        packed.byteswap()
    return base64.b64encode(packed.tobytes()).decode("ascii")


def _encode_layer(rows: AttentionRows, top_k: int, max_cells: int) -> list[dict[str, object]]:
    """The page's maps of one layer: the head mean (when ``H > 1``) and every head."""
    heads, nq, nk = rows.num_heads, rows.q_len, rows.kv_len
    maps = heads + (1 if heads > 1 else 0)
    k = min(top_k, nk)
    row_size, row_count = _blocks(nq, max_cells)
    col_size, col_count = _blocks(nk, max_cells)
    overview = torch.zeros(maps, row_count, col_count, dtype=torch.float64)
    top_index = torch.zeros(maps, nq, k, dtype=torch.int64)
    top_value = torch.zeros(maps, nq, k, dtype=torch.float32)
    block = max(1, _BLOCK_WEIGHTS // max(1, maps * nk))
    for start in range(0, nq, block):
        stop = min(nq, start + block)
        part = rows.rows(start, stop).detach().to("cpu", torch.float32)  # (H, R, Nk)
        if tuple(part.shape) != (heads, stop - start, nk):
            raise ValueError(
                f"rows({start}, {stop}) gave shape {tuple(part.shape)}, "
                f"expected {(heads, stop - start, nk)}"
            )
        if heads > 1:
            part = torch.cat([part.mean(dim=0, keepdim=True), part])  # (maps, R, Nk)
        values, index = part.topk(k, dim=-1)
        top_index[:, start:stop] = index
        top_value[:, start:stop] = values
        by_column = _block_sums(part, col_size, col_count).double()  # (maps, R, col_count)
        overview.index_add_(1, torch.arange(start, stop) // row_size, by_column)
    row_counts = torch.bincount(torch.arange(nq) // row_size, minlength=row_count)
    col_counts = torch.bincount(torch.arange(nk) // col_size, minlength=col_count)
    overview /= row_counts.view(1, -1, 1) * col_counts.view(1, 1, -1)
    index_code = "I" if nk > 65535 else "H"
    out = []
    for m in range(maps):
        top = float(overview[m].max())
        levels = (overview[m] / top * 255).round() if top > 0 else overview[m] * 0
        label = f"mean of {heads} heads" if heads > 1 and m == 0 else f"head {m - (maps - heads)}"
        out.append(
            {
                "label": label,
                "scale": top,
                "map": _b64(levels.to(torch.uint8), "B"),
                "index": _b64(top_index[m], index_code),
                # float16 bit patterns, which the page decodes itself (no Float16Array needed).
                "value": _b64(top_value[m].to(torch.float16).view(torch.int16), "h"),
            }
        )
    return out


def _page_data(
    layers: Mapping[str, Tensor | AttentionRows],
    source_tokens: Sequence[str] | None,
    target_tokens: Sequence[str] | None,
    top_k: int,
    max_cells: int,
) -> dict[str, object]:
    if not isinstance(layers, Mapping) or not layers:
        raise ValueError("layers must be a non-empty mapping of name -> (H, Nq, Nk) weights")
    for name, value in (("top_k", top_k), ("max_cells", max_cells)):
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise ValueError(f"{name} must be a positive int; got {value!r}")
    sources: dict[str, AttentionRows] = {}
    for name, layer in layers.items():
        if not isinstance(name, str):
            raise TypeError(f"layers keys must be str layer names; got {name!r}")
        sources[name] = _as_rows(layer, f"layers[{name!r}]")
    shapes = {name: (r.q_len, r.kv_len) for name, r in sources.items()}
    if len(set(shapes.values())) != 1:
        raise ValueError(f"every layer needs the same (Nq, Nk); got {shapes}")
    nq, nk = next(iter(shapes.values()))
    source = token_labels(source_tokens, nk, "source_tokens")
    target = token_labels(target_tokens, nq, "target_tokens")
    return {
        "nq": nq,
        "nk": nk,
        "topK": min(top_k, nk),
        "bins": [_blocks(nq, max_cells)[1], _blocks(nk, max_cells)[1]],
        "blockSize": [_blocks(nq, max_cells)[0], _blocks(nk, max_cells)[0]],
        "indexBytes": 4 if nk > 65535 else 2,
        "source": source,
        "target": target,
        "layers": [
            {"name": name, "heads": rows.num_heads, "maps": _encode_layer(rows, top_k, max_cells)}
            for name, rows in sources.items()
        ],
    }


def _script_json(data: object) -> str:
    """JSON safe inside ``<script>``: ``<``, ``>`` and ``&`` as ``\\u`` escapes, so no token can
    close the element (``</script>``) or open a comment."""
    text = json.dumps(data, ensure_ascii=True, separators=(",", ":"))
    return text.replace("<", "\\u003c").replace(">", "\\u003e").replace("&", "\\u0026")


def attention_page(
    layers: Mapping[str, Tensor | AttentionRows],
    source_tokens: Sequence[str] | None = None,
    target_tokens: Sequence[str] | None = None,
    *,
    title: str = "qkv attention",
    top_k: int = TOP_K,
    max_cells: int = MAX_CELLS,
) -> str:
    """A self-contained interactive HTML page of attention weights (see the module docstring).

    Args:
        layers: layer name -> ``(H, Nq, Nk)`` attention probabilities of one example, or
            :func:`weights_from_qk` for long inputs, in the order the layer menu lists them
            (e.g. ``{"encoder 0": ..., "cross 0": ...}``). Head counts may differ; every layer
            needs the same ``Nq`` and ``Nk``.
        source_tokens: ``Nk`` key-side tokens (default: positions).
        target_tokens: ``Nq`` query-side tokens (default: positions); pass the source tokens
            again for self-attention.
        title: page title and heading.
        top_k: exact weights kept per query row.
        max_cells: the overview has at most ``max_cells`` rows and columns.

    Returns:
        The page as one string (HTML with inline CSS, JavaScript and data).

    Raises:
        TypeError, ValueError: bad layers (naming the layer), token counts or sizes.
    """
    data = _page_data(layers, source_tokens, target_tokens, top_k, max_cells)
    return (
        _TEMPLATE.replace("@TITLE@", html.escape(title))
        .replace("@STYLE@", _STYLE)
        .replace("@SCRIPT@", _SCRIPT)
        .replace("@DATA@", _script_json(data))
    )


def write_page(
    path: str | os.PathLike[str],
    layers: Mapping[str, Tensor | AttentionRows],
    source_tokens: Sequence[str] | None = None,
    target_tokens: Sequence[str] | None = None,
    *,
    title: str = "qkv attention",
    top_k: int = TOP_K,
    max_cells: int = MAX_CELLS,
) -> Path:
    """Write :func:`attention_page` to ``path`` (atomically, UTF-8). Returns the path."""
    page = attention_page(
        layers, source_tokens, target_tokens, title=title, top_k=top_k, max_cells=max_cells
    )
    return write_atomically(path, page.encode("utf-8"))


_TEMPLATE = """<!DOCTYPE html>
<html lang="en">
<head>
<meta charset="utf-8">
<meta name="generator" content="qkv">
<title>@TITLE@</title>
<style>@STYLE@</style>
<script>
window.qkvErrors = [];
window.addEventListener("error", function (e) {
  window.qkvErrors.push(String(e.message));
  document.documentElement.setAttribute("data-qkv-errors", JSON.stringify(window.qkvErrors));
});
</script>
</head>
<body>
<h1>@TITLE@</h1>
<div class="controls">
  <label>layer <select id="layer"></select></label>
  <label>head <select id="head"></select></label>
  <label>colour <select id="gamma"><option value="0.5">sqrt (faint weights show)</option><option value="1">linear</option></select></label>
  <span id="size"></span>
</div>
<div class="view">
  <canvas id="map" width="700" height="700"></canvas>
  <div class="side">
    <div id="status">hover the map: a row is a target (query) token, a column a source (key)</div>
    <h2>row: the keys this query attends to (top-k, exact)</h2>
    <canvas id="row-strip" width="420" height="36"></canvas>
    <ol id="row-list"></ol>
    <h2>column: the queries that attend to this key (rows whose top-k holds it)</h2>
    <canvas id="col-strip" width="420" height="36"></canvas>
    <ol id="col-list"></ol>
  </div>
</div>
<script type="application/json" id="qkv-data">@DATA@</script>
<script>@SCRIPT@</script>
</body>
</html>
"""

_STYLE = """
body { font-family: sans-serif; margin: 1.2em; }
h1 { font-size: 1.3em; margin: 0 0 0.5em 0; }
h2 { font-size: 0.9em; font-weight: normal; color: #555; margin: 1em 0 0.3em 0; }
.controls { margin-bottom: 0.8em; }
.controls label { margin-right: 1.5em; }
#size { color: #777; font-size: 0.9em; }
.view { display: flex; gap: 1.5em; align-items: flex-start; }
#map { border: 1px solid #ccc; cursor: crosshair; }
.side { width: 430px; }
#status { font-family: monospace; font-size: 0.9em; min-height: 2.6em; }
ol { font-family: monospace; font-size: 0.85em; margin: 0; padding-left: 2.2em; }
canvas.strip, #row-strip, #col-strip { border: 1px solid #ddd; }
"""

# Plain JavaScript, no libraries. Tokens are drawn with fillText or set with textContent only.
_SCRIPT = """
(function () {
  "use strict";
  var started = performance.now();
  var data = JSON.parse(document.getElementById("qkv-data").textContent);
  var layerMenu = document.getElementById("layer");
  var headMenu = document.getElementById("head");
  var gammaMenu = document.getElementById("gamma");
  var canvas = document.getElementById("map");
  var ctx = canvas.getContext("2d");
  var status = document.getElementById("status");
  var rowStrip = document.getElementById("row-strip");
  var colStrip = document.getElementById("col-strip");
  var rowList = document.getElementById("row-list");
  var colList = document.getElementById("col-list");
  var nq = data.nq, nk = data.nk, k = data.topK, bq = data.bins[0], bk = data.bins[1];
  var labels = nq <= 80 && nk <= 80;  // token labels drawn beside the map
  var margin = labels ? 90 : 4;
  var cell = Math.min(600 / nk, 600 / nq, labels ? 40 : 600);
  var areaW = cell * nk, areaH = cell * nq;
  canvas.width = Math.ceil(areaW + margin + 4);
  canvas.height = Math.ceil(areaH + margin + 4);
  var decoded = {};
  var current = null;
  var image = document.createElement("canvas");
  image.width = bk; image.height = bq;

  function bytes(b64) {
    var text = atob(b64), out = new Uint8Array(text.length);
    for (var i = 0; i < text.length; i++) { out[i] = text.charCodeAt(i); }
    return out;
  }

  function half(bits) {  // IEEE float16 -> number
    var sign = bits & 0x8000 ? -1 : 1, exp = (bits >> 10) & 0x1f, frac = bits & 0x3ff;
    if (exp === 0) { return sign * frac * Math.pow(2, -24); }
    if (exp === 31) { return frac ? NaN : sign * Infinity; }
    return sign * (1 + frac / 1024) * Math.pow(2, exp - 15);
  }

  function decode(layer, m) {
    var key = layer + ":" + m;
    if (decoded[key]) { return decoded[key]; }
    var entry = data.layers[layer].maps[m];
    var raw = bytes(entry.value), bits = new Uint16Array(raw.buffer), values = new Float32Array(bits.length);
    for (var i = 0; i < bits.length; i++) { values[i] = half(bits[i]); }
    var indexRaw = bytes(entry.index);
    var index = data.indexBytes === 4 ? new Uint32Array(indexRaw.buffer) : new Uint16Array(indexRaw.buffer);
    decoded[key] = { map: bytes(entry.map), index: index, values: values, scale: entry.scale, label: entry.label };
    return decoded[key];
  }

  function colour(level) {  // white -> orange, as the other qkv pictures
    var t = Math.pow(level / 255, Number(gammaMenu.value));
    return [Math.round(255 - 25 * t), Math.round(255 - 170 * t), Math.round(255 - 242 * t)];
  }

  function paintImage() {
    var pixels = ctx.createImageData(bk, bq), d = pixels.data;
    for (var i = 0; i < bq * bk; i++) {
      var c = colour(current.map[i]);
      d[4 * i] = c[0]; d[4 * i + 1] = c[1]; d[4 * i + 2] = c[2]; d[4 * i + 3] = 255;
    }
    image.getContext("2d").putImageData(pixels, 0, 0);
  }

  function drawLabels() {
    ctx.fillStyle = "#333";
    ctx.font = Math.max(8, Math.min(13, cell * 0.8)) + "px sans-serif";
    ctx.textAlign = "right"; ctx.textBaseline = "middle";
    for (var i = 0; i < nq; i++) { ctx.fillText(data.target[i], margin - 4, margin + (i + 0.5) * cell); }
    for (var j = 0; j < nk; j++) {
      ctx.save();
      ctx.translate(margin + (j + 0.5) * cell, margin - 4);
      ctx.rotate(-Math.PI / 2);
      ctx.textAlign = "left";
      ctx.fillText(data.source[j], 0, 0);
      ctx.restore();
    }
  }

  function draw(row, col) {
    ctx.fillStyle = "#fff";
    ctx.fillRect(0, 0, canvas.width, canvas.height);
    ctx.imageSmoothingEnabled = false;
    ctx.drawImage(image, margin, margin, areaW, areaH);
    if (labels) { drawLabels(); }
    if (row !== null) {
      ctx.strokeStyle = "rgba(31,119,180,0.9)"; ctx.lineWidth = Math.max(1, Math.min(cell, 3));
      ctx.strokeRect(margin, margin + row * cell, areaW, Math.max(cell, 1));
      ctx.strokeRect(margin + col * cell, margin, Math.max(cell, 1), areaH);
    }
  }

  function strip(element, positions, weights, length) {
    var c = element.getContext("2d"), w = element.width, h = element.height;
    c.fillStyle = "#fafafa"; c.fillRect(0, 0, w, h);
    var top = 0;
    for (var i = 0; i < weights.length; i++) { top = Math.max(top, weights[i]); }
    c.fillStyle = "rgb(230,85,13)";
    for (var t = 0; t < positions.length; t++) {
      var x = Math.floor(positions[t] / length * w), bar = top > 0 ? weights[t] / top * (h - 2) : 0;
      c.fillRect(x, h - bar, Math.max(2, w / length), bar);
    }
  }

  function list(element, entries) {
    element.textContent = "";
    entries.forEach(function (e) {
      var li = document.createElement("li");
      li.textContent = e;
      element.appendChild(li);
    });
  }

  function rowTop(i) {
    var positions = [], weights = [];
    for (var t = 0; t < k; t++) { positions.push(current.index[i * k + t]); weights.push(current.values[i * k + t]); }
    return { positions: positions, weights: weights };
  }

  function columnTop(j) {  // rows whose top-k holds key j, heaviest first
    var hits = [];
    for (var i = 0; i < nq; i++) {
      for (var t = 0; t < k; t++) {
        if (current.index[i * k + t] === j) { hits.push([i, current.values[i * k + t]]); break; }
      }
    }
    hits.sort(function (a, b) { return b[1] - a[1]; });
    return hits;
  }

  function show(row, col) {
    draw(row, col);
    var top = rowTop(row);
    strip(rowStrip, top.positions, top.weights, nk);
    list(rowList, top.positions.map(function (p, t) {
      return top.weights[t].toFixed(4) + "  " + p + " " + JSON.stringify(data.source[p]);
    }));
    var hits = columnTop(col);
    strip(colStrip, hits.map(function (h) { return h[0]; }), hits.map(function (h) { return h[1]; }), nq);
    list(colList, hits.slice(0, 12).map(function (h) {
      return h[1].toFixed(4) + "  " + h[0] + " " + JSON.stringify(data.target[h[0]]);
    }).concat(hits.length > 12 ? ["... " + (hits.length - 12) + " more rows"] : []));
    var exact = top.positions.indexOf(col);
    var rb = Math.floor(row / data.blockSize[0]), cb = Math.floor(col / data.blockSize[1]);
    var block = current.map[rb * bk + cb] / 255 * current.scale;
    status.textContent = "target " + row + " " + JSON.stringify(data.target[row]) + " -> source " + col + " " +
      JSON.stringify(data.source[col]) + ": " + (exact >= 0 ? top.weights[exact].toFixed(4) + " (exact)" :
      "not in the row's top " + k + "; block mean " + block.toPrecision(3));
  }

  function select() {
    current = decode(Number(layerMenu.value), Number(headMenu.value));
    paintImage();
    draw(null, null);
  }

  function fillHeads() {
    var maps = data.layers[Number(layerMenu.value)].maps;
    var keep = headMenu.selectedIndex;
    headMenu.textContent = "";
    maps.forEach(function (entry, m) {
      var o = document.createElement("option");
      o.value = String(m);
      o.textContent = entry.label;
      headMenu.appendChild(o);
    });
    // The first entry (the head mean) unless the previous choice exists in this layer too.
    headMenu.selectedIndex = keep > 0 && keep < maps.length ? keep : 0;
  }

  function pointer(event) {
    var box = canvas.getBoundingClientRect();
    var x = (event.clientX - box.left) * canvas.width / box.width - margin;
    var y = (event.clientY - box.top) * canvas.height / box.height - margin;
    if (x < 0 || y < 0 || x >= areaW || y >= areaH) { return null; }
    return [Math.min(nq - 1, Math.floor(y / cell)), Math.min(nk - 1, Math.floor(x / cell))];
  }

  data.layers.forEach(function (layer, index) {
    var o = document.createElement("option");
    o.value = String(index);
    o.textContent = layer.name;
    layerMenu.appendChild(o);
  });
  layerMenu.selectedIndex = 0;
  layerMenu.addEventListener("change", function () { fillHeads(); select(); });
  headMenu.addEventListener("change", select);
  gammaMenu.addEventListener("change", function () { paintImage(); draw(null, null); });
  canvas.addEventListener("mousemove", function (event) {
    var at = pointer(event);
    if (at) { show(at[0], at[1]); }
  });
  document.getElementById("size").textContent = nq + " x " + nk + " tokens; overview " + bq + " x " + bk +
    " cells" + (bq < nq || bk < nk ? " (block means)" : "") + ", top " + k + " per row";
  fillHeads();
  select();
  // #row=I&col=J (and optionally layer=L&head=M) shows that hover at load, for screenshots and tests.
  var query = {};
  location.hash.replace(/^#/, "").split("&").forEach(function (part) {
    var kv = part.split("=");
    if (kv.length === 2) { query[kv[0]] = Number(kv[1]); }
  });
  if ("layer" in query) { layerMenu.selectedIndex = query.layer; fillHeads(); select(); }
  if ("head" in query) { headMenu.selectedIndex = query.head; select(); }
  if ("linear" in query) { gammaMenu.value = "1"; paintImage(); draw(null, null); }
  if ("row" in query && "col" in query) { show(Math.min(nq - 1, query.row), Math.min(nk - 1, query.col)); }
  document.documentElement.setAttribute("data-qkv-ready", JSON.stringify({
    ms: Math.round(performance.now() - started), head: headMenu.value,
    headLabel: headMenu.options[headMenu.selectedIndex].textContent,
    heads: headMenu.options.length, rowItems: rowList.children.length, colItems: colList.children.length,
    status: status.textContent
  }));
})();
"""
