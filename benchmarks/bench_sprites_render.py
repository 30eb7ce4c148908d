"""Sprites: images/s of rendering a batch (by row number, and by factors) against a trained run's encoder on the same
batch, one thread (issue 22: the renderer must not dominate a sprites epoch or the disentanglement metrics).

Run:  python benchmarks/bench_sprites_render.py RUN_DIR   (a run trained on --data sprites)
"""
import time

import numpy as np
import torch

from elbolab.data.sprites import Sprites
from elbolab.loading import load_run

torch.set_num_threads(1)
sprites = Sprites()
model, _ = load_run(__import__("sys").argv[1])
model.eval()
rng = np.random.default_rng(0)
n = 4096
rows = rng.integers(0, len(sprites), n)
best_render, best_encode, best_draw_factors = [], [], []
for _ in range(5):
    t = time.perf_counter()
    images = sprites.render(rows).float()
    best_render.append(time.perf_counter() - t)
    f = sprites.sample_factors(n, rng)
    t = time.perf_counter()
    sprites.images(f)
    best_draw_factors.append(time.perf_counter() - t)
    with torch.no_grad():
        t = time.perf_counter()
        for part in images.split(256):
            _ = model.encode(part).mean
        best_encode.append(time.perf_counter() - t)
r, e, d = min(best_render), min(best_encode), min(best_draw_factors)
print(f"render (rows) {n / r:,.0f} images/s; images(factors) {n / d:,.0f} images/s; encoder {n / e:,.0f} "
      f"images/s; rendering costs {e / r:.1f}x less than encoding (factors: {e / d:.1f}x)")
