"""Throughput of a raw VAE training step (784-400-20, fused Adam, no elbolab code) or of a 512x512 matmul loop over 60 s
in one process, per 5-s window: does a long run slow down by itself? (issue 22; BENCHMARKS.md "Analysis commands at
their defaults").

Run:  python benchmarks/bench_throughput_drift.py THREADS vae|matmul
"""
import sys
import time

import torch
from torch import nn
from torch.nn import functional as F

torch.set_num_threads(int(sys.argv[1]) if len(sys.argv) > 1 else 1)
mode = sys.argv[2] if len(sys.argv) > 2 else "vae"
torch.manual_seed(0)
x = torch.rand(60000, 784)
enc = nn.Sequential(nn.Linear(784, 400), nn.ReLU(), nn.Linear(400, 40))
dec = nn.Sequential(nn.Linear(20, 400), nn.ReLU(), nn.Linear(400, 784))
opt = torch.optim.Adam([*enc.parameters(), *dec.parameters()], lr=1e-3, fused=True)
a = torch.randn(512, 512)
start = last = time.perf_counter()
done = 0
while time.perf_counter() - start < 60:
    if mode == "matmul":
        for _ in range(20):
            a @ a
        done += 20 * 128
    else:
        idx = torch.randint(0, 60000, (128,))
        xb = x[idx]
        h = enc(xb)
        mu, logvar = h.chunk(2, -1)
        z = mu + (0.5 * logvar).exp() * torch.randn_like(mu)
        logits = dec(z)
        loss = (F.binary_cross_entropy_with_logits(logits, xb, reduction="none").sum(-1)
                - 0.5 * (1 + logvar - mu ** 2 - logvar.exp()).sum(-1)).mean()
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        done += 128
    now = time.perf_counter()
    if now - last >= 5:
        print(f"{now - start:5.1f} s  {done / (now - last):9.0f} images/s", flush=True)
        last, done = now, 0
