"""The smoke mode of benchmarks/bench_compile_models.py: torch.compile on a small model's training step."""

from __future__ import annotations

import json
import math
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

BENCHMARKS = Path(__file__).resolve().parent.parent / "benchmarks"
SMOKE_MODELS = ["vae"]


@pytest.mark.skipif(shutil.which("g++") is None and shutil.which("c++") is None,
                    reason="torch.compile (inductor on CPU) needs a C++ compiler")
def test_compile_models_benchmark_smoke_mode_runs(tmp_path):
    """--smoke: vae, batch 16, one round of two steps; a fresh inductor cache (mostly compile time,
    seconds). Every row has a numeric speed-up or a recorded compile failure."""
    out = tmp_path / "rows.json"
    env = {**os.environ, "OMP_NUM_THREADS": "1", "TORCHINDUCTOR_CACHE_DIR": str(tmp_path / "inductor")}
    done = subprocess.run([sys.executable, str(BENCHMARKS / "bench_compile_models.py"), "--smoke", "--json", str(out)],
                          capture_output=True, text=True, timeout=240, cwd=BENCHMARKS, env=env)
    assert done.returncode == 0, done.stderr[-3000:]
    assert "| model | compiles? | graph breaks | compile s |" in done.stdout
    rows = json.loads(out.read_text())["rows"]
    assert [r["model"] for r in rows] == SMOKE_MODELS
    for row in rows:
        if row["compiles"]:
            assert isinstance(row["speedup"], float) and math.isfinite(row["speedup"]) and row["speedup"] > 0
            assert row["verdict"] in ("pays", "no gain", "slower")
            assert f"| {row['model']} | yes |" in done.stdout
        else:
            assert row["error"] and row["verdict"] == "does not compile"
