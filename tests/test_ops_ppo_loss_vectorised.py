"""The C++ PPO loss's per-token loop stays vectorised: csrc/cpu/ppo_loss.cpp's header says a
runtime branch in the loop body stops gcc vectorising it (20x slower, and nothing else fails).
Compiles the file as setup.py does and reads gcc's vectoriser report for the lane loop (the
``#pragma GCC ivdep`` loop) — every option (kl_clamp, log_ratio_clamp, ...) must be selects.
"""

from __future__ import annotations

import re
import shutil
import subprocess
import sysconfig
from pathlib import Path

import pytest

SRC = Path(__file__).resolve().parents[1] / "csrc" / "cpu" / "ppo_loss.cpp"
CXX = shutil.which("g++")


@pytest.mark.skipif(CXX is None, reason="no g++ on PATH")
def test_the_token_loop_is_vectorised(tmp_path):
    from torch.utils.cpp_extension import include_paths

    lines = SRC.read_text().splitlines()
    lane_loop = next(i + 2 for i, line in enumerate(lines) if "#pragma GCC ivdep" in line)  # 1-based
    assert "for (int j = 0; j < kLanes; ++j)" in lines[lane_loop - 1]
    cmd = [CXX, "-O3", "-std=c++17", "-fopenmp", "-march=native", *(f"-I{p}" for p in include_paths()),
           f"-I{sysconfig.get_paths()['include']}", "-c", str(SRC), "-o", str(tmp_path / "ppo_loss.o"),
           "-fopt-info-vec-all"]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    here = [m for m in proc.stderr.splitlines() if re.search(rf"ppo_loss\.cpp:{lane_loop}:\d+:", m)]
    vectorised = [m for m in here if "loop vectorized" in m]
    refused = [m for m in here if "control flow in loop" in m]
    assert vectorised, f"gcc did not vectorise the lane loop at line {lane_loop}:\n" + "\n".join(here[:10])
    assert not refused, "a branch in the token body stops the vectoriser:\n" + "\n".join(refused[:5])
