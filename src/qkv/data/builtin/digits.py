"""``builtin:digits``: scikit-learn's bundled 8x8 handwritten digits (no download).

1,797 grayscale images of the digits 0-9 (Alpaydin & Kaynak, UCI "Optical Recognition of
Handwritten Digits", the test part), shipped inside scikit-learn. Pixels are 0-16 (ink = high),
scaled here to ``[0, 1]``. The split is seeded and stratified: 10 % validation and 20 % test per
class (180 and 360 images), the same on every machine for a given ``seed``.
"""

from __future__ import annotations

import torch

from qkv.data._util import require_module
from qkv.data.images import LabeledImage, split_images
from qkv.data.registry import Splits, register_builtin

__all__ = ["DIGITS_PIXEL_MAX", "SKLEARN_REQUIREMENT", "load_digits"]

SKLEARN_REQUIREMENT = "scikit-learn>=1.4"
#: The digits' own pixel scale: a CSV exported from them needs ``pixel_max=16``.
DIGITS_PIXEL_MAX = 16.0


def load_digits(
    *, seed: int = 0, validation: float = 0.1, test: float = 0.2
) -> Splits[LabeledImage]:
    """The digits as ``(1, 8, 8)`` images labelled ``"0"`` .. ``"9"``.

    Args:
        seed: the split's seed.
        validation, test: fractions of each class held out.

    Raises:
        MissingPackageError: scikit-learn is not installed.
    """
    require_module(
        "sklearn", f"pip install '{SKLEARN_REQUIREMENT}'", needed_for="the builtin 'digits' set"
    )
    from sklearn.datasets import load_digits as sklearn_digits

    bunch = sklearn_digits()
    pixels = torch.tensor(bunch.images, dtype=torch.float32) / DIGITS_PIXEL_MAX  # (1797, 8, 8)
    images = [
        LabeledImage(pixels[i][None].contiguous(), str(int(label)), f"builtin:digits#{i}")
        for i, label in enumerate(bunch.target)
    ]
    return split_images(images, validation=validation, test=test, seed=seed)


register_builtin(
    "digits",
    load_digits,
    task="image",
    description="scikit-learn's 8x8 handwritten digits (1,797); 360 held-out images",
    requires=(SKLEARN_REQUIREMENT,),
)
