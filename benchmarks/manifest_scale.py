"""Time to first results and driver memory of ``earmark transcribe`` on huge manifests.

    .venv/bin/python benchmarks/manifest_scale.py [--lines 10000 100000 1000000]

For each size, a manifest of that many lines is written: the corpus's long recordings at
different offsets, 2 s each (the same few files, as the issue allows). ``earmark transcribe`` runs
on it as a subprocess; the script waits for the first Parquet part, keeps sampling the driver's
resident memory for ``--watch`` more seconds (to see whether it grows), then stops the job.
Printed per size: manifest size, time to the first part, and the driver's peak RSS, with the
ratios to the smallest size (flat means nothing in the driver grows with the corpus).
"""

from __future__ import annotations

import argparse
import os
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def write_manifest(path: Path, lines: int) -> None:
    sys.path.insert(0, str(ROOT))
    from demo.corpus import load_manifest
    from records.manifest import ManifestEntry, to_line

    longs = [(r.audio_filepath, r.duration or 0.0) for r in load_manifest() if "sentences" in r.extra]
    with path.open("w") as f:
        for i in range(lines):
            source, duration = longs[i % len(longs)]
            offset = round((i * 0.37) % (duration - 3), 3)  # distinct (file, offset) pairs
            f.write(to_line(ManifestEntry(source, offset=offset, duration=2.0)) + "\n")


def run_one(manifest: Path, out: Path, watch_s: float, timeout_s: float) -> dict:
    import psutil

    env = os.environ | {"RAY_DATA_DISABLE_PROGRESS_BARS": "1"}
    cmd = [sys.executable, "-m", "jobs.cli", "transcribe", str(manifest), "--out", str(out), "--quiet"]
    t0 = time.perf_counter()
    proc = subprocess.Popen(
        cmd, cwd=ROOT, env=env, start_new_session=True, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE
    )
    driver = psutil.Process(proc.pid)
    peak = 0
    first = None
    try:
        while True:
            if proc.poll() is not None:
                raise RuntimeError(f"the job exited early: {proc.stderr.read().decode()[-2000:]}")
            peak = max(peak, driver.memory_info().rss)
            if first is None and any(out.glob("part-*.parquet")):
                first = time.perf_counter() - t0
            if first is not None and time.perf_counter() - t0 > first + watch_s:
                break
            if time.perf_counter() - t0 > timeout_s:
                raise RuntimeError(f"no part within {timeout_s:.0f} s")
            time.sleep(0.1)
        parts = len(list(out.glob("part-*.parquet")))
    finally:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()
    return {"first_part_s": first, "peak_rss_mb": peak / 2**20, "parts_after_watch": parts}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--lines", type=int, nargs="+", default=[10_000, 100_000, 1_000_000])
    parser.add_argument("--watch", type=float, default=20.0, help="seconds to keep watching after the first part")
    parser.add_argument("--timeout", type=float, default=300.0)
    args = parser.parse_args()
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for n in args.lines:
            manifest = Path(tmp) / f"m{n}.jsonl"
            write_manifest(manifest, n)
            result = run_one(manifest, Path(tmp) / f"out{n}", args.watch, args.timeout)
            result |= {"lines": n, "manifest_mb": manifest.stat().st_size / 2**20}
            rows.append(result)
            print(
                f"{n:>9,d} lines ({result['manifest_mb']:6.1f} MB): first part after {result['first_part_s']:5.1f} s, "
                f"driver peak RSS {result['peak_rss_mb']:6.0f} MB, {result['parts_after_watch']} parts after {args.watch:.0f} s more",
                flush=True,
            )
            manifest.unlink()
    base = rows[0]
    print(f"\n{'lines':>9s} {'first part s':>12s} {'ratio':>6s} {'peak RSS MB':>12s} {'ratio':>6s}")
    for r in rows:
        print(
            f"{r['lines']:>9,d} {r['first_part_s']:12.1f} {r['first_part_s'] / base['first_part_s']:6.2f} "
            f"{r['peak_rss_mb']:12.0f} {r['peak_rss_mb'] / base['peak_rss_mb']:6.2f}"
        )


if __name__ == "__main__":
    main()
