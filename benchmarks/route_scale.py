"""Routing 1,000,000 pseudo-label rows into PostgreSQL, then routing them again.

    .venv/bin/python benchmarks/route_scale.py [--rows 1000000] [--db postgresql://postgres@127.0.0.1/postgres]

A synthetic pseudo-label table (the job's schema; 4-9 words per clip with times and
confidences, three languages, 1 % error rows) is written to Parquet in 100k-row parts, then
routed into a fresh database twice. Printed: rows/s and wall time of each pass, the decisions,
and the second pass's counts; the second pass must insert and update nothing, and a fingerprint
of the clips and tasks tables (row counts, a hash over every decision, reason and label, the
latest ``updated_at``) must be the same before and after it. The review budget (1 % of all rows)
is binding, so the over-budget path is part of the measurement.
"""

from __future__ import annotations

import argparse
import datetime as dt
import random
import sys
import tempfile
import time
import uuid
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

WORDS = {
    "es-ES": "hola amigo casa perro tiempo mundo agua noche".split(),
    "de-DE": "hallo freund haus hund zeit welt wasser nacht".split(),
    "en-US": "hello friend house dog time world water night".split(),
}


def write_table(folder: Path, rows: int, *, part_rows: int = 100_000, seed: int = 0) -> None:
    import pyarrow.parquet as pq

    from asr.results import Transcript
    from records.pseudo_labels import PseudoLabel, Segment, Sentence, Word, to_table

    rng = random.Random(seed)
    created = dt.datetime(2026, 11, 26, tzinfo=dt.UTC)
    folder.mkdir(parents=True, exist_ok=True)
    for part, start in enumerate(range(0, rows, part_rows)):
        batch = []
        for i in range(start, min(rows, start + part_rows)):
            lang = ("es-ES", "de-DE", "en-US")[i % 3]
            n = rng.randint(4, 9)
            words = [rng.choice(WORDS[lang]) for _ in range(n)]
            confs = [round(rng.betavariate(5, 1.5), 3) for _ in range(n)]
            text = " ".join(words).capitalize() + "."
            error = i % 100 == 99
            clip = f"{i:016x}"
            segment = Segment(
                clip, clip, f"s3://archive/{i // 1000}/{i}.flac", None, 0.0, round(n * 0.4, 2), 0, 1, "auto", None, None
            )
            transcript = Transcript(
                text=text,
                text_raw=f"{text} <{lang}>",
                lang_requested="auto",
                lang_detected=lang,
                sentences=(Sentence(text, lang, 0.1, n * 0.4, min(confs)),),
                words=tuple(
                    Word(w, k * 0.4, k * 0.4 + 0.3, c) for k, (w, c) in enumerate(zip(words, confs, strict=True))
                ),
                confidence=sum(confs) / n,
                duration_s=n * 0.4,
                model_id="demo@abc",
                att_context=(56, 13),
            )
            label = PseudoLabel.of(
                segment,
                None if error else transcript,
                model_id="demo@abc",
                att_context=(56, 13),
                run_id="bench-run",
                created_at=created,
                error="truncated file" if error else None,
            )
            batch.append(label)
        pq.write_table(to_table(batch), folder / f"part-{part:06d}.parquet")


def fingerprint(url: str) -> tuple:
    import psycopg

    with psycopg.connect(url) as conn:
        clips = conn.execute(
            "SELECT count(*), sum(hashtext(clip_id || decision || reasons::text || coalesce(text_raw, '') "
            "|| coalesce(run_pk, 0)::text)), max(updated_at)::text FROM clips"
        ).fetchone()
        tasks = conn.execute("SELECT count(*), sum(hashtext(clip_pk::text || state)) FROM tasks").fetchone()
    return (*clips, *tasks)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rows", type=int, default=1_000_000)
    parser.add_argument("--db", default="postgresql://postgres@127.0.0.1:5432/postgres", help="admin URL")
    args = parser.parse_args()
    import psycopg

    from labeling.ingest import route_table
    from labeling.policy import Policy
    from labeling.queue import ReviewQueue

    name = f"earmark_route_{uuid.uuid4().hex[:8]}"
    with psycopg.connect(args.db, autocommit=True) as conn:
        conn.execute(f'CREATE DATABASE "{name}"')
    url = f"{args.db.rsplit('/', 1)[0]}/{name}"
    try:
        with tempfile.TemporaryDirectory() as tmp:
            t0 = time.perf_counter()
            write_table(Path(tmp) / "labels", args.rows)
            print(f"wrote {args.rows:,d} rows of pseudo-labels in {time.perf_counter() - t0:.0f} s", flush=True)
            queue = ReviewQueue.connect(url)
            policy = Policy(confidence={"default": 0.6}, max_fraction=0.01)
            prints = []
            for label in ("first routing", "routing again"):
                t0 = time.perf_counter()
                report = route_table(queue, "bench", str(Path(tmp) / "labels"), policy)
                wall = time.perf_counter() - t0
                print(
                    f"{label}: {report.rows:,d} rows in {wall:.0f} s ({report.rows / wall:,.0f} rows/s); inserted "
                    f"{report.inserted:,d}, updated {report.updated:,d}, unchanged {report.unchanged:,d}, "
                    f"tasks created {report.tasks_created:,d}; decisions {report.decisions}",
                    flush=True,
                )
                prints.append(fingerprint(url))
            same = prints[0] == prints[1]
            print(f"tables after each pass: {prints[0]} / {prints[1]} -> {'unchanged' if same else 'CHANGED'}")
            if not same or report.inserted or report.updated or report.tasks_created:
                raise SystemExit("routing the same table again changed the database")
    finally:
        with psycopg.connect(args.db, autocommit=True) as conn:
            conn.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')


if __name__ == "__main__":
    main()
