"""cluster.storage against local folders and a real S3 server (SeaweedFS on loopback)."""

from __future__ import annotations

import pickle
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from cluster.storage import (
    StorageError,
    StorageOptions,
    download_file,
    exists,
    is_remote,
    list_files,
    localize,
    pyarrow_filesystem,
    read_bytes,
    s3_client,
    size,
    upload_file,
    write_bytes,
)
from tests.s3server import S3Server

# -- local files -----------------------------------------------------------------------------


def test_a_local_file_round_trips_through_write_and_read(tmp_path: Path) -> None:
    uri = str(tmp_path / "new" / "folder" / "clip.bin")

    write_bytes(uri, b"hello world")

    assert read_bytes(uri) == b"hello world"
    assert read_bytes(f"file://{uri}", offset=6, length=5) == b"world"
    assert read_bytes(uri, offset=6) == b"world"
    assert exists(uri) and size(uri) == 11
    assert not exists(str(tmp_path / "absent.bin"))
    assert not is_remote(uri) and is_remote("s3://bucket/key")
    assert [p.name for p in (tmp_path / "new" / "folder").iterdir()] == ["clip.bin"]  # no temp files left


def test_a_missing_local_file_is_a_storage_error_that_names_it(tmp_path: Path) -> None:
    missing = str(tmp_path / "absent.wav")

    for call in (lambda: read_bytes(missing), lambda: size(missing), lambda: localize(missing)):
        with pytest.raises(StorageError, match=r"absent\.wav: no such file; check the path"):
            call()
    with pytest.raises(StorageError, match="no such folder"):
        list_files(str(tmp_path / "absent"))


def test_a_storage_error_survives_pickling_between_processes() -> None:
    error = pickle.loads(pickle.dumps(StorageError("s3://b/k", "no such object; check the bucket and key")))

    assert isinstance(error, StorageError) and error.uri == "s3://b/k"
    assert str(error) == "s3://b/k: no such object; check the bucket and key"


def test_localize_returns_a_local_path_unchanged(tmp_path: Path) -> None:
    clip = tmp_path / "clip.wav"
    clip.write_bytes(b"RIFF")

    assert localize(str(clip)) == clip
    assert localize(f"file://{clip}") == clip


def test_local_listing_walks_folders_in_sorted_order_and_filters_by_suffix(tmp_path: Path) -> None:
    for name in ("b/2.wav", "b/1.flac", "a.WAV", "c.txt", "b/deeper/0.wav"):
        write_bytes(str(tmp_path / name), b"x")

    listed = list_files(str(tmp_path), suffixes=(".wav", ".flac"))

    relative = [Path(p).relative_to(tmp_path).as_posix() for p in listed]
    assert relative == ["a.WAV", "b/1.flac", "b/2.wav", "b/deeper/0.wav"]


# -- S3 --------------------------------------------------------------------------------------


def test_an_s3_object_round_trips_with_range_reads_exists_and_size(s3_server: S3Server, s3_bucket: str) -> None:
    options = s3_server.options()
    uri = f"s3://{s3_bucket}/audio/clip.bin"

    write_bytes(uri, b"0123456789", options)

    assert read_bytes(uri, options) == b"0123456789"
    assert read_bytes(uri, options, offset=3, length=4) == b"3456"
    assert read_bytes(uri, options, offset=7) == b"789"
    assert read_bytes(uri, options, length=2) == b"01"
    assert exists(uri, options) and size(uri, options) == 10
    assert not exists(f"s3://{s3_bucket}/audio/other.bin", options)


def test_listing_s3_streams_page_by_page_over_more_than_a_thousand_objects(s3_server: S3Server, s3_bucket: str) -> None:
    options = s3_server.options()
    client = s3_server.client()
    keys = [f"clips/{i:04d}.wav" for i in range(1100)] + [f"clips/{i:04d}.txt" for i in range(100)]
    keys += ["clips-elsewhere/0.wav"]  # shares the prefix string, not the folder
    with ThreadPoolExecutor(max_workers=8) as pool:
        list(pool.map(lambda key: client.put_object(Bucket=s3_bucket, Key=key, Body=b"x"), keys))

    with count_requests(options, "ListObjectsV2") as requests:
        listed = list_files(f"s3://{s3_bucket}/clips", options, suffixes=[".wav"])
        first = next(listed)
        requests_for_first = requests[0]
        rest = list(listed)

    assert requests_for_first == 1  # one page fetched, not the whole listing
    assert requests[0] == 2
    assert [first, *rest] == [f"s3://{s3_bucket}/clips/{i:04d}.wav" for i in range(1100)]


def test_localize_downloads_an_object_once_and_again_after_it_changes(
    s3_server: S3Server, s3_bucket: str, tmp_path: Path
) -> None:
    options = s3_server.options()
    uri = f"s3://{s3_bucket}/models/model.nemo"
    write_bytes(uri, b"version 1", options)

    with count_requests(options, "GetObject") as downloads:
        first = localize(uri, options, cache_dir=tmp_path)
        again = localize(uri, options, cache_dir=tmp_path)
        assert downloads[0] == 1
        assert again == first and first.read_bytes() == b"version 1"
        assert first.name == "model.nemo"

        write_bytes(uri, b"version 2", options)
        changed = localize(uri, options, cache_dir=tmp_path)

    assert downloads[0] == 2
    assert changed != first and changed.read_bytes() == b"version 2"


def test_localize_never_leaves_a_partial_file_when_a_download_fails(
    s3_server: S3Server, s3_bucket: str, tmp_path: Path
) -> None:
    options = s3_server.options()
    uri = f"s3://{s3_bucket}/models/model.nemo"
    write_bytes(uri, b"x" * 100_000, options)

    with break_downloads_midway(options), pytest.raises(StorageError, match="S3 transfer failed: simulated crash"):
        localize(uri, options, cache_dir=tmp_path)
    with pytest.raises(StorageError, match="no such object"):
        localize(f"s3://{s3_bucket}/models/absent.nemo", options, cache_dir=tmp_path)

    assert [p for p in tmp_path.rglob("*") if p.is_file()] == []
    assert localize(uri, options, cache_dir=tmp_path).read_bytes() == b"x" * 100_000


def test_upload_and_download_copy_files_both_ways(s3_server: S3Server, s3_bucket: str, tmp_path: Path) -> None:
    source = tmp_path / "model.nemo"
    source.write_bytes(b"weights" * 1000)
    uri = f"s3://{s3_bucket}/models/demo/model.nemo"

    upload_file(source, uri, s3_server.options())
    copy = download_file(uri, tmp_path / "back" / "model.nemo", s3_server.options())

    assert copy.read_bytes() == source.read_bytes()
    assert download_file(str(source), tmp_path / "local-copy.nemo").read_bytes() == source.read_bytes()


def test_missing_objects_and_buckets_raise_storage_errors_that_say_what_to_check(
    s3_server: S3Server, s3_bucket: str
) -> None:
    options = s3_server.options()

    with pytest.raises(StorageError, match=rf"s3://{s3_bucket}/absent.wav: no such object; check the bucket and key"):
        read_bytes(f"s3://{s3_bucket}/absent.wav", options)
    with pytest.raises(StorageError, match="no such object"):
        size(f"s3://{s3_bucket}/absent.wav", options)
    with pytest.raises(StorageError, match="no such bucket 'no-such-bucket-here'; check the bucket name or create it"):
        read_bytes("s3://no-such-bucket-here/a.wav", options)
    with pytest.raises(StorageError, match="no such bucket"):
        list(list_files("s3://no-such-bucket-here/audio", options))
    with pytest.raises(StorageError, match="write s3://bucket/key"):
        read_bytes("s3://bucket-only", options)


def test_wrong_credentials_raise_a_storage_error_that_names_the_fix(s3_server: S3Server, s3_bucket: str) -> None:
    uri = f"s3://{s3_bucket}/clip.wav"
    write_bytes(uri, b"RIFF", s3_server.options())
    wrong_secret = StorageOptions(s3_server.endpoint_url, "us-east-1", s3_server.access_key, "not-the-secret")
    unknown_key = StorageOptions(s3_server.endpoint_url, "us-east-1", "nobody", "nothing")

    for options in (wrong_secret, unknown_key):
        with pytest.raises(StorageError, match="access denied .*set AWS_ACCESS_KEY_ID/AWS_SECRET_ACCESS_KEY"):
            read_bytes(uri, options)
        with pytest.raises(StorageError, match="access denied"):
            exists(uri, options)  # not a quiet False
        with pytest.raises(StorageError, match="access denied"):
            list(list_files(f"s3://{s3_bucket}/", options))


def test_parquet_round_trips_through_the_pyarrow_filesystem_on_s3(s3_server: S3Server, s3_bucket: str) -> None:
    table = pa.table({"clip_id": ["a", "b"], "duration_s": [1.5, 2.0]})
    fs, path = pyarrow_filesystem(f"s3://{s3_bucket}/labels/part-0.parquet", s3_server.options())

    pq.write_table(table, path, filesystem=fs)

    assert pq.read_table(path, filesystem=fs).equals(table)
    assert read_bytes(f"s3://{s3_bucket}/labels/part-0.parquet", s3_server.options())[:4] == b"PAR1"


def test_pyarrow_filesystem_gives_local_paths_for_local_uris(tmp_path: Path) -> None:
    fs, path = pyarrow_filesystem(f"file://{tmp_path}/part-0.parquet")

    pq.write_table(pa.table({"x": [1]}), path, filesystem=fs)

    assert path == str(tmp_path / "part-0.parquet") and pq.read_table(path).num_rows == 1


def test_storage_options_come_from_the_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("EARMARK_S3_ENDPOINT_URL", raising=False)
    monkeypatch.setenv("AWS_ENDPOINT_URL", "http://aws-fallback:9000")
    monkeypatch.setenv("EARMARK_S3_REGION", "eu-central-1")
    assert StorageOptions.from_env().endpoint_url == "http://aws-fallback:9000"

    monkeypatch.setenv("EARMARK_S3_ENDPOINT_URL", "http://minio:9000")
    monkeypatch.setenv("EARMARK_S3_SECRET_ACCESS_KEY", "hidden")
    options = StorageOptions.from_env()

    assert (options.endpoint_url, options.region) == ("http://minio:9000", "eu-central-1")
    assert "hidden" not in repr(options)


# -- helpers ---------------------------------------------------------------------------------


@contextmanager
def count_requests(options: StorageOptions, operation: str) -> Iterator[list[int]]:
    """Count the storage layer's S3 requests of one kind; the count is ``[n]``, live."""
    count = [0]

    def bump(**_: Any) -> None:
        count[0] += 1

    events = s3_client(options).meta.events
    events.register(f"before-call.s3.{operation}", bump)
    try:
        yield count
    finally:
        events.unregister(f"before-call.s3.{operation}", bump)


class _BreaksHalfway:
    def __init__(self, body: Any) -> None:
        self.body, self.served = body, 0

    def read(self, amt: int | None = None) -> bytes:
        if self.served:
            raise ConnectionAbortedError("simulated crash halfway through a download")
        chunk = self.body.read(1000)
        self.served += len(chunk)
        return chunk


@contextmanager
def break_downloads_midway(options: StorageOptions) -> Iterator[None]:
    """Make every GetObject body fail after its first kilobyte."""

    def swap_body(parsed: dict[str, Any], **_: Any) -> None:
        parsed["Body"] = _BreaksHalfway(parsed["Body"])

    events = s3_client(options).meta.events
    events.register("after-call.s3.GetObject", swap_body)
    try:
        yield
    finally:
        events.unregister("after-call.s3.GetObject", swap_body)


# -- outages: transient faults are retried for the budget -------------------------------------


def _restart_after(server: S3Server, seconds: float) -> ThreadPoolExecutor:
    import time

    pool = ThreadPoolExecutor(1)
    pool.submit(lambda: (time.sleep(seconds), server.start()))
    return pool


@pytest.mark.slow
def test_reads_writes_and_parquet_parts_ride_out_an_outage_of_the_store(
    s3_outage_server: S3Server, monkeypatch: pytest.MonkeyPatch
) -> None:
    from cluster.retry import RETRIES
    from cluster.storage import pyarrow_call

    options = s3_outage_server.options()
    s3_outage_server.client().create_bucket(Bucket="outage")
    write_bytes("s3://outage/a.bin", b"before", options)
    monkeypatch.setenv("EARMARK_RETRY_BUDGET_S", "60")
    fs, root = pyarrow_filesystem("s3://outage/parts", options)
    table = pa.table({"x": [1, 2, 3]})
    before = RETRIES.value

    s3_outage_server.stop()
    with _restart_after(s3_outage_server, 4):
        assert read_bytes("s3://outage/a.bin", options) == b"before"  # waits for the server
    s3_outage_server.stop()
    with _restart_after(s3_outage_server, 4):
        pyarrow_call("s3://outage/parts/p.parquet", lambda: pq.write_table(table, f"{root}/p.parquet", filesystem=fs))
    s3_outage_server.stop()
    with _restart_after(s3_outage_server, 4):
        write_bytes("s3://outage/b.bin", b"after", options)
        assert sorted(list_files("s3://outage", options, suffixes=(".bin",))) == [
            "s3://outage/a.bin",
            "s3://outage/b.bin",
        ]

    assert pq.read_table(f"{root}/p.parquet", filesystem=fs).equals(table)
    assert RETRIES.value - before >= 3


@pytest.mark.slow
def test_an_outage_longer_than_the_budget_is_one_transient_error_naming_the_endpoint(
    s3_outage_server: S3Server, monkeypatch: pytest.MonkeyPatch
) -> None:
    import time

    from cluster.storage import pyarrow_call

    options = s3_outage_server.options()
    s3_outage_server.client().create_bucket(Bucket="down")
    fs, root = pyarrow_filesystem("s3://down/parts", options)
    monkeypatch.setenv("EARMARK_RETRY_BUDGET_S", "3")
    s3_outage_server.stop()

    started = time.monotonic()
    with pytest.raises(StorageError, match=r"cannot reach http://127\.0\.0\.1:\d+.*gave up after \d+ tries") as read:
        read_bytes("s3://down/a.bin", options)
    with pytest.raises(StorageError, match=r"s3://down/parts/p\.parquet: cannot reach the store") as write:
        pyarrow_call(
            "s3://down/parts/p.parquet",
            lambda: pq.write_table(pa.table({"x": [1]}), f"{root}/p.parquet", filesystem=fs),
        )

    assert read.value.transient and write.value.transient
    assert pickle.loads(pickle.dumps(read.value)).transient  # survives the trip from a Ray worker
    assert time.monotonic() - started < 60
    s3_outage_server.start()
    with pytest.raises(StorageError, match="no such object") as missing:
        read_bytes("s3://down/absent.bin", options)
    assert not missing.value.transient  # a missing key fails at once, it is never retried
