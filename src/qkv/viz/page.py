"""An offline, interactive page of attention weights: one HTML file, nothing fetched.

The page embeds the weights as JSON and draws them with a few lines of plain JavaScript: pick a
layer and a head (or the mean of the heads), hover a target token to see its attention row spread
over the source tokens, hover a source token to see its column, hover a cell for its value. It
loads no script, style sheet or font from anywhere, so it works from a file, offline, forever.
Token text reaches the page only as JSON data and is inserted with ``textContent``, never as
markup, so a token like ``<script>`` is shown, not run.
"""

from __future__ import annotations

import html
import json
import os
from collections.abc import Mapping, Sequence
from pathlib import Path

from torch import Tensor

from qkv.viz._checks import as_weights, check_nonnegative, token_labels, write_atomically

__all__ = ["attention_page", "write_page"]

# Four decimals: a weight still reads to 0.01 %, and a 12-layer, 12-head, 64-token page of
# random weights measured 4.1 MB.
DECIMALS = 4


def _page_data(
    layers: Mapping[str, Tensor],
    source_tokens: Sequence[str] | None,
    target_tokens: Sequence[str] | None,
) -> dict[str, object]:
    if not isinstance(layers, Mapping) or not layers:
        raise ValueError("layers must be a non-empty mapping of name -> (H, Nq, Nk) weights")
    shapes: dict[str, tuple[int, int]] = {}
    entries = []
    for name, weights in layers.items():
        if not isinstance(name, str):
            raise TypeError(f"layers keys must be str layer names; got {name!r}")
        values = as_weights(weights, f"layers[{name!r}]", 3, "(H, Nq, Nk)")
        check_nonnegative(values, f"layers[{name!r}]")
        shapes[name] = (int(values.shape[1]), int(values.shape[2]))
        entries.append({"name": name, "heads": values.round(decimals=DECIMALS).tolist()})
    if len(set(shapes.values())) != 1:
        raise ValueError(f"every layer needs the same (Nq, Nk); got {shapes}")
    nq, nk = next(iter(shapes.values()))
    return {
        "layers": entries,
        "source": token_labels(source_tokens, nk, "source_tokens"),
        "target": token_labels(target_tokens, nq, "target_tokens"),
    }


def _script_json(data: object) -> str:
    """JSON safe inside ``<script>``: ``<``, ``>`` and ``&`` as ``\\u`` escapes, so no token can
    close the element (``</script>``) or open a comment."""
    text = json.dumps(data, ensure_ascii=True, separators=(",", ":"))
    return text.replace("<", "\\u003c").replace(">", "\\u003e").replace("&", "\\u0026")


def attention_page(
    layers: Mapping[str, Tensor],
    source_tokens: Sequence[str] | None = None,
    target_tokens: Sequence[str] | None = None,
    *,
    title: str = "qkv attention",
) -> str:
    """A self-contained interactive HTML page of attention weights.

    Args:
        layers: layer name -> ``(H, Nq, Nk)`` attention probabilities of one example, in the
            order the layer menu should list them (e.g. ``{"encoder 0": ..., "cross 0": ...}``).
            Head counts may differ; every layer needs the same ``Nq`` and ``Nk``.
        source_tokens: ``Nk`` key-side tokens (default: positions).
        target_tokens: ``Nq`` query-side tokens (default: positions); pass the source tokens
            again for self-attention.
        title: page title and heading.

    Returns:
        The page as one string (HTML with inline CSS, JavaScript and data).
    """
    data = _page_data(layers, source_tokens, target_tokens)
    return (
        _TEMPLATE.replace("@TITLE@", html.escape(title))
        .replace("@STYLE@", _STYLE)
        .replace("@SCRIPT@", _SCRIPT)
        .replace("@DATA@", _script_json(data))
    )


def write_page(
    path: str | os.PathLike[str],
    layers: Mapping[str, Tensor],
    source_tokens: Sequence[str] | None = None,
    target_tokens: Sequence[str] | None = None,
    *,
    title: str = "qkv attention",
) -> Path:
    """Write :func:`attention_page` to ``path`` (atomically, UTF-8). Returns the path."""
    page = attention_page(layers, source_tokens, target_tokens, title=title)
    return write_atomically(path, page.encode("utf-8"))


_TEMPLATE = """<!DOCTYPE html>
<html lang="en">
<head>
<meta charset="utf-8">
<title>@TITLE@</title>
<style>@STYLE@</style>
</head>
<body>
<h1>@TITLE@</h1>
<div class="controls">
  <label>layer <select id="layer"></select></label>
  <label>head <select id="head"></select></label>
  <span id="status">hover a token or a cell</span>
</div>
<div class="strip"><span class="caption">source</span><span id="source-strip"></span></div>
<div class="strip"><span class="caption">target</span><span id="target-strip"></span></div>
<table id="map"></table>
<script type="application/json" id="qkv-data">@DATA@</script>
<script>@SCRIPT@</script>
</body>
</html>
"""

_STYLE = """
body { font-family: sans-serif; margin: 1.5em; }
.controls { margin-bottom: 1em; }
.controls label { margin-right: 1.5em; }
#status { color: #555; font-family: monospace; }
.strip { margin: 0.4em 0; line-height: 2; }
.caption { display: inline-block; width: 5em; color: #777; }
.tok { padding: 0.1em 0.3em; margin-right: 0.15em; border-radius: 0.2em; cursor: default; }
table { border-collapse: collapse; margin-top: 1em; }
td { width: 1.1em; height: 1.1em; padding: 0; border: 1px solid #fff; }
th { font-weight: normal; font-size: 0.8em; padding: 0 0.3em; cursor: default; }
th.col { writing-mode: vertical-rl; transform: rotate(180deg); text-align: left; }
th.row { text-align: right; }
.hot { outline: 2px solid #d62728; }
"""

# Plain JavaScript, no libraries. Tokens are inserted with textContent only.
_SCRIPT = """
(function () {
  "use strict";
  var data = JSON.parse(document.getElementById("qkv-data").textContent);
  var layerMenu = document.getElementById("layer");
  var headMenu = document.getElementById("head");
  var table = document.getElementById("map");
  var status = document.getElementById("status");
  var sourceStrip = document.getElementById("source-strip");
  var targetStrip = document.getElementById("target-strip");
  var matrix = [];

  function option(menu, value, text) {
    var o = document.createElement("option");
    o.value = String(value);
    o.textContent = text;
    menu.appendChild(o);
  }

  function shade(level) {
    var t = Math.max(0, Math.min(1, level));
    var r = Math.round(255 + (230 - 255) * t);
    var g = Math.round(255 + (85 - 255) * t);
    var b = Math.round(255 + (13 - 255) * t);
    return "rgb(" + r + "," + g + "," + b + ")";
  }

  function currentMatrix() {
    var heads = data.layers[Number(layerMenu.value)].heads;
    var choice = headMenu.value;
    if (choice !== "mean") { return heads[Number(choice)]; }
    return heads[0].map(function (row, i) {
      return row.map(function (_, j) {
        var total = 0;
        for (var h = 0; h < heads.length; h++) { total += heads[h][i][j]; }
        return total / heads.length;
      });
    });
  }

  function fillHeads() {
    var count = data.layers[Number(layerMenu.value)].heads.length;
    var keep = headMenu.value;
    headMenu.textContent = "";
    option(headMenu, "mean", "mean of " + count + " heads");
    for (var h = 0; h < count; h++) { option(headMenu, h, "head " + h); }
    if (keep !== "mean" && Number(keep) < count) { headMenu.value = keep; }
  }

  function strip(element, tokens, levels, onHover) {
    element.textContent = "";
    tokens.forEach(function (token, index) {
      var span = document.createElement("span");
      span.className = "tok";
      span.textContent = token;
      span.style.background = levels ? shade(levels[index]) : "#eee";
      span.addEventListener("mouseenter", function () { onHover(index); });
      span.addEventListener("mouseleave", clearHover);
      element.appendChild(span);
    });
  }

  function scaled(values) {
    var top = Math.max.apply(null, values);
    return values.map(function (v) { return top > 0 ? v / top : 0; });
  }

  function mark(cells, on) {
    cells.forEach(function (cell) { cell.classList.toggle("hot", on); });
  }

  function hoverTarget(i) {
    clearHover();
    var row = matrix[i];
    strip(sourceStrip, data.source, scaled(row), hoverSource);
    mark(Array.prototype.slice.call(table.rows[i + 1].cells, 1), true);
    status.textContent = "target " + i + " " + JSON.stringify(data.target[i]) + ": its attention over the source";
  }

  function hoverSource(j) {
    clearHover();
    var column = matrix.map(function (row) { return row[j]; });
    strip(targetStrip, data.target, scaled(column), hoverTarget);
    var cells = [];
    for (var i = 1; i < table.rows.length; i++) { cells.push(table.rows[i].cells[j + 1]); }
    mark(cells, true);
    status.textContent = "source " + j + " " + JSON.stringify(data.source[j]) + ": attention it receives";
  }

  function clearHover() {
    mark(Array.prototype.slice.call(table.querySelectorAll(".hot")), false);
  }

  function header(text, cls, onHover, index) {
    var th = document.createElement("th");
    th.className = cls;
    th.textContent = text;
    th.addEventListener("mouseenter", function () { onHover(index); });
    th.addEventListener("mouseleave", clearHover);
    return th;
  }

  function draw() {
    matrix = currentMatrix();
    var top = 0;
    matrix.forEach(function (row) { row.forEach(function (v) { top = Math.max(top, v); }); });
    table.textContent = "";
    var head = table.insertRow();
    head.appendChild(document.createElement("th"));
    data.source.forEach(function (token, j) { head.appendChild(header(token, "col", hoverSource, j)); });
    matrix.forEach(function (values, i) {
      var tr = table.insertRow();
      tr.appendChild(header(data.target[i], "row", hoverTarget, i));
      values.forEach(function (v, j) {
        var td = tr.insertCell();
        td.style.background = shade(top > 0 ? v / top : 0);
        td.title = data.target[i] + " -> " + data.source[j] + ": " + v.toFixed(4);
      });
    });
    strip(sourceStrip, data.source, null, hoverSource);
    strip(targetStrip, data.target, null, hoverTarget);
  }

  data.layers.forEach(function (layer, index) { option(layerMenu, index, layer.name); });
  layerMenu.addEventListener("change", function () { fillHeads(); draw(); });
  headMenu.addEventListener("change", draw);
  fillHeads();
  draw();
})();
"""
