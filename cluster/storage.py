"""Reading and writing bytes at a URI: local paths (plain or ``file://``) and ``s3://bucket/key``.

This is earmark's one storage layer; it imports no Ray, so the review app can use it too.
S3 means any S3-compatible store: set ``EARMARK_S3_ENDPOINT_URL`` (or pass ``StorageOptions``)
for MinIO, SeaweedFS, Ceph and the like; credentials come from boto3's usual chain
(``AWS_ACCESS_KEY_ID``/``AWS_SECRET_ACCESS_KEY``, ``~/.aws``, an instance role) unless given.

>>> opts = StorageOptions(endpoint_url="http://127.0.0.1:8333")       # doctest: +SKIP
>>> write_bytes("s3://audio/a/hello.txt", b"hello", opts)             # doctest: +SKIP
>>> read_bytes("s3://audio/a/hello.txt", opts, offset=1, length=3)    # doctest: +SKIP
b'ell'
>>> list(list_files("s3://audio/a", opts, suffixes=(".txt",)))        # doctest: +SKIP
['s3://audio/a/hello.txt']
>>> localize("s3://audio/a/hello.txt", opts)                          # doctest: +SKIP
PosixPath('/home/me/.cache/earmark/s3/audio/2c7c3d5f244f1a40-5d41402abc4b2a76b9719d911017c592/hello.txt')

Every failure is a ``StorageError`` (an ``OSError``) that names the URI, what went wrong and
what to do about it. Transient faults of S3 (a refused connection, a timeout, a 5xx, throttling)
are retried with backoff for up to :func:`cluster.retry.budget_s` seconds before they become a
``StorageError`` with ``transient=True``; see :mod:`cluster.retry`.
"""

from __future__ import annotations

import functools
import hashlib
import os
import shutil
import tempfile
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, TypeVar
from urllib.parse import urlparse
from urllib.request import url2pathname

from cluster import retry

if TYPE_CHECKING:
    import pyarrow.fs

_T = TypeVar("_T")

_CREDENTIALS_HINT = "set AWS_ACCESS_KEY_ID/AWS_SECRET_ACCESS_KEY or EARMARK_S3_ENDPOINT_URL"
_ACCESS_CODES = {"403", "AccessDenied", "InvalidAccessKeyId", "SignatureDoesNotMatch", "ExpiredToken"}
#: HEAD requests carry no body, so a missing key or bucket shows up as a bare "404".
_MISSING_CODES = {"404", "NotFound", "NoSuchKey", "NoSuchBucket"}


class StorageError(OSError):
    """A URI could not be read or written; the message says which, why and what to do.

    ``transient`` is True when the store could not be reached (after retrying for the budget):
    the same call may succeed later, and a job that stops on it can be rerun to resume.
    """

    def __init__(self, uri: str, problem: str, transient: bool = False) -> None:
        super().__init__(f"{uri}: {problem}")
        self.uri, self.problem, self.transient = uri, problem, transient

    def __reduce__(self) -> tuple[type[StorageError], tuple[str, str, bool]]:
        # survives pickling (Ray ships errors between processes)
        return StorageError, (self.uri, self.problem, self.transient)


@dataclass(frozen=True, slots=True)
class StorageOptions:
    """How to reach S3. Every field left ``None`` falls back to boto3's own defaults."""

    #: An S3-compatible endpoint such as ``http://127.0.0.1:8333``; ``None`` means AWS.
    endpoint_url: str | None = None
    region: str | None = None
    #: Explicit keys; ``None`` uses boto3's credential chain (env vars, ~/.aws, instance role).
    access_key_id: str | None = None
    secret_access_key: str | None = field(default=None, repr=False)

    @classmethod
    def from_env(cls) -> StorageOptions:
        """Options from ``EARMARK_S3_ENDPOINT_URL`` (else ``AWS_ENDPOINT_URL``), ``EARMARK_S3_REGION``,
        ``EARMARK_S3_ACCESS_KEY_ID`` and ``EARMARK_S3_SECRET_ACCESS_KEY``."""
        env = os.environ
        return cls(
            endpoint_url=env.get("EARMARK_S3_ENDPOINT_URL") or env.get("AWS_ENDPOINT_URL") or None,
            region=env.get("EARMARK_S3_REGION") or None,
            access_key_id=env.get("EARMARK_S3_ACCESS_KEY_ID") or None,
            secret_access_key=env.get("EARMARK_S3_SECRET_ACCESS_KEY") or None,
        )


def is_remote(uri: str) -> bool:
    """True for ``s3://`` URIs, False for local paths."""
    return uri.startswith("s3://")


def read_bytes(
    uri: str, options: StorageOptions | None = None, *, offset: int | None = None, length: int | None = None
) -> bytes:
    """The bytes at ``uri``, or ``length`` bytes from ``offset`` (a ranged GET on S3)."""
    if length == 0:
        return b""
    start = offset or 0
    if not is_remote(uri):
        with _local_errors(uri), open(_local_path(uri), "rb") as f:
            f.seek(start)
            return f.read() if length is None else f.read(length)
    bucket, key = _split_s3(uri)
    extra: dict[str, str] = {}
    if offset is not None or length is not None:
        end = "" if length is None else str(start + length - 1)
        extra["Range"] = f"bytes={start}-{end}"
    body: bytes = _s3(
        uri, bucket, lambda: s3_client(options).get_object(Bucket=bucket, Key=key, **extra)["Body"].read()
    )
    return body


def write_bytes(uri: str, data: bytes, options: StorageOptions | None = None) -> None:
    """Write ``data`` to ``uri``; local files are replaced atomically and parent folders created."""
    if not is_remote(uri):
        path = _local_path(uri)
        with _local_errors(uri):
            path.parent.mkdir(parents=True, exist_ok=True)
            with _atomic_target(path) as tmp:
                tmp.write_bytes(data)
        return
    bucket, key = _split_s3(uri)
    _s3(uri, bucket, lambda: s3_client(options).put_object(Bucket=bucket, Key=key, Body=data))


def exists(uri: str, options: StorageOptions | None = None) -> bool:
    """Whether a file (not a folder) exists at ``uri``. Access errors still raise."""
    if not is_remote(uri):
        return _local_path(uri).is_file()
    from botocore.exceptions import ClientError

    bucket, key = _split_s3(uri)

    def head() -> bool:
        try:
            s3_client(options).head_object(Bucket=bucket, Key=key)
        except ClientError as e:
            if _error_code(e) in _MISSING_CODES:
                return False
            raise
        return True

    return _s3(uri, bucket, head)


def size(uri: str, options: StorageOptions | None = None) -> int:
    """Size in bytes of the file at ``uri``."""
    if not is_remote(uri):
        with _local_errors(uri):
            return _local_path(uri).stat().st_size
    return int(_head(uri, options)["ContentLength"])


def list_files(
    uri_prefix: str, options: StorageOptions | None = None, *, suffixes: Sequence[str] | None = None
) -> Iterator[str]:
    """Stream every file under the folder ``uri_prefix``, in sorted order.

    ``s3://b/audio`` lists ``s3://b/audio/...`` (not ``s3://b/audio2/...``). S3 listings are
    read one page (1,000 keys) at a time; local folders are walked with ``os.scandir``, each
    folder sorted by name. ``suffixes`` keeps names ending in one of them, case-insensitively
    (``(".wav", ".flac")``). Local files come back as plain paths, S3 objects as ``s3://`` URIs.
    """
    wanted = tuple(s.lower() for s in suffixes) if suffixes else None
    if is_remote(uri_prefix):
        names = _list_s3(uri_prefix, options)
    else:
        root = _local_path(uri_prefix)
        if not root.is_dir():
            raise StorageError(uri_prefix, "no such folder; check the path")
        names = _walk_sorted(str(root))
    return (name for name in names if wanted is None or name.lower().endswith(wanted))


def remove_tree(uri_prefix: str, options: StorageOptions | None = None) -> int:
    """Delete the folder ``uri_prefix`` and everything under it; returns how many files went."""
    if not is_remote(uri_prefix):
        root = _local_path(uri_prefix)
        if not root.exists():
            return 0
        count = sum(1 for p in root.rglob("*") if p.is_file())
        with _local_errors(uri_prefix):
            shutil.rmtree(root)
        return count
    bucket, _ = _split_s3(uri_prefix, key_required=False)
    keys = [uri[len(f"s3://{bucket}/") :] for uri in list_files(uri_prefix, options)]
    for start in range(0, len(keys), 1000):  # DeleteObjects takes 1,000 keys a request
        batch = {"Objects": [{"Key": k} for k in keys[start : start + 1000]], "Quiet": True}
        _s3(uri_prefix, bucket, functools.partial(s3_client(options).delete_objects, Bucket=bucket, Delete=batch))
    return len(keys)


def upload_file(path: str | os.PathLike[str], uri: str, options: StorageOptions | None = None) -> None:
    """Copy the local file ``path`` to ``uri`` (multipart for large files on S3)."""
    if not Path(path).is_file():
        raise StorageError(str(path), "no such file; check the path")
    if not is_remote(uri):
        download_file(os.fspath(path), _local_path(uri))  # a local copy, just as atomic
        return
    bucket, key = _split_s3(uri)
    _s3(uri, bucket, lambda: s3_client(options).upload_file(os.fspath(path), bucket, key))


def download_file(uri: str, path: str | os.PathLike[str], options: StorageOptions | None = None) -> Path:
    """Copy ``uri`` to the local file ``path`` atomically (no half-written ``path`` on failure)."""
    target = Path(path)
    target.parent.mkdir(parents=True, exist_ok=True)
    with _atomic_target(target) as tmp:
        if not is_remote(uri):
            with _local_errors(uri):
                shutil.copyfile(_local_path(uri), tmp)
        else:
            bucket, key = _split_s3(uri)
            _s3(uri, bucket, lambda: s3_client(options).download_file(bucket, key, str(tmp)))
    return target


def localize(
    uri: str, options: StorageOptions | None = None, *, cache_dir: str | os.PathLike[str] | None = None
) -> Path:
    """A local path holding the bytes of ``uri``, for tools that only read files.

    Local paths come back unchanged. S3 objects are downloaded once into ``cache_dir``
    (default ``$EARMARK_CACHE_DIR/s3``, else ``~/.cache/earmark/s3``), in a folder named after
    the key and its ETag: an unchanged object is not fetched again, a changed one is.
    """
    if not is_remote(uri):
        path = _local_path(uri)
        if not path.exists():
            raise StorageError(uri, "no such file; check the path")
        return path
    bucket, key = _split_s3(uri)
    name = key.rsplit("/", 1)[-1]
    if not name:
        raise StorageError(uri, "is a folder, not an object; name a key such as s3://bucket/models/model.nemo")
    etag = str(_head(uri, options)["ETag"]).strip('"')
    key_digest = hashlib.sha256(key.encode()).hexdigest()[:16]
    target = _default_cache_dir() if cache_dir is None else Path(cache_dir)
    target = target / bucket / f"{key_digest}-{etag}" / name
    if target.is_file():
        return target
    download_file(uri, target, options)
    # The object may have been replaced between our HEAD and the download; never file new bytes
    # under the old ETag.
    if str(_head(uri, options)["ETag"]).strip('"') != etag:
        target.unlink(missing_ok=True)
        raise StorageError(uri, "the object changed while it was being downloaded; try again")
    return target


def pyarrow_filesystem(uri: str, options: StorageOptions | None = None) -> tuple[pyarrow.fs.FileSystem, str]:
    """A pyarrow filesystem and the path inside it for ``uri`` (for Parquet writers and Ray Data).

    >>> fs, path = pyarrow_filesystem("s3://labels/run1/part-0.parquet")   # doctest: +SKIP
    >>> path                                                                # doctest: +SKIP
    'labels/run1/part-0.parquet'
    """
    import pyarrow.fs

    if not is_remote(uri):
        return pyarrow.fs.LocalFileSystem(), str(_local_path(uri).absolute())
    bucket, key = _split_s3(uri, key_required=False)
    opts = options or StorageOptions.from_env()
    kwargs: dict[str, Any] = {"region": opts.region}
    if opts.endpoint_url:
        parsed = urlparse(opts.endpoint_url)
        kwargs["endpoint_override"] = parsed.netloc or opts.endpoint_url
        kwargs["scheme"] = parsed.scheme or "https"
    if opts.access_key_id:
        kwargs["access_key"] = opts.access_key_id
        kwargs["secret_key"] = opts.secret_access_key
    # pyarrow's own retries absorb a dropped packet; an outage is ridden out by pyarrow_call
    kwargs["retry_strategy"] = pyarrow.fs.AwsStandardS3RetryStrategy(max_attempts=3)
    kwargs["connect_timeout"] = 5.0
    kwargs["request_timeout"] = 60.0
    return pyarrow.fs.S3FileSystem(**kwargs), f"{bucket}/{key}".rstrip("/")


def pyarrow_call(uri: str, fn: Callable[[], _T]) -> _T:
    """``fn()``, a pyarrow filesystem operation on ``uri`` (a Parquet write, a listing), with
    transient faults retried for the budget; failures become ``StorageError``."""

    def once() -> _T:
        try:
            return fn()
        except FileNotFoundError as e:
            raise StorageError(uri, "no such file or folder; check the path") from e
        except OSError as e:
            if isinstance(e, StorageError):
                raise
            first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
            if retry.is_transient(e):
                raise StorageError(uri, f"cannot reach the store ({first})", transient=True) from e
            raise StorageError(uri, first) from e

    return _retried(uri, once)


def s3_client(options: StorageOptions | None = None) -> Any:
    """The boto3 S3 client for ``options`` (``from_env()`` when ``None``), created once per options."""
    return _client_for(options or StorageOptions.from_env())


@functools.lru_cache(maxsize=16)
def _client_for(options: StorageOptions) -> Any:
    import boto3
    from botocore.config import Config

    # botocore's own retries absorb a dropped packet; an outage is ridden out by cluster.retry
    config: dict[str, Any] = {"retries": {"max_attempts": 3, "mode": "standard"}, "connect_timeout": 5}
    if options.endpoint_url:
        # S3-compatible servers rarely have per-bucket DNS names, and some reject the streaming
        # checksums that newer botocore sends by default.
        config["s3"] = {"addressing_style": "path"}
        config["request_checksum_calculation"] = "when_required"
        config["response_checksum_validation"] = "when_required"
    session = boto3.session.Session()
    return session.client(
        "s3",
        endpoint_url=options.endpoint_url,
        region_name=options.region,
        aws_access_key_id=options.access_key_id,
        aws_secret_access_key=options.secret_access_key,
        config=Config(**config),
    )


def _split_s3(uri: str, *, key_required: bool = True) -> tuple[str, str]:
    parsed = urlparse(uri)
    bucket, key = parsed.netloc, uri[len(f"s3://{parsed.netloc}/") :]
    if not bucket or (key_required and not key):
        raise StorageError(uri, "not a full S3 URI; write s3://bucket/key")
    return bucket, key


def _local_path(uri: str) -> Path:
    if uri.startswith("file://"):
        return Path(url2pathname(urlparse(uri).path))
    if "://" in uri:
        raise StorageError(uri, "unsupported scheme; use a local path, file:// or s3://bucket/key")
    return Path(uri)


def _default_cache_dir() -> Path:
    root = os.environ.get("EARMARK_CACHE_DIR")
    return Path(root) / "s3" if root else Path.home() / ".cache" / "earmark" / "s3"


def _head(uri: str, options: StorageOptions | None) -> dict[str, Any]:
    bucket, key = _split_s3(uri)
    head: dict[str, Any] = _s3(uri, bucket, lambda: s3_client(options).head_object(Bucket=bucket, Key=key))
    return head


def _s3(uri: str, bucket: str, fn: Callable[[], _T]) -> _T:
    """``fn()``, one boto3 call about ``uri``: errors become ``StorageError``, transient ones
    after retrying for the budget."""

    def once() -> _T:
        with _s3_errors(uri, bucket):
            return fn()

    return _retried(uri, once)


def _retried(uri: str, once: Callable[[], _T]) -> _T:
    try:
        return retry.call(once, what=uri)
    except StorageError as e:
        if not e.transient or not getattr(e, "retry_attempts", 0):
            raise
        tries, seconds = e.retry_attempts, e.retry_seconds  # type: ignore[attr-defined]
        raise StorageError(e.uri, f"{e.problem} (gave up after {tries} tries in {seconds:.0f} s)", True) from e


def _list_s3(uri_prefix: str, options: StorageOptions | None) -> Iterator[str]:
    bucket, prefix = _split_s3(uri_prefix, key_required=False)
    if prefix and not prefix.endswith("/"):
        prefix += "/"
    token: dict[str, str] = {}
    while True:  # one request per page of 1,000 keys, made only when the previous page is used up
        request = {"Bucket": bucket, "Prefix": prefix, **token}
        page = _s3(uri_prefix, bucket, functools.partial(s3_client(options).list_objects_v2, **request))
        for item in page.get("Contents", ()):
            yield f"s3://{bucket}/{item['Key']}"
        if not page.get("IsTruncated"):
            return
        token = {"ContinuationToken": page["NextContinuationToken"]}


def _walk_sorted(folder: str) -> Iterator[str]:
    with os.scandir(folder) as it:
        entries = sorted(it, key=lambda e: e.name)
    for entry in entries:
        if entry.is_dir():
            yield from _walk_sorted(entry.path)
        elif entry.is_file():
            yield entry.path


@contextmanager
def _atomic_target(path: Path) -> Iterator[Path]:
    """A temporary path beside ``path`` that replaces it on success and vanishes on failure."""
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".part")
    os.close(fd)
    try:
        yield Path(tmp)
        os.replace(tmp, path)
    finally:
        Path(tmp).unlink(missing_ok=True)


@contextmanager
def _local_errors(uri: str) -> Iterator[None]:
    """Turn OSErrors about a local path into StorageErrors that say what to do."""
    try:
        yield
    except StorageError:
        raise
    except FileNotFoundError as e:
        raise StorageError(uri, "no such file; check the path") from e
    except PermissionError as e:
        raise StorageError(uri, "permission denied; check the file's owner and mode") from e
    except OSError as e:
        raise StorageError(uri, e.strerror or str(e)) from e


@contextmanager
def _s3_errors(uri: str, bucket: str) -> Iterator[None]:
    """Turn boto3/botocore errors into StorageErrors that say what to do."""
    from boto3.exceptions import Boto3Error, RetriesExceededError
    from botocore.exceptions import BotoCoreError, ClientError, EndpointConnectionError, NoCredentialsError

    try:
        yield
    except (ClientError, Boto3Error) as e:
        # boto3's transfers wrap the error that stopped them (upload_file, download_file).
        cause = e if isinstance(e, ClientError) else e.__context__
        if isinstance(e, RetriesExceededError):
            cause = e.last_exception
        transient = retry.is_transient(cause) if isinstance(cause, Exception) else False
        if isinstance(cause, ClientError):
            raise StorageError(uri, _client_problem(cause, bucket), transient) from e
        if isinstance(cause, EndpointConnectionError):
            raise StorageError(uri, _unreachable(cause), True) from e
        raise StorageError(uri, f"S3 transfer failed: {cause or e}", transient) from e
    except NoCredentialsError as e:
        raise StorageError(uri, f"no S3 credentials found; {_CREDENTIALS_HINT}") from e
    except EndpointConnectionError as e:
        raise StorageError(uri, _unreachable(e), True) from e
    except BotoCoreError as e:
        raise StorageError(uri, f"S3 request failed: {e}", retry.is_transient(e)) from e


def _unreachable(error: Any) -> str:
    endpoint = error.kwargs.get("endpoint_url")
    return f"cannot reach {endpoint}; check EARMARK_S3_ENDPOINT_URL and the network"


def _client_problem(error: Any, bucket: str) -> str:
    code = _error_code(error)
    if code == "NoSuchBucket":
        return f"no such bucket {bucket!r}; check the bucket name or create it"
    if code in _MISSING_CODES:
        return "no such object; check the bucket and key"
    if code in _ACCESS_CODES:
        return f"access denied ({code}); {_CREDENTIALS_HINT}"
    if code == "InvalidRange":
        return "the requested byte range lies beyond the end of the object"
    return f"S3 error {code}: {error.response.get('Error', {}).get('Message', error)}"


def _error_code(error: Any) -> str:
    return str(error.response.get("Error", {}).get("Code", ""))
