"""Per-chunk cost of a streaming session over a 5-minute stream: is it flat? And what does a step
of many sessions cost, batched over a cache pool, against today's concatenated caches?

    python benchmarks/streaming_cost.py [--model demo] [--att-context 56,3] [--minutes 5] [--sessions 1,8,32]

Builds one long stream from the sample corpus (clips back to back, looped to the length asked
for), feeds it in real-time-sized pieces (one model chunk each), and times every ``feed`` call.
Prints the median cost of the chunks around second 1 and around the end, their ratio, and the
same for a naive baseline that recomputes features over the whole utterance on every chunk (what
a session built on NeMo's whole-file buffer would do). A flat session has a ratio near 1.0.

Then, for each N in ``--sessions``, N sessions (languages mixed) step together in steady state and
the time of one step of all N is measured (median over rounds and repeats; feature extraction is
not counted): ``pooled`` (a :class:`~asr.streaming.CachePool`, the slots one range, read as a
view), ``pooled, scattered`` (every other slot, read with ``index_select``), ``concat`` (each
session holds its caches, concatenated every step: sessions without a pool) and ``unbatched`` (one
forward pass per session, the scheduler's ``batched=False``). Last, the cache handling alone (no
model) at the full 600M model's cache shapes, where it weighs more than on the demo model.
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
        x = torch.from_numpy(audio[:n])[None].to(engine.device)
        runs = []
        for _ in range(5):
            t0 = time.perf_counter()
            with torch.inference_mode():
                engine.model.preprocessor(input_signal=x, length=torch.tensor([n], device=x.device))
            sync(engine)
            runs.append(time.perf_counter() - t0)
        out[p] = statistics.median(runs)
    return out


def window(costs: list[tuple[float, float]], start: float, end: float) -> float:
    return statistics.median([c for t, c in costs if start <= t < end])


def sync(engine) -> None:
    if str(engine.device).startswith("cuda"):
        import torch

        torch.cuda.synchronize()


STEP_KINDS = ("pooled", "pooled, scattered", "concat", "unbatched")


def step_cost(engine, audio: np.ndarray, att: tuple[int, int], n: int, kind: str, rounds: int, repeats: int) -> float:
    """Median seconds of one step of ``n`` sessions, in steady state (after their first chunk)."""
    from asr.streaming import CachePool, StreamingSession, step_sessions

    langs = ["auto", *engine.info.locales] if engine.info.uses_prompts else ["auto"]
    chunk = int((att[1] + 1) * engine.info.frame_shift_s * 16000)
    need = chunk * (rounds + 2)
    times = []
    for _ in range(repeats):
        pool = None
        if kind.startswith("pooled"):
            pool = CachePool(engine, 2 * n)
        spacers = []
        sessions = []
        for i in range(n):
            sessions.append(StreamingSession(engine, lang=langs[i % len(langs)], att_context=att, pool=pool))
            if kind == "pooled, scattered":
                spacers.append(StreamingSession(engine, att_context=att, pool=pool))  # holds the slot between
        for i, s in enumerate(sessions):
            start = (i * need) % max(1, len(audio) - need)
            s.feed(audio[start : start + need], run=False)
        step_sessions(sessions)  # the first chunk is a phase of its own
        for _ in range(rounds):
            t0 = time.perf_counter()
            if kind == "unbatched":
                for s in sessions:
                    step_sessions([s])
            else:
                step_sessions(sessions)
            sync(engine)
            times.append(time.perf_counter() - t0)
        for s in sessions + spacers:
            s.close()
    return statistics.median(times)


def cache_handling_cost(layers: int, d_model: int, left: int, conv: int, n: int, kind: str, device: str) -> float:
    """Median seconds to read N streams' caches for a step and keep the new ones, without the model:
    ``pooled`` a view in and one copy back, ``pooled, scattered`` index_select and index_copy_,
    ``concat`` a torch.cat of N per-session tensors and N slices back."""
    import torch

    def fresh(b: int) -> list:
        return [torch.randn(layers, b, left, d_model), torch.randn(layers, b, d_model, conv), torch.zeros(b)]

    pool = [t.to(device) for t in fresh(2 * n)]
    own = [[t.to(device) for t in fresh(1)] for _ in range(n)]
    new = [t.to(device) for t in fresh(n)]  # what the encoder returns
    index = torch.arange(0, 2 * n, 2, device=device)
    runs = []
    for _ in range(20):
        t0 = time.perf_counter()
        if kind == "pooled":
            _ = [t.narrow(1 if t.dim() > 1 else 0, 0, n) for t in pool]
            for t, c in zip(pool, new, strict=True):
                t.narrow(1 if t.dim() > 1 else 0, 0, n).copy_(c)
        elif kind == "pooled, scattered":
            _ = [t.index_select(1 if t.dim() > 1 else 0, index) for t in pool]
            for t, c in zip(pool, new, strict=True):
                t.index_copy_(1 if t.dim() > 1 else 0, index, c)
        else:
            _ = [torch.cat([o[k] for o in own], dim=1 if k < 2 else 0) for k in range(3)]
            own = [[new[0][:, r : r + 1], new[1][:, r : r + 1], new[2][r : r + 1]] for r in range(n)]
        if device.startswith("cuda"):
            torch.cuda.synchronize()
        runs.append(time.perf_counter() - t0)
    return statistics.median(runs)


def many_sessions(engine, audio: np.ndarray, att: tuple[int, int], counts: list[int]) -> None:
    step_cost(engine, audio, att, 4, "pooled", 2, 1)  # warm-up
    print(f"\none step of N sessions at att_context {att} (median ms; ratio to pooled)")
    print(f"{'N':>4}  " + "  ".join(f"{k:>22}" for k in STEP_KINDS))
    for n in counts:
        costs = {k: step_cost(engine, audio, att, n, k, rounds=8, repeats=3) for k in STEP_KINDS}
        base = costs["pooled"]
        cells = [f"{costs[k] * 1000:9.2f} ms ({costs[k] / base:4.2f}x)" for k in STEP_KINDS]
        print(f"{n:>4}  " + "  ".join(f"{c:>22}" for c in cells))
    kinds = STEP_KINDS[:3]
    print(
        f"\ncache handling alone, per step, at the full 600M model's cache shapes (24 x 1024, left 56, conv 8; {engine.device})"
    )
    print(f"{'N':>4}  " + "  ".join(f"{k:>22}" for k in kinds))
    for n in counts:
        costs = {k: cache_handling_cost(24, 1024, 56, 8, n, k, str(engine.device)) for k in kinds}
        base = costs["pooled"]
        cells = [f"{costs[k] * 1000:9.2f} ms ({costs[k] / base:4.2f}x)" for k in kinds]
        print(f"{n:>4}  " + "  ".join(f"{c:>22}" for c in cells))


def one_long_session(engine, audio: np.ndarray, att: tuple[int, int], threads: int) -> None:
    chunk_s = (att[1] + 1) * engine.info.frame_shift_s
    piece = int(chunk_s * 16000)
    time_session(engine, audio[: 16000 * 10], att, piece)  # warm-up
    costs = time_session(engine, audio, att, piece)
    end = len(audio) / 16000
    early, late = window(costs, 0.5, 10.5), window(costs, end - 10, end)
    naive = naive_feature_cost(engine, audio, piece, [1.0, end - 1])
    print(
        f"stream {end:.0f} s, att_context {att}, {chunk_s * 1000:.0f} ms chunks, {len(costs)} feeds, {threads} thread(s)"
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


def main() -> None:
    import torch

    from asr.engine import Transcriber

    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="demo")
    parser.add_argument("--att-context", default="56,3")
    parser.add_argument("--minutes", type=float, default=5.0, help="length of the one long stream (0 skips it)")
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--sessions", default="1,8,32", help="session counts for the many-session step ('' skips)")
    parser.add_argument("--device", default="cpu")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    left, right = (int(v) for v in args.att_context.split(","))
    att = (left, right)
    engine = Transcriber.load(args.model, device=args.device)
    audio = long_stream(max(args.minutes * 60, 60.0))
    if args.minutes > 0:
        one_long_session(engine, audio, att, args.threads)
    if args.sessions:
        many_sessions(engine, audio, att, [int(n) for n in args.sessions.split(",")])


if __name__ == "__main__":
    main()
