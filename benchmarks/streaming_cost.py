"""Per-chunk cost of a streaming session over a 5-minute stream: is it flat?

    python benchmarks/streaming_cost.py [--model demo] [--att-context 56,3] [--minutes 5]

Builds one long stream from the sample corpus (clips back to back, looped to the length asked
for), feeds it in real-time-sized pieces (one model chunk each), and times every ``feed`` call.
Prints the median cost of the chunks around second 1 and around the end, their ratio, and the
same for a naive baseline that recomputes features over the whole utterance on every chunk (what
a session built on NeMo's whole-file buffer would do). A flat session has a ratio near 1.0.
"""

from __future__ import annotations

import argparse
import statistics
import time

import numpy as np


def long_stream(seconds: float) -> np.ndarray:
    from asr.audio import decode_audio
    from demo.corpus import load_manifest

    clips = [decode_audio(r.audio_filepath) for r in load_manifest()]
    out, total = [], 0
    while total < seconds * 16000:
        for c in clips:
            out.append(c)
            total += len(c)
    return np.concatenate(out)[: int(seconds * 16000)]


def time_session(engine, audio: np.ndarray, att: tuple[int, int], piece: int) -> list[tuple[float, float]]:
    """(stream position in s, seconds spent) for every feed."""
    session = engine.stream(att_context=att)
    costs = []
    for pos in range(0, len(audio), piece):
        t0 = time.perf_counter()
        session.feed(audio[pos : pos + piece])
        costs.append((pos / 16000, time.perf_counter() - t0))
    session.finish()
    return costs


def naive_feature_cost(engine, audio: np.ndarray, piece: int, positions: list[float]) -> dict[float, float]:
    """Time to recompute log-mel over the whole utterance so far, at given positions (s)."""
    import torch

    out = {}
    for p in positions:
        n = int(p * 16000)
        x = torch.from_numpy(audio[:n])[None]
        runs = []
        for _ in range(5):
            t0 = time.perf_counter()
            with torch.inference_mode():
                engine.model.preprocessor(input_signal=x, length=torch.tensor([n]))
            runs.append(time.perf_counter() - t0)
        out[p] = statistics.median(runs)
    return out


def window(costs: list[tuple[float, float]], start: float, end: float) -> float:
    return statistics.median([c for t, c in costs if start <= t < end])


def main() -> None:
    import torch

    from asr.engine import Transcriber

    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="demo")
    parser.add_argument("--att-context", default="56,3")
    parser.add_argument("--minutes", type=float, default=5.0)
    parser.add_argument("--threads", type=int, default=1)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    att = tuple(int(v) for v in args.att_context.split(","))
    engine = Transcriber.load(args.model, device="cpu")
    audio = long_stream(args.minutes * 60)
    chunk_s = (att[1] + 1) * engine.info.frame_shift_s
    piece = int(chunk_s * 16000)
    time_session(engine, audio[: 16000 * 10], att, piece)  # warm-up
    costs = time_session(engine, audio, att, piece)
    end = len(audio) / 16000
    early, late = window(costs, 0.5, 10.5), window(costs, end - 10, end)
    naive = naive_feature_cost(engine, audio, piece, [1.0, end - 1])
    print(
        f"stream {end:.0f} s, att_context {att}, {chunk_s * 1000:.0f} ms chunks, {len(costs)} feeds, {args.threads} thread(s)"
    )
    print(
        f"earmark session: median feed cost near 1 s {early * 1000:.2f} ms, near {end:.0f} s {late * 1000:.2f} ms, ratio {late / early:.2f}"
    )
    print(
        f"real-time factor of the session: {chunk_s / statistics.median(c for _, c in costs):.1f}x faster than real time"
    )
    n1, n2 = naive[1.0], naive[end - 1]
    print(
        f"baseline (whole-utterance features each chunk, features only): near 1 s {n1 * 1000:.2f} ms, near {end:.0f} s {n2 * 1000:.2f} ms, ratio {n2 / n1:.1f}"
    )


if __name__ == "__main__":
    main()
