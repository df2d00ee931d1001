"""Settings every test module needs before anything imports Triton or picks a backend, and the
shared fixtures.

Triton decides at import time whether its ``@triton.jit`` functions (its own standard library
among them) run in the interpreter. Other tests import Triton indirectly (``torch.compile`` of
FlexAttention on the CPU, ``transformers``), so the interpreter switch of the Triton kernel tests
must be set before the first test module is collected, not in ``tests/test_triton.py``.
"""

from __future__ import annotations

import os
from collections.abc import Iterator

import pytest
import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

# auto's choices must not depend on this machine's timings in tests (qkv.backends.measured);
# the tests of measuring switch it back on themselves.
os.environ["QKV_AUTO_MEASURE"] = "0"


@pytest.fixture(autouse=True)
def _fresh_auto_selections() -> None:
    """Tests patch backends and estimates: auto's remembered selections start empty in each."""
    from qkv.backends.registry import forget_selections

    forget_selections()


@pytest.fixture(scope="module")
def one_thread() -> Iterator[None]:
    """One intra-op thread for a module of tiny models: on a busy 2-core machine two threads
    spin against other processes (30x slower, measured). Use it with
    ``pytestmark = pytest.mark.usefixtures("one_thread")``."""
    from helpers import torch_threads

    with torch_threads(1):
        yield
