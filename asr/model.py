"""Loading NeMo ASR checkpoints: a bundled model by name, a local ``.nemo`` or a hub name.

The engine only sees local paths: ``s3://`` checkpoints are fetched into a cache by
``cluster.storage.localize`` before they get here. Bundled models (``demo``: the small model of
earmark's demo kit) are found through the ``earmark.checkpoints`` entry points, so the engine
does not depend on the packages that bundle them.

>>> model, info = load_model("demo")            # doctest: +SKIP
>>> info.model_id, info.locales[:3]             # doctest: +SKIP
('earmark-demo@3f2a9c1d0b7e', ('de-DE', 'en-US', 'es-ES'))
"""

from __future__ import annotations

import functools
import hashlib
import logging
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

log = logging.getLogger(__name__)

#: Prompt keys that are not a locale of their own.
AUTO = "auto"
#: Entry-point group of bundled checkpoints: ``NAME = "package.module:BUNDLED"``, a :class:`BundledCheckpoint`.
CHECKPOINT_GROUP = "earmark.checkpoints"


class ModelLoadError(RuntimeError):
    pass


@dataclass(frozen=True, slots=True)
class BundledCheckpoint:
    """A checkpoint shipped inside an installed package, loadable by a short name (``demo``)."""

    #: The model's name in model ids (``earmark-demo``).
    name: str
    path: Path


@functools.cache
def bundled_checkpoints() -> dict[str, BundledCheckpoint]:
    """Short name -> bundled checkpoint, from the installed packages' ``earmark.checkpoints`` entry points."""
    from importlib.metadata import entry_points

    return {ep.name: ep.load() for ep in entry_points(group=CHECKPOINT_GROUP)}


@dataclass(frozen=True, slots=True)
class ModelInfo:
    name: str
    #: sha256 of the checkpoint file (the hub name for hub models without a local file).
    sha256: str
    #: Full locales the model can be asked for (``xx-XX``), sorted; empty for models without prompts.
    locales: tuple[str, ...]
    #: Every prompt key (locales, short aliases, ``auto``) -> prompt index, as read from the model.
    prompt_dictionary: dict[str, int]
    att_context_sizes: tuple[tuple[int, int], ...]
    default_att_context: tuple[int, int]
    #: Seconds per encoder output frame (window stride x subsampling factor).
    frame_shift_s: float
    sample_rate: int
    #: False for plain RNNT models (English Nemotron 3): they take no language prompt.
    uses_prompts: bool

    @property
    def model_id(self) -> str:
        return f"{self.name}@{self.sha256[:12]}"

    def prompt_index(self, lang: str) -> int:
        """Prompt index of ``lang`` (``auto``, ``de-DE``, ``de``; case-insensitive)."""
        if lang in self.prompt_dictionary:
            return self.prompt_dictionary[lang]
        folded = {k.lower(): v for k, v in self.prompt_dictionary.items()}
        if lang.lower() in folded:
            return folded[lang.lower()]
        raise ValueError(
            f"unknown language {lang!r} for model {self.name}: use 'auto' or one of {', '.join(self.locales)}"
        )

    def canonical_lang(self, lang: str) -> str:
        """``de`` -> ``de-DE`` where the model maps both to one prompt; ``auto`` stays ``auto``."""
        index = self.prompt_index(lang)
        if lang.lower() == AUTO:
            return AUTO
        for loc in self.locales:
            if self.prompt_dictionary[loc] == index:
                return loc
        return lang


@functools.lru_cache(maxsize=32)
def _file_sha256(path: str, size: int, mtime_ns: int) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def file_sha256(path: Path) -> str:
    st = path.stat()
    return _file_sha256(str(path), st.st_size, st.st_mtime_ns)


def model_id_of_file(path: Path, name: str | None = None) -> str:
    """The model id (``name@sha256[:12]``) of a local .nemo, without loading it."""
    return f"{name or checkpoint_name(path)}@{file_sha256(path)[:12]}"


def checkpoint_name(path: Path) -> str:
    """``earmark-demo`` for the bundled demo model, ``NAME-VERSION`` for a registry's
    ``NAME/VERSION/model.nemo``, else the file's stem."""
    for bundled in bundled_checkpoints().values():
        if path == bundled.path:
            return bundled.name
    if path.name == "model.nemo" and path.parent.name.startswith("v") and path.parent.name[1:].isdigit():
        return f"{path.parent.parent.name}-{path.parent.name}"
    return path.stem


def resolve_checkpoint(spec: str | os.PathLike[str]) -> Path | str:
    """``demo`` (a bundled name) -> its file; an existing path -> itself; ``org/name`` -> the hub name."""
    text = os.fspath(spec)
    bundled = bundled_checkpoints().get(text) if "/" not in text and not text.endswith(".nemo") else None
    if bundled is not None:
        if not bundled.path.exists():
            raise ModelLoadError(f"the bundled model {text!r} is missing at {bundled.path}; reinstall earmark")
        return bundled.path
    if text == "demo":
        raise ModelLoadError("no bundled model named 'demo' is installed; install earmark (pip install -e .)")
    if "://" in text:
        raise ModelLoadError(
            f"{text}: the engine loads local files only; fetch it with cluster.storage.localize() first "
            "(the earmark command does this for you)"
        )
    path = Path(text).expanduser()
    if path.exists():
        if path.is_dir() or path.suffix != ".nemo":
            raise ModelLoadError(f"{path}: expected a .nemo checkpoint file")
        return path
    if text.count("/") == 1 and not text.startswith((".", "/")) and not text.endswith(".nemo"):
        return text  # a hub name such as nvidia/<model>
    raise ModelLoadError(f"{text}: no such model file; pass a .nemo path, an s3:// URI, a hub name or 'demo'")


def load_model(spec: str | os.PathLike[str], *, device: str = "cpu") -> tuple[Any, ModelInfo]:
    """Load a checkpoint in float32, in eval mode, on ``device``; returns (nemo model, info)."""
    from nemo.collections.asr.models import ASRModel

    target = resolve_checkpoint(spec)
    try:
        if isinstance(target, Path):
            model = ASRModel.restore_from(restore_path=str(target), map_location=device)
            name, sha = checkpoint_name(target), file_sha256(target)
        else:
            model = ASRModel.from_pretrained(model_name=target, map_location=device)
            name, sha = target.replace("/", "--"), hashlib.sha256(target.encode()).hexdigest()
    except ModelLoadError:
        raise
    except Exception as exc:  # NeMo raises many types; the user needs one clear message
        raise ModelLoadError(f"{target}: could not load the checkpoint ({type(exc).__name__}: {exc})") from exc
    if not hasattr(model, "decoding") or not hasattr(model, "joint"):
        raise ModelLoadError(
            f"{target}: {type(model).__name__} is not an RNNT model; earmark needs an RNNT/TDT checkpoint"
        )
    model = model.float().eval().to(device)
    return model, model_info(model, name=name, sha256=sha)


def model_info(model: Any, *, name: str, sha256: str) -> ModelInfo:
    cfg = model.cfg
    uses_prompts = bool(getattr(model, "concat", False))
    prompts = dict(cfg.model_defaults.get("prompt_dictionary", {}) or {}) if uses_prompts else {}
    locales = tuple(sorted(k for k in prompts if "-" in k))
    sizes = tuple(tuple(int(v) for v in s) for s in model.encoder.att_context_size_all)
    default = tuple(int(v) for v in model.encoder.att_context_size)
    stride = float(cfg.preprocessor.get("window_stride", 0.01))
    subsampling = int(getattr(model.encoder, "subsampling_factor", 8))
    return ModelInfo(
        name=name,
        sha256=sha256,
        locales=locales,
        prompt_dictionary={str(k): int(v) for k, v in prompts.items()},
        att_context_sizes=sizes,  # type: ignore[arg-type]
        default_att_context=default,  # type: ignore[arg-type]
        frame_shift_s=stride * subsampling,
        sample_rate=int(cfg.preprocessor.get("sample_rate", 16000)),
        uses_prompts=uses_prompts,
    )


def read_prompt_dictionary(spec: str | os.PathLike[str]) -> dict[str, int]:
    """Prompt key -> index of a local ``.nemo`` (or ``demo``), read from its config without loading
    NeMo (for the review app's language selector and for checking manifests before training)."""
    import tarfile

    import yaml

    path = resolve_checkpoint(spec)
    if not isinstance(path, Path):
        raise ModelLoadError(f"{spec}: the config can be read from a local .nemo only")
    with tarfile.open(path) as tar:
        member = next((m for m in tar.getmembers() if m.name.endswith("model_config.yaml")), None)
        if member is None:
            raise ModelLoadError(f"{path}: no model_config.yaml inside; is it a .nemo checkpoint?")
        cfg = yaml.safe_load(tar.extractfile(member))  # type: ignore[arg-type]
    return dict((cfg.get("model_defaults") or {}).get("prompt_dictionary") or {})


def read_locales(spec: str | os.PathLike[str]) -> list[str]:
    """The full locales (``xx-XX``) of a local ``.nemo`` (or ``demo``), without loading NeMo."""
    return sorted(k for k in read_prompt_dictionary(spec) if "-" in k)
