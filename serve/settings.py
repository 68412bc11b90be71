"""The settings of one earmark server: validated once, passed to every replica as plain data.

``earmark serve`` builds them from its options; ``serve run serve.app:build`` and KubeRay's
``serveConfigV2`` pass the same fields as the application's ``args`` (see :mod:`serve.app`).

>>> ServeSettings(model="demo", max_sessions=8).max_sessions
8
>>> ServeSettings(bogus=1)
Traceback (most recent call last):
...
pydantic_core._pydantic_core.ValidationError: 1 validation error for ServeSettings
...
"""

from __future__ import annotations

from pydantic import BaseModel, ConfigDict, Field


class ServeSettings(BaseModel):
    """Everything a replica needs; unknown fields are refused, so a misspelt key fails at start-up."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    #: ``demo``, a local ``.nemo``, an ``s3://`` URI (fetched once into the local cache) or a hub name.
    #: ``$VAR`` and ``${VAR}`` are expanded from the replica's environment, so one Serve config
    #: serves the model a ConfigMap names (infra/k8s).
    model: str = "demo"
    #: ``cpu`` or ``cuda``; None: CUDA when the replica has a GPU.
    device: str | None = None
    #: sha256 hashes of the accepted API keys (``sha256:<hex>``); empty: no key needed (loopback only).
    api_key_hashes: tuple[str, ...] = ()
    #: A key file (``earmark api-key FILE``) that every replica reads when it starts, such as a
    #: mounted Kubernetes Secret; its hashes are accepted besides ``api_key_hashes``.
    api_keys_file: str | None = None
    #: Open realtime sessions per replica; the next one gets ``too_many_sessions`` and close code 1013.
    max_sessions: int = Field(default=64, ge=1)
    #: A realtime session that sends nothing for this long is closed.
    idle_timeout_s: float = Field(default=60.0, gt=0)
    #: The longest realtime session.
    max_session_s: float = Field(default=4 * 3600.0, gt=0)
    #: Audio a session may have waiting for the model; more is refused (``buffer_overflow``).
    max_buffer_s: float = Field(default=20.0, gt=0)
    #: Largest uploaded file (413 above).
    max_file_mb: float = Field(default=100.0, gt=0)
    #: Batch parts of uploaded files across requests (``@serve.batch``) and step realtime
    #: sessions in shared model calls; off: one model call per part and per session (baselines).
    batching: bool = True
    #: Audio seconds per batched model call for files (None: the engine's default for the device).
    batch_seconds: float | None = Field(default=None, gt=0)
    #: How long a file part waits for others to share its batch.
    batch_wait_s: float = Field(default=0.02, ge=0)
