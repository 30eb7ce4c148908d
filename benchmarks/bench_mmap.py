"""Training from a memory-mapped folder (elbolab.data.mmap) vs the same rows in memory, and a data set larger than RAM.

Part A, MNIST (all 50,000 training-split images, uint8): the 784-400-20 ReLU Bernoulli VAE trained by
``Trainer.fit(train, None)`` (batch 128, fused Adam) on (a) the in-memory uint8 TensorData and (b) an MmapData over
a folder written from the same rows (39 MB: in the page cache after the first epoch), with and without the
per-batch prefetch. Rounds are interleaved, the order rotated; the first epoch of each run is warm-up.

Part B, a synthetic data set larger than this machine's RAM: ``--size-gb`` of uint8 rows of 784 bytes (MNIST
training images drawn with replacement, so the model sees image-like data), written with ``MmapWriter`` to
``--scratch``. Training one epoch over it would take hours here, so every contender trains one epoch over the same
``--rows`` rows drawn at random from the whole file: each step reads 128 rows scattered over the file, which is the
access pattern of a full epoch over a file the page cache cannot hold. Before each "cold" epoch the file's pages are
dropped from the page cache (posix_fadvise DONTNEED), so every row comes from disk, as it would in a real epoch over
a file larger than RAM. Contenders: the same rows copied into memory (uint8 TensorData), mmap cold with prefetch
(madvise WILLNEED on the batch's rows, then copy), mmap cold without. A data-path table gives ms per batch of 128
for each (no model). The big file is deleted at the end.

Run:  ELBOLAB_DATA=/work/shared/data .venv/bin/python benchmarks/bench_mmap.py --scratch /tmp [--size-gb 32]
"""

from __future__ import annotations

import argparse
import os
import shutil
import tempfile
import time
from pathlib import Path

import _common as common
import numpy as np
import torch

CHUNK_ROWS = 65536  # 51 MB of 784-byte rows per write


def build_model():
    from elbolab.models import get_model_class

    cls = get_model_class("vae")
    return cls(cls.config_class(input_dim=784, image_shape=(1, 28, 28), latent_dim=20, hidden=(400,),
                                activation="relu", likelihood="bernoulli"))


def train_epochs(data, epochs: int, scratch: Path, seed: int = 0, before_epoch=None) -> list[float]:
    """Seconds of each epoch of Trainer.fit(data, None) (checkpoint and metrics writes included)."""
    from elbolab.config import TrainConfig
    from elbolab.trainer import Trainer

    torch.manual_seed(seed)
    trainer = Trainer(build_model(), TrainConfig(epochs=epochs, batch_size=128, seed=seed, progress=False,
                                                 tensorboard=False),
                      Path(tempfile.mkdtemp(dir=scratch)) / "run", model_name="vae", data_info={"source": "bench"})
    seconds: list[float] = []
    inner = trainer._train_epoch

    def timed(train):
        if before_epoch is not None:
            before_epoch()
        start = time.perf_counter()
        record = inner(train)
        seconds.append(time.perf_counter() - start)
        return record

    trainer._train_epoch = timed
    trainer.fit(data, None)
    return seconds


def mmap_split(store, index: torch.Tensor, name: str):
    from elbolab.data.mmap import MmapData, MmapRows

    return MmapData(x=MmapRows(store, index), y=None, image_shape=(1, 28, 28), binarize="none", name=name,
                    source_index=index, levels=255.0)


def lookahead_split(store, index: torch.Tensor, name: str, seed: int = 0, depth: int = 1):
    """An MmapData whose batch(i) also calls prefetch(batch i + depth) before returning, for the batch order the trainer
    draws in its first epoch: what the proposed two-line trainer hook does (see the notes)."""
    from torch.utils.data.distributed import DistributedSampler

    from elbolab.data.mmap import MmapData, MmapRows

    class Lookahead(MmapData):
        def batch(self, index, generator=None):
            plan, pos = self._plan, self._pos
            if pos < len(plan) and torch.equal(index, plan[pos]):
                index = plan[pos]  # the object prefetch was given: rows() skips a second request
                out = super().batch(index, generator)
                if pos + depth < len(plan):
                    self.prefetch(plan[pos + depth])
                self._pos = pos + 1
                return out
            return super().batch(index, generator)

    data = Lookahead(x=MmapRows(store, index), y=None, image_shape=(1, 28, 28), binarize="none", name=name,
                     source_index=index, levels=255.0)
    sampler = DistributedSampler(range(len(index)), num_replicas=1, rank=0, shuffle=True, seed=seed)
    sampler.set_epoch(0)
    data._plan, data._pos = list(torch.tensor(list(sampler)).split(128)), 0
    for first in data._plan[:depth]:
        data.prefetch(first)
    return data


def memory_split(x: torch.Tensor, name: str):
    from elbolab.data.core import TensorData

    return TensorData(x=x, y=None, image_shape=(1, 28, 28), binarize="none", name=name,
                      source_index=torch.arange(len(x)))


def drop_cache(path: Path, stores=()) -> None:
    """Evict the file from the page cache: unmap its pages from this process's mappings first (posix_fadvise
    DONTNEED leaves pages that a process still maps), then drop them."""
    import mmap

    for store in stores:
        for mapped in store._maps.values():
            mapped.madvise(mmap.MADV_DONTNEED)
    fd = os.open(path, os.O_RDONLY)
    try:
        os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
    finally:
        os.close(fd)


def cached_fraction(path: Path, rows: np.ndarray, row_bytes: int) -> float:
    """Fraction of the given rows whose first page is in the page cache (mincore through a read-only mapping)."""
    import ctypes
    import mmap

    libc = ctypes.CDLL(None, use_errno=True)
    size = path.stat().st_size
    with open(path, "rb") as f:
        mapped = mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ)
    pages = (size + mmap.PAGESIZE - 1) // mmap.PAGESIZE
    vec = (ctypes.c_ubyte * pages)()
    view = np.frombuffer(mapped, np.uint8)  # the mapping's address, without a copy
    addr = view.ctypes.data
    libc.mincore(ctypes.c_void_p(addr), ctypes.c_size_t(size), vec)
    resident = np.frombuffer(vec, np.uint8) & 1
    fraction = float(resident[(rows * row_bytes) // mmap.PAGESIZE].mean())
    del view
    mapped.close()
    return fraction


# ----- part A -----
def part_a(args, scratch: Path) -> tuple[list[str], torch.Tensor]:
    from elbolab.data import load_data
    from elbolab.data.mmap import MmapStore, write_mmap

    train = load_data("mnist", data_dir=args.data_dir).train
    x = train.x  # [50000, 784] uint8
    folder = write_mmap(scratch / "mnist.mmap", x.numpy())
    contenders = {"in memory (uint8 TensorData)": memory_split(x, "memory"),
                  "mmap, prefetch": mmap_split(MmapStore(folder, prefetch=True), torch.arange(len(x)), "mmap"),
                  "mmap, no prefetch": mmap_split(MmapStore(folder, prefetch=False), torch.arange(len(x)), "mmap")}
    rates = {name: [] for name in contenders}
    names = list(contenders)
    for r in range(args.rounds):
        for name in names[r % len(names):] + names[:r % len(names)]:
            seconds = train_epochs(contenders[name], args.epochs, scratch)
            rates[name].append(len(x) / common.median(seconds[1:]))
            print(f"A round {r + 1} {name}: {rates[name][-1]:,.0f} images/s", flush=True)
    base = rates[names[0]]
    rows = [[name, common.fmt(common.median(v)), f"{common.fmt(min(v))}-{common.fmt(max(v))}",
             f"{common.median([a / b for a, b in zip(v, base)]):.2f}x"] for name, v in rates.items()]
    lines = [f"Part A: MNIST, 50,000 images, {args.rounds} rounds x {args.epochs} epochs (first is warm-up)", ""]
    lines += common.markdown_table(["data", "train images/s (median)", "range", "/ in memory (paired)"], rows)
    return lines + [""], x


# ----- part B -----
def write_big(args, scratch: Path, mnist: torch.Tensor) -> tuple[Path, float]:
    from elbolab.data.mmap import MmapWriter

    n = int(args.size_gb * 2**30) // 784
    folder = scratch / "big.mmap"
    rng = np.random.default_rng(0)
    source = mnist.numpy()
    start = time.perf_counter()
    with MmapWriter(folder, 784, "uint8", image_shape=(28, 28)) as writer:
        path = folder / "x.bin"
        done = 0
        while done < n:
            rows = min(CHUNK_ROWS, n - done)
            writer.append(source[rng.integers(0, len(source), rows)])
            done += rows
            if done % (CHUNK_ROWS * 16) == 0 or done == n:  # every ~820 MB: write back, leave no cache behind
                writer._files["x.bin"].flush()
                fd = os.open(path, os.O_RDONLY)
                os.fdatasync(fd)
                os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
                os.close(fd)
    seconds = time.perf_counter() - start
    drop_cache(path)
    return folder, seconds


def part_b(args, scratch: Path, mnist: torch.Tensor) -> list[str]:
    from elbolab.data.mmap import MmapStore

    folder, write_s = write_big(args, scratch, mnist)
    path = folder / "x.bin"
    size = path.stat().st_size
    stores = {"prefetch": MmapStore(folder, prefetch=True), "no prefetch": MmapStore(folder, prefetch=False)}
    n = stores["prefetch"].n
    gen = torch.Generator().manual_seed(0)
    rows = torch.randperm(n, generator=gen)[:args.rows].sort().values  # [R] scattered over the whole file
    in_memory = stores["prefetch"].gather(rows.numpy())  # [R, 784] uint8 copy
    def cold():
        drop_cache(path, stores.values())

    contenders = {"in memory (the same rows, uint8 TensorData)": (memory_split(in_memory, "memory"), None),
                  "mmap cold, prefetch": (mmap_split(stores["prefetch"], rows, "big"), cold),
                  "mmap cold, no prefetch": (mmap_split(stores["no prefetch"], rows, "big"), cold),
                  "mmap cold, next batch prefetched": (None, cold),
                  "mmap cold, 3 batches ahead prefetched": (None, cold)}
    cold()
    after_drop = cached_fraction(path, rows.numpy(), 784)

    # data path only: ms per batch of 128 random rows
    batches = [torch.randperm(args.rows, generator=gen)[:128] for _ in range(args.path_batches)]
    path_ms = {name: [] for name in contenders if contenders[name][0] is not None}
    path_ms["mmap warm (rows cached), prefetch"] = []
    path_ms["mmap warm (rows cached), no prefetch"] = []
    for _ in range(args.rounds):
        for name, (data, before) in contenders.items():
            if data is None:
                continue
            if before is not None:
                before()
            start = time.perf_counter()
            for index in batches:
                data.batch(index)
            path_ms[name].append((time.perf_counter() - start) / len(batches) * 1e3)
        for label, store in (("prefetch", stores["prefetch"]), ("no prefetch", stores["no prefetch"])):
            data = mmap_split(store, rows, "big")  # rows of these batches are cached now
            start = time.perf_counter()
            for index in batches:
                data.batch(index)
            path_ms[f"mmap warm (rows cached), {label}"].append((time.perf_counter() - start) / len(batches) * 1e3)

    rates = {name: [] for name in contenders}
    names = list(contenders)
    for r in range(args.rounds):
        for name in names[r % len(names):] + names[:r % len(names)]:
            data, before = contenders[name]
            if data is None:  # a fresh plan position each run; cold before the first batch is prefetched
                before()
                depth = 3 if "3 batches" in name else 1
                data, before = lookahead_split(stores["no prefetch"], rows, "big", depth=depth), None
            seconds = train_epochs(data, 1, scratch, before_epoch=before)
            rates[name].append(args.rows / seconds[0])
            print(f"B round {r + 1} {name}: {rates[name][-1]:,.0f} images/s", flush=True)
    base = rates[names[0]]
    train_rows = [[name, common.fmt(common.median(v)), f"{common.fmt(min(v))}-{common.fmt(max(v))}",
                   f"{common.median([a / b for a, b in zip(v, base)]):.2f}x"] for name, v in rates.items()]
    lines = [f"Part B: {size / 2**30:.1f} GiB file ({n:,} rows x 784 uint8) written in {write_s:.0f} s "
             f"({size / 2**30 / write_s:.2f} GiB/s); {args.rows:,} rows drawn from the whole file; "
             f"{args.rounds} rounds; after DONTNEED {after_drop:.1%} of those rows' pages were still cached", ""]
    lines += common.markdown_table(["data", "train images/s, 1 epoch (median)", "range", "/ in memory (paired)"],
                                   train_rows)
    lines += ["", f"Data path alone: ms per batch of 128 random rows (mean of {args.path_batches} batches, median over "
                  "rounds; cold = file dropped from the page cache first)", ""]
    lines += common.markdown_table(["data", "ms / batch (median)", "range"],
                                   [[k, f"{common.median(v):.3f}", f"{min(v):.3f}-{max(v):.3f}"]
                                    for k, v in path_ms.items()])
    return lines


def memory_line() -> str:
    fields = {}
    for line in Path("/proc/meminfo").read_text().splitlines():
        key, value = line.split(":", 1)
        fields[key] = int(value.split()[0]) / 2**20  # GiB
    return (f"RAM {fields['MemTotal']:.1f} GiB, available {fields['MemAvailable']:.1f} GiB, page cache "
            f"{fields['Cached']:.1f} GiB (at start)")


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--data-dir", default=common.data_dir_default() or "/work/shared/data")
    p.add_argument("--scratch", default="/tmp", help="folder for the files (the big one is deleted at the end)")
    p.add_argument("--size-gb", type=float, default=32.0, help="size of the part B file (GiB); 0 skips part B")
    p.add_argument("--rows", type=int, default=40_000, help="part B: rows per epoch, drawn from the whole file")
    p.add_argument("--path-batches", type=int, default=100)
    p.add_argument("--epochs", type=int, default=3, help="part A epochs per run (the first is warm-up)")
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--skip-a", action="store_true")
    p.add_argument("--out", default=None)
    args = p.parse_args()
    common.set_threads(args.threads)
    scratch = Path(tempfile.mkdtemp(prefix="bench-mmap-", dir=args.scratch))
    disk = shutil.disk_usage(scratch)
    info = common.machine_info()
    extra = {"memory": memory_line(), "disk": f"{disk.free / 2**30:.0f} GiB free on {args.scratch} (at start)",
             "model": "784-400-20 ReLU Bernoulli VAE, batch 128, Adam lr 1e-3 (fused), Trainer.fit(train, None)"}
    lines = common.header_lines("Memory-mapped data vs in memory", info, extra)
    try:
        from elbolab.data import load_data

        if args.skip_a:
            mnist = load_data("mnist", data_dir=args.data_dir).train.x
        else:
            part, mnist = part_a(args, scratch)
            lines += part
        if args.size_gb > 0:
            lines += part_b(args, scratch, mnist)
    finally:
        shutil.rmtree(scratch, ignore_errors=True)
    common.write_output(lines, args.out)


if __name__ == "__main__":
    main()
