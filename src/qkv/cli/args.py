"""Options several ``qkv`` commands share: the shape of an attention call, comma lists."""

from __future__ import annotations

import argparse

__all__ = ["DTYPES", "add_shape_args", "int_list", "str_list"]

DTYPES = ("float16", "bfloat16", "float32", "float64")


def add_shape_args(p: argparse.ArgumentParser, *, q_len: int, kv_len: int | None) -> None:
    p.add_argument("--batch", type=int, default=2, help="B (default %(default)s)")
    p.add_argument("--heads", type=int, default=8, help="query heads Hq (default %(default)s)")
    p.add_argument(
        "--kv-heads", type=int, default=2, help="key/value heads Hkv (default %(default)s)"
    )
    p.add_argument("--q-len", type=int, default=q_len, help="Nq (default %(default)s)")
    p.add_argument(
        "--kv-len",
        type=int,
        default=kv_len,
        help="Nk (default: Nq)" if kv_len is None else "Nk (default %(default)s)",
    )
    p.add_argument("--head-dim", type=int, default=64, help="D (default %(default)s)")
    p.add_argument("--dtype", choices=DTYPES, default="float32", help="(default %(default)s)")
    p.add_argument("--device", default="cpu", help="(default %(default)s)")
    p.add_argument("--seed", type=int, default=0, help="random inputs' seed (default %(default)s)")


def int_list(text: str) -> list[int]:
    return [int(x) for x in text.split(",") if x]


def str_list(text: str) -> list[str]:
    return [x for x in text.split(",") if x]
