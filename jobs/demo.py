"""``earmark demo``: transcribe the bundled sample corpus and score it against its references."""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import Any

from rich.console import Console
from rich.table import Table


def run_demo(
    *,
    model_spec: str,
    device: str | None,
    att_context: tuple[int, int] | None,
    engine_loader: Callable[[str, str | None], Any],
) -> dict[str, float]:
    from asr.audio import AudioError, decode_audio
    from asr.demo.corpus import CORPUS_DIR, load_manifest
    from asr.engine import TranscribeOptions
    from asr.text import normalize_for_wer, word_errors

    console = Console()
    rows = load_manifest()
    console.print(f"[bold]earmark demo[/bold]: {len(rows)} clips from {CORPUS_DIR}")
    t0 = time.perf_counter()
    engine = engine_loader(model_spec, device)
    console.print(
        f"model {engine.model_id} loaded in {time.perf_counter() - t0:.1f} s; locales: {', '.join(engine.info.locales)}"
    )

    audios = [decode_audio(r["audio_filepath"]) for r in rows]
    t1 = time.perf_counter()
    results = engine.transcribe(audios, options=TranscribeOptions(lang="auto", att_context=att_context))
    wall = time.perf_counter() - t1
    audio_s = sum(len(a) for a in audios) / engine.info.sample_rate

    table = Table(title="transcripts (auto language)", show_lines=False)
    for col in ("clip", "lang", "conf", "transcript", "reference"):
        table.add_column(col, overflow="fold")
    errors = words = 0
    tags_ok = tags = 0
    for row, res in zip(rows, results, strict=True):
        e, n = word_errors(normalize_for_wer(row["text"]), normalize_for_wer(res.text))
        errors, words = errors + e, words + n
        ref_langs = [s["lang"] for s in row["sentences"]] if "sentences" in row else row["langs"]
        got = [s.lang for s in res.sentences]
        tags += len(ref_langs)
        tags_ok += sum(1 for k, lang in enumerate(ref_langs) if k < len(got) and got[k] == lang)
        name = row["audio_filepath"].rsplit("/", 2)[-2:]
        langs = "+".join(dict.fromkeys(s.lang or "?" for s in res.sentences)) or "-"
        style = "" if e == 0 else "yellow"
        table.add_row("/".join(name), langs, f"{res.confidence:.2f}", res.text, row["text"], style=style)
    console.print(table)

    broken = load_manifest(CORPUS_DIR / "broken.jsonl")
    console.print("\n[bold]broken files[/bold] (each rejected with a reason, nothing else lost):")
    for row in broken:
        try:
            decode_audio(row["audio_filepath"])
            console.print(f"  {row['audio_filepath']}: [red]accepted?![/red]")
        except AudioError as exc:
            console.print(f"  [dim]{exc}[/dim]")

    wer = errors / max(words, 1)
    lang_acc = tags_ok / max(tags, 1)
    console.print(
        f"\n[bold]{len(rows)} clips, {audio_s / 60:.1f} min of audio in {wall:.1f} s "
        f"(RTFx {audio_s / wall:.0f})  WER {wer:.1%}  sentence-language accuracy {lang_acc:.1%}[/bold]"
    )
    console.print(
        "This is the small demo model trained on synthetic speech; point --model at the Nemotron 3.5 .nemo for real audio."
    )
    return {"wer": wer, "lang_acc": lang_acc, "rtfx": audio_s / wall}
