"""``earmark demo``: the main job on the bundled sample corpus, scored against its references.

It runs exactly what ``earmark transcribe`` runs (Ray embedded, the demo model, Parquet out) on
the corpus manifest plus its deliberately broken files, then reads the pseudo-labels back and
prints them beside the references with the WER and the sentence-language accuracy.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from rich.console import Console
from rich.table import Table

from jobs.stages import JobSettings
from records.manifest import ManifestEntry, write_manifest
from records.pseudo_labels import PseudoLabel


@dataclass(frozen=True, slots=True)
class DemoFigures:
    wer: float
    lang_acc: float
    rtfx: float


def demo_manifest(folder: Path) -> Path:
    """The corpus manifest and its broken files as one manifest with absolute paths, without
    languages (the demo shows language detection: ``auto``)."""
    from demo.corpus import CORPUS_DIR, load_manifest

    entries = load_manifest() + load_manifest(CORPUS_DIR / "broken.jsonl")
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / "corpus.jsonl"
    path.write_bytes(write_manifest(ManifestEntry(e.audio_filepath, duration=e.duration, text=e.text) for e in entries))
    return path


def run_demo(*, out: Path, settings: JobSettings) -> DemoFigures:
    """Run ``earmark transcribe`` on the corpus (on the caller's Ray connection) and print the scored result."""
    from demo.corpus import load_manifest, sentence_langs
    from jobs.evaluate import read_labels
    from jobs.transcribe import TranscribeRequest, run_transcribe
    from records.text import word_errors

    console = Console()
    manifest = demo_manifest(out.parent / f"{out.name}-input")
    console.print(f"[bold]earmark demo[/bold]: earmark transcribe {manifest} --out {out}")
    summary = run_transcribe(
        TranscribeRequest(input=str(manifest), out=str(out), settings=settings, lines_per_shard=32)
    )
    rows = read_labels(str(out))
    refs = {e.audio_filepath: e for e in load_manifest()}

    table = Table(title=f"pseudo-labels in {out} (auto language)", show_lines=False)
    for col in ("clip", "offset", "lang", "conf", "transcript", "reference"):
        table.add_column(col, overflow="fold")
    errors = words = tags_ok = tags = 0
    by_source: dict[str, list[PseudoLabel]] = {}
    for row in rows:
        by_source.setdefault(row.source_uri, []).append(row)
    for source, ref in refs.items():
        segments = sorted(by_source.get(source, []), key=lambda r: r.offset_s)
        text = " ".join(s.text or "" for s in segments)
        e, n = word_errors(ref.text or "", text)
        errors, words = errors + e, words + n
        want = sentence_langs(ref)
        got = [lang for seg in segments for lang in seg.sentence_langs]
        tags += len(want)
        tags_ok += sum(1 for k, lang in enumerate(want) if k < len(got) and got[k] == lang)
        for seg in segments:
            langs = "+".join(dict.fromkeys(lang or "?" for lang in seg.sentence_langs)) or "-"
            table.add_row(
                "/".join(source.rsplit("/", 2)[-2:]),
                f"{seg.offset_s:.1f}",
                langs,
                f"{seg.confidence:.2f}" if seg.confidence is not None else "-",
                seg.text,
                ref.text if seg.segment_count == 1 else f"(segment {seg.segment_index + 1}/{seg.segment_count})",
                style="" if e == 0 else "yellow",
            )
    console.print(table)
    console.print("\n[bold]error rows[/bold] (each broken input became a row with its reason; nothing else was lost):")
    for row in rows:
        if not row.ok:
            console.print(f"  [dim]{row.error}[/dim]")
    wer, lang_acc = errors / max(words, 1), tags_ok / max(tags, 1)
    run = summary.this_run
    console.print(
        f"\n[bold]{summary.rows} rows ({summary.clips_ok} ok, {summary.clips_error} errors), "
        f"{summary.audio_hours * 60:.1f} min of audio; this run: {run.wall_s:.1f} s (RTFx {run.rtfx:.0f}). "
        f"WER {wer:.1%}, sentence-language accuracy {lang_acc:.1%}[/bold]"
    )
    console.print(
        f"Query it: duckdb -c \"select lang_detected, count(*) from '{out}/*.parquet' group by 1\"   "
        "Rerun the same command: nothing is transcribed twice."
    )
    console.print(
        "This is the small demo model trained on synthetic speech; point --model at the Nemotron 3.5 .nemo for real audio."
    )
    return DemoFigures(wer=wer, lang_acc=lang_acc, rtfx=run.rtfx)
