"""Throughput of ``earmark transcribe`` against a plain engine loop and NeMo's ``transcribe()``.

    .venv/bin/python benchmarks/transcribe_throughput.py [--repeats 3] [--copies 3]

The same clips (the corpus's short clips, each also cut at two other offsets, plus the long
recordings: a few hundred clips of 1-90 s) are transcribed three ways on this machine, in the
``auto`` language mode, one after the other, ``--repeats`` times:

1. ``engine loop``: one process decodes each clip and calls ``Transcriber.transcribe`` on lists
   of 64 clips (the engine packs them by length). No Ray, no VAD, no Parquet.
2. ``nemo transcribe``: NeMo's own ``model.transcribe(arrays, batch_size=16)`` on the same
   decoded arrays (decoding not timed; long recordings whole).
3. ``earmark transcribe``: the Ray Data job, from the manifest to Parquet parts (decode, VAD
   split, actor pool, commit), with Ray already started (a cluster is up before a job comes).

Each timing includes loading the model. Throughput is the input's audio seconds (the same
number for all three) per wall second; printed: the median of the repeats and its ratio to the
engine loop.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))


def build_manifest(folder: Path, copies: int) -> tuple[Path, list[dict]]:
    from asr.demo.corpus import load_manifest

    rows = []
    for row in load_manifest():
        if "sentences" in row:
            rows.append({"audio_filepath": row["audio_filepath"]})
            continue
        for k in range(copies):
            cut = 0.05 * k
            rows.append(
                {"audio_filepath": row["audio_filepath"], "offset": cut, "duration": round(row["duration"] - cut, 3)}
            )
    path = folder / "bench.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path, rows


def total_seconds(rows: list[dict]) -> float:
    from asr.audio import probe_audio

    total = 0.0
    for r in rows:
        whole = probe_audio(r["audio_filepath"]).duration_s
        total += min(r.get("duration") or whole, whole - r.get("offset", 0.0))
    return total


def engine_loop(rows: list[dict]) -> tuple[float, float]:
    from asr.audio import decode_audio
    from asr.engine import Transcriber

    t0 = time.perf_counter()
    engine = Transcriber.load("demo", device="cpu")
    audio_s = 0.0
    for i in range(0, len(rows), 64):
        chunk = rows[i : i + 64]
        audios = [
            decode_audio(r["audio_filepath"], offset_s=r.get("offset", 0.0), duration_s=r.get("duration"))
            for r in chunk
        ]
        audio_s += sum(len(a) for a in audios) / 16_000
        engine.transcribe(audios)
    return audio_s, time.perf_counter() - t0


def nemo_transcribe(rows: list[dict]) -> tuple[float, float]:
    from asr.audio import decode_audio
    from asr.model import load_model

    audios = [
        decode_audio(r["audio_filepath"], offset_s=r.get("offset", 0.0), duration_s=r.get("duration")) for r in rows
    ]
    t0 = time.perf_counter()
    model, _ = load_model("demo", device="cpu")
    model.transcribe(audios, batch_size=16, verbose=False)
    return sum(len(a) for a in audios) / 16_000, time.perf_counter() - t0


def earmark_job(manifest: Path, work: Path, k: int) -> tuple[float, float]:
    from cluster.storage import StorageOptions
    from jobs.stages import JobSettings
    from jobs.transcribe import TranscribeRequest, run_transcribe

    request = TranscribeRequest(
        input=str(manifest),
        out=str(work / f"out{k}"),
        settings=JobSettings(run_id="", storage=StorageOptions()),
        quiet=True,
    )
    t0 = time.perf_counter()
    summary = run_transcribe(request)
    return summary["audio_hours"] * 3600, time.perf_counter() - t0


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--copies", type=int, default=3, help="cuts of each short clip")
    args = parser.parse_args()
    import logging
    import warnings

    warnings.filterwarnings("ignore")
    logging.disable(logging.WARNING)
    from cluster.runtime import connect

    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        manifest, rows = build_manifest(work, args.copies)
        total_audio = total_seconds(rows)
        t0 = time.perf_counter()
        connect(quiet=True)
        ray_start = time.perf_counter() - t0
        results: dict[str, list[float]] = {"engine loop": [], "nemo transcribe": [], "earmark transcribe": []}
        for k in range(args.repeats):
            for name, run in (
                ("engine loop", lambda: engine_loop(rows)),
                ("nemo transcribe", lambda: nemo_transcribe(rows)),
                ("earmark transcribe", lambda k=k: earmark_job(manifest, work, k)),
            ):
                try:
                    seconds, wall = run()
                except Exception as exc:  # noqa: BLE001 - a failing baseline is reported, not fatal
                    print(f"{name}: failed ({type(exc).__name__}: {str(exc)[:200]})")
                    continue
                results[name].append(total_audio / wall)
                print(
                    f"repeat {k + 1} {name:20s} {wall:6.1f} s -> {total_audio / wall:6.1f} audio s/s ({seconds:.0f} s transcribed)"
                )
    base = statistics.median(results["engine loop"])
    print(f"\n{len(rows)} clips, {total_audio:.0f} s of audio; Ray start-up (not in the timings): {ray_start:.1f} s")
    print(f"{'way':20s} {'audio s/s (median)':>20s} {'ratio to engine loop':>22s}")
    for name, values in results.items():
        if values:
            med = statistics.median(values)
            print(f"{name:20s} {med:20.1f} {med / base:22.2f}")


if __name__ == "__main__":
    main()
