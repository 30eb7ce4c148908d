"""The 2-D toy of notes 002 s4.10 as a data source, ``--data xor``: the four points x = (a, b, a XOR b), a, b in
{0, 1}, each repeated (a uniform distribution over four binary vectors of three coordinates, every coordinate a fair
coin and every pair independent). A VAE with a 2-d latent space can reach the best average log-likelihood, -log 4,
only by giving each point its own region of z; the report then draws those regions (``figures.toy``).
"""

from __future__ import annotations

import itertools

import torch

from elbolab.data.core import DataSplits, split_three_ways
from elbolab.data.registry import register_source

REPEAT = 250  # copies of each point: 1,000 rows, split 70/15/15


def xor_points() -> torch.Tensor:
    """The four points (a, b, a XOR b), [4, 3]."""
    return torch.tensor([[a, b, a ^ b] for a, b in itertools.product((0, 1), (0, 1))], dtype=torch.float32)


def xor_data(repeat: int = 100) -> torch.Tensor:
    """Each XOR point ``repeat`` times, [4 * repeat, 3] (a uniform distribution over the four)."""
    return xor_points().repeat(repeat, 1)


@register_source("xor")
def load_xor(*, data_dir=None, binarize: str = "none", seed: int = 0, val_size=None) -> DataSplits:
    """The XOR toy: 1,000 rows (250 of each point), labels 0..3 naming the point."""
    x = xor_data(REPEAT)
    y = torch.arange(4).repeat(REPEAT)  # [N]: which of the four points
    return split_three_ways("xor", x, y, None, binarize=binarize, seed=seed,
                            val_size=0.15 if val_size is None else val_size,
                            meta={"toy": "xor", "class_names": ["000", "011", "101", "110"]})
