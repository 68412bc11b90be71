"""The pure parts of batch transcription: clip ids, shards of a manifest, VAD cut plans, commits."""

from __future__ import annotations

import json
import random
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from asr.vad import plan_segments
from cluster.runtime import plan_actors
from jobs.clips import InputError, count_lines, estimate_shard_bytes, plan_shards, read_shard
from jobs.commit import ShardCommitter, done_shards
from records.clips import ClipRef, clip_id
from records.pseudo_labels import SCHEMA

# -- clip identity -----------------------------------------------------------------------------


def test_a_clip_id_depends_only_on_source_offset_and_duration() -> None:
    assert clip_id("s3://b/a.flac", 60.0, 30.0) == clip_id("s3://b/a.flac", 60.0004, 30.0)
    assert clip_id("s3://b/a.flac", 60.0, 30.0) != clip_id("s3://b/a.flac", 60.0, 29.0)
    assert clip_id("s3://b/a.flac", 0.0, None) != clip_id("s3://b/a.flac", 0.0, 30.0)
    assert ClipRef("x.wav", 1.5, 2.0).clip_id == clip_id("x.wav", 1.5, 2.0)


# -- shards of a manifest -------------------------------------------------------------------------


def _manifest(tmp_path: Path, n: int, *, seed: int = 0) -> Path:
    rng = random.Random(seed)
    path = tmp_path / "m.jsonl"
    with path.open("w") as f:
        for i in range(n):
            pad = "x" * rng.randint(0, 300)  # uneven line lengths put shard edges everywhere
            f.write(json.dumps({"audio_filepath": f"a/{i}.wav", "offset": i, "duration": 1.5, "note": pad}) + "\n")
    return path


@pytest.mark.parametrize("shard_bytes", [1024, 1500, 4096, 10**6])
def test_shards_of_a_manifest_hold_every_line_exactly_once(tmp_path: Path, shard_bytes: int) -> None:
    path = _manifest(tmp_path, 400)

    shards = plan_shards(str(path), shard_bytes=shard_bytes)
    refs = [ref for shard in shards for ref in read_shard(shard, default_lang="auto")]

    assert [r.offset_s for r in refs] == [float(i) for i in range(400)]
    assert refs[7].source_uri == str(tmp_path / "a" / "7.wav")  # relative to the manifest, like NeMo
    assert refs[7].duration_s == 1.5 and refs[7].lang == "auto"


def test_shard_size_is_estimated_from_the_head_of_the_manifest(tmp_path: Path) -> None:
    path = _manifest(tmp_path, 2000)
    shards = plan_shards(str(path), shard_bytes=estimate_shard_bytes(str(path), lines_per_shard=100))
    sizes = [sum(1 for _ in read_shard(s, default_lang="auto")) for s in shards]
    assert sum(sizes) == 2000
    assert 10 <= len(shards) <= 40


def test_a_bad_manifest_line_is_an_error_the_job_can_keep(tmp_path: Path) -> None:
    path = tmp_path / "m.jsonl"
    path.write_text(
        '{"audio_filepath": "a.wav"}\nnot json at all\n{"text": "no path"}\n{"audio_filepath": "b.wav", "lang": "de-DE"}\n'
    )
    (shard,) = plan_shards(str(path), shard_bytes=10**6)

    with pytest.raises(InputError, match="not a NeMo manifest line"):
        list(read_shard(shard, default_lang="auto"))
    got = list(read_shard(shard, default_lang="auto", errors="yield"))
    assert [type(g).__name__ for g in got] == ["ClipRef", "InputError", "InputError", "ClipRef"]
    assert "byte 28" in str(got[1]) and got[3].lang == "de-DE"


def test_counting_a_manifest_sums_its_durations(tmp_path: Path) -> None:
    path = _manifest(tmp_path, 1000)
    assert count_lines(str(path)) == (1000, pytest.approx(1500.0))
    (tmp_path / "n.jsonl").write_text('{"audio_filepath": "a.wav"}\n{"audio_filepath": "b.wav", "duration": 2}')
    assert count_lines(str(tmp_path / "n.jsonl")) == (2, None)


# -- where long recordings are cut ----------------------------------------------------------------


def test_long_speech_is_grouped_into_segments_cut_in_the_middle_of_pauses() -> None:
    spans = [(0.5, 9.0), (9.3, 20.0), (20.4, 28.0), (31.0, 45.0), (45.2, 58.0)]
    segments = plan_segments(spans, total_s=60.0, max_s=30.0)

    assert segments == [(0.3, pytest.approx(28.2)), (pytest.approx(30.8), pytest.approx(58.2))]
    assert all(b - a <= 30.0 for a, b in segments)
    for start, end in spans:  # no span of speech is cut
        assert any(a <= start and end <= b for a, b in segments)


def test_a_cut_between_close_spans_falls_halfway() -> None:
    segments = plan_segments([(0.0, 20.0), (20.2, 35.0)], total_s=36.0, max_s=30.0)
    assert segments == [(0.0, pytest.approx(20.1)), (pytest.approx(20.1), pytest.approx(35.2))]


def test_no_speech_gives_no_segments_and_one_span_never_exceeds_the_limit() -> None:
    assert plan_segments([], total_s=100.0) == []
    (segment,) = plan_segments([(0.0, 29.9)], total_s=100.0, max_s=30.0)
    assert segment[1] - segment[0] <= 30.0


# -- resources ------------------------------------------------------------------------------------


def test_actor_plans_follow_the_cluster() -> None:
    assert plan_actors(actors=None, gpus_per_actor=None, cluster_cpus=16, cluster_gpus=4).actors == 4
    assert plan_actors(actors=2, gpus_per_actor=0.5, cluster_cpus=16, cluster_gpus=1).gpus_per_actor == 0.5
    cpu = plan_actors(actors=2, gpus_per_actor=None, cluster_cpus=8, cluster_gpus=0)
    assert (cpu.actors, cpu.gpus_per_actor, cpu.threads) == (2, 0.0, 4)
    # CPU actors never book every core: a decode task (1 CPU) must still fit, or the job waits
    # forever for audio (it did with --actors 2 on a 2-core laptop)
    for cores, actors in ((2, 1), (2, 2), (4, 4), (16, 16), (16, 3)):
        plan = plan_actors(actors=actors, gpus_per_actor=None, cluster_cpus=cores, cluster_gpus=0)
        assert cores - plan.actors * plan.cpus_per_actor >= 1 - 1e-9, (cores, actors, plan)
    assert plan_actors(actors=3, gpus_per_actor=None, cluster_cpus=16, cluster_gpus=0).cpus_per_actor == 1.0
    # ... nor every core of the smallest node: when the other nodes are lost, Ray restarts their
    # actors beside it, and decoding must still find a core there
    for nodes, actors in (([2, 2], 2), ([8, 2], 2), ([4, 4, 4], 3), ([1, 2, 2], 2)):
        plan = plan_actors(actors=actors, gpus_per_actor=None, cluster_cpus=sum(nodes), cluster_gpus=0, node_cpus=nodes)
        smallest = min(n for n in nodes if n >= 2)
        assert smallest - plan.actors * plan.cpus_per_actor >= 1 - 1e-9, (nodes, actors, plan)
    with pytest.raises(ValueError, match="--gpus-per-actor 0 for CPU actors"):
        plan_actors(actors=None, gpus_per_actor=1, cluster_cpus=8, cluster_gpus=0)


# -- committing shards ----------------------------------------------------------------------------


def _rows(shard: int, items: int, *, segments: int = 1, only: list[int] | None = None) -> pa.Table:
    rows = []
    for item in only if only is not None else range(items):
        for seg in range(segments):
            rows.append(
                {name: None for name in SCHEMA.names}
                | {
                    "clip_id": f"{shard}-{item}-{seg}",
                    "item_id": f"{shard}-{item}",
                    "source_uri": "x.wav",
                    "offset_s": float(seg),
                    "segment_index": seg,
                    "segment_count": segments,
                    "status": "ok",
                    "run_id": "r",
                    "created_at": 0,
                    "shard": shard,
                    "shard_items": items,
                    "item_index": item,
                }
            )
    return pa.Table.from_pylist(rows)


def test_a_shard_is_written_once_complete_and_retried_rows_are_not_duplicated(tmp_path: Path) -> None:
    out = str(tmp_path / "out")
    committer = ShardCommitter(out)

    assert committer.add(_rows(0, 3, segments=2, only=[0, 1])) == []
    assert done_shards(out) == set()
    (written,) = committer.add(pa.concat_tables([_rows(0, 3, segments=2, only=[1]), _rows(0, 3, segments=2, only=[2])]))
    assert committer.add(_rows(0, 3, segments=2, only=[2])) == []  # a retried batch after the commit

    assert done_shards(out) == {0}
    table = pq.read_table(tmp_path / "out" / "part-000000.parquet")
    assert table.schema.equals(SCHEMA, check_metadata=False)
    assert table.column("clip_id").to_pylist() == [f"0-{i}-{s}" for i in range(3) for s in range(2)]
    assert written.num_rows == 6
    assert table.schema.metadata[b"earmark.schema_version"] == b"1"
    assert not list((tmp_path / "out" / "_earmark" / "tmp").iterdir())  # no temporary left behind


def test_shards_finish_independently(tmp_path: Path) -> None:
    out = str(tmp_path / "out")
    committer = ShardCommitter(out)
    committer.add(pa.concat_tables([_rows(3, 2, only=[0]), _rows(5, 1)]))
    assert done_shards(out) == {5}
    committer.add(_rows(3, 2, only=[1]))
    assert done_shards(out) == {3, 5}
