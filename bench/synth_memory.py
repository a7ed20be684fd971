"""Wall time and peak memory of generating one synthetic slide, in a fresh subprocess.

    PYTHONPATH=platform .venv/bin/python bench/synth_memory.py [--size large] [--out DIR]

The generator is meant to run in bounded memory whatever the slide size (target: a large
80,000 x 80,000 px slide under 2 GB peak RSS), because it renders tile by tile and keeps only
the cell table. The child process runs ``generate_cohort(centers=1, slides_per_center=1)``;
with one slide it renders in that process (no pool), so ``RUSAGE_CHILDREN`` ``ru_maxrss`` is
the peak of the whole generation.
"""

from __future__ import annotations

import argparse
import resource
import shlex
import subprocess
import sys
import tempfile
import time
from pathlib import Path

CHILD = """
import logging, sys
from smartccs.synth.cohort import generate_cohort
logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s")
s = generate_cohort(sys.argv[1], centers=1, slides_per_center=1, size=sys.argv[2],
                    seed=int(sys.argv[3]), workers=1, progress=False)
print(f"RESULT slides={s.slides} cells={s.centers[0].cells} bytes={s.bytes} seconds={s.seconds}")
"""


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--size", default="large", choices=["tiny", "small", "medium", "large"])
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", type=Path, default=None, help="cohort folder (default: temp)")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory(prefix="synth-bench-") as tmp:
        out = args.out or Path(tmp) / "cohort"
        cmd = [sys.executable, "-c", CHILD, str(out), args.size, str(args.seed)]
        started = time.perf_counter()
        proc = subprocess.run(cmd, check=True, capture_output=True, text=True)
        wall = time.perf_counter() - started
        peak_kib = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss  # KiB on Linux
        files = sorted(p for p in Path(out).rglob("*") if p.is_file())
        slide = next(p for p in files if p.suffix in (".svs", ".tiff"))
        result = next(line for line in proc.stdout.splitlines() if line.startswith("RESULT"))
        print(f"size={args.size} seed={args.seed}: {result}")
        print(f"slide {slide.name}: {slide.stat().st_size / 1e6:.1f} MB")
    print(f"wall {wall:.1f} s, peak RSS {peak_kib / 1024:.0f} MiB")
    print("reproduce: PYTHONPATH=platform " + shlex.join([sys.executable, *sys.argv]))


if __name__ == "__main__":
    main()
