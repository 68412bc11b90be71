"""The model registry: versions of fine-tuned models with their cards, and the promotion gate.

A registry is a folder, local or ``s3://`` (DESIGN.md)::

    <registry>/<name>/<version>/model.nemo   the checkpoint (written first)
    <registry>/<name>/<version>/card.json    what it is: base, parent, data and their hashes,
                                             training settings, metrics per language; written
                                             last, so a version without a card does not exist
    <registry>/<name>/promoted.json          which version serves, and the history of promotions

Versions are ``v0001``, ``v0002``, ... per name. A model is promoted only through :func:`gate`:
its dev WER must be lower than its parent's on the same dev manifest, and no language may be
worse than the parent's by more than ``tolerance`` (relative); ``force`` with a reason overrides
the gate, and the reason is recorded.

>>> from jobs.evaluate import LanguageScores
>>> def wer(w): return LanguageScores(clips=1, wer=w, wer_raw=None, cer=None, cer_raw=None, sentence_language_accuracy=None)
>>> refused = gate({"all": wer(0.10), "de-DE": wer(0.10)}, {"all": wer(0.12), "de-DE": wer(0.05)})
>>> print(refused[0])
de-DE: WER 10.0 % is worse than the parent's 5.0 % by more than 10 % relative (allowed up to 6.0 %)
"""

from __future__ import annotations

import datetime as dt
import json
import re
from collections.abc import Mapping
from dataclasses import asdict, dataclass
from pathlib import Path

from cluster import storage
from jobs.cards import CardMetrics, ModelCard, Promotion
from jobs.evaluate import LanguageScores

MODEL_FILE = "model.nemo"
CARD_FILE = "card.json"
PROMOTED_FILE = "promoted.json"
VERSION_RE = re.compile(r"^v(\d{4,})$")
NAME_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,99}$")
#: A language may get this much worse (relative) before the gate refuses ...
DEFAULT_TOLERANCE = 0.10
#: ... plus this much absolute WER (half a point), so a language near 0 % does not block on one word.
ABSOLUTE_SLACK = 0.005


class RegistryError(ValueError):
    """A registry operation that cannot be done; the message says why and what to do."""


def gate(
    candidate: Mapping[str, LanguageScores],
    parent: Mapping[str, LanguageScores],
    *,
    tolerance: float = DEFAULT_TOLERANCE,
    slack: float = ABSOLUTE_SLACK,
    overall: bool = True,
) -> list[str]:
    """Why ``candidate`` may not replace ``parent`` (empty: it may).

    Both are the ``languages`` tables of :func:`jobs.evaluate.score` on the same dev manifest
    (``"all"`` and one entry per language; the normalized WER counts). ``overall=False`` checks
    the languages only, not that the whole set got better.
    """
    reasons = []
    if overall:
        new_all, old_all = _wer(candidate, "all"), _wer(parent, "all")
        if new_all is None or old_all is None:
            return ["no dev WER to compare: evaluate both models on the same dev manifest"]
        if not new_all < old_all:
            reasons.append(f"dev WER {100 * new_all:.1f} % is not better than the parent's {100 * old_all:.1f} %")
    for lang in sorted(parent):
        old = _wer(parent, lang)
        if lang == "all" or old is None:
            continue
        new = _wer(candidate, lang)
        if new is None:
            reasons.append(f"{lang}: the parent was measured on it, the candidate was not")
            continue
        allowed = old * (1 + tolerance) + slack
        if new > allowed:
            reasons.append(
                f"{lang}: WER {100 * new:.1f} % is worse than the parent's {100 * old:.1f} % by more than "
                f"{100 * tolerance:.0f} % relative (allowed up to {100 * allowed:.1f} %)"
            )
    return reasons


def _wer(table: Mapping[str, LanguageScores], lang: str) -> float | None:
    scores = table.get(lang)
    return None if scores is None else scores.wer


def gate_card(metrics: CardMetrics, *, tolerance: float = DEFAULT_TOLERANCE) -> list[str]:
    """:func:`gate` over a card's ``metrics``: the combined dev set, then each dev manifest apart.

    Two dev manifests may share a language with opposite trends (a new accent's clips and the
    original ones, both en-US); pooled, the gain on one hides the loss on the other. So every
    language of every dev manifest (``metrics.dev_sets``) must also hold within the tolerance.
    """
    reasons = gate(metrics.dev.languages, metrics.parent_dev.languages, tolerance=tolerance)
    for name, pair in metrics.dev_sets.items():  # "better overall" is the combined set's rule
        per_set = gate(pair.new, pair.parent, tolerance=tolerance, overall=False)
        reasons += [f"{name}: {r}" for r in per_set]
    return reasons


def utcnow_iso() -> str:
    return dt.datetime.now(dt.UTC).isoformat(timespec="seconds")


@dataclass(frozen=True)
class Registry:
    uri: str
    options: storage.StorageOptions | None = None

    def path(self, *parts: str) -> str:
        return "/".join([self.uri.rstrip("/"), *parts])

    # -- reading ----------------------------------------------------------------------------

    def names(self) -> list[str]:
        found = set()
        for uri in self._cards():
            found.add(uri[len(self.uri.rstrip("/")) + 1 :].split("/")[0])
        return sorted(found)

    def versions(self, name: str) -> list[str]:
        prefix = self.path(name) + "/"
        out = []
        for uri in self._cards(name):
            version = uri[len(prefix) :].split("/")[0]
            if VERSION_RE.match(version):
                out.append(version)
        return sorted(out, key=lambda v: int(v[1:]))

    def card(self, name: str, version: str | None = None) -> ModelCard:
        """The card of ``name/version`` (the promoted version, else the latest, when None)."""
        version = version or self.promoted(name) or self.latest(name)
        uri = self.path(name, version, CARD_FILE)
        if not storage.exists(uri, self.options):
            known = ", ".join(self.versions(name)) or "none"
            raise RegistryError(f"{name}/{version} is not in the registry {self.uri} (versions of {name}: {known})")
        return ModelCard.from_dict(json.loads(storage.read_bytes(uri, self.options)))

    def latest(self, name: str) -> str:
        versions = self.versions(name)
        if not versions:
            names = ", ".join(self.names()) or "none yet"
            raise RegistryError(f"no model named {name!r} in the registry {self.uri} (names: {names})")
        return versions[-1]

    def promoted(self, name: str) -> str | None:
        uri = self.path(name, PROMOTED_FILE)
        if not storage.exists(uri, self.options):
            return None
        return json.loads(storage.read_bytes(uri, self.options))["version"]

    def model_uri(self, ref: str) -> str:
        """``name`` (its promoted version, else the latest) or ``name/version`` -> the .nemo URI."""
        name, _, version = ref.partition("/")
        card = self.card(name, version or None)
        return self.path(name, card.version, MODEL_FILE)

    # -- writing ----------------------------------------------------------------------------

    def next_version(self, name: str) -> str:
        if not NAME_RE.match(name):
            raise RegistryError(f"model name {name!r}: use letters, digits, '.', '_' or '-' (at most 100)")
        versions = self.versions(name)
        return f"v{int(versions[-1][1:]) + 1 if versions else 1:04d}"

    def publish(self, name: str, version: str, model_path: str, card: ModelCard) -> str:
        """Upload the checkpoint, then the card (the card makes the version exist)."""
        if storage.exists(self.path(name, version, CARD_FILE), self.options):
            raise RegistryError(f"{name}/{version} already exists in {self.uri}; versions are never overwritten")
        storage.upload_file(model_path, self.path(name, version, MODEL_FILE), self.options)
        self._write_card(name, version, card)
        return self.path(name, version)

    def publish_card(self, name: str, version: str, card: ModelCard) -> str:
        """Write the card of a version whose model is already in place (the card makes it exist)."""
        if storage.exists(self.path(name, version, CARD_FILE), self.options):
            raise RegistryError(f"{name}/{version} already exists in {self.uri}; versions are never overwritten")
        if not storage.exists(self.path(name, version, MODEL_FILE), self.options):
            raise RegistryError(f"{name}/{version}: no {MODEL_FILE} in place; the card would describe nothing")
        self._write_card(name, version, card)
        return self.path(name, version)

    def promote(
        self, name: str, version: str, *, force: bool = False, reason: str | None = None, tolerance: float | None = None
    ) -> Promotion:
        """Make ``name/version`` the served model if the gate passes (or ``force`` with a reason)."""
        card = self.card(name, version)
        refused = gate_card(card.metrics, tolerance=DEFAULT_TOLERANCE if tolerance is None else tolerance)
        if refused and not force:
            raise RegistryError(
                f"{name}/{version} is not promoted: " + "; ".join(refused) + ". Fine-tune again with more or "
                "better data, or pass --force with --reason to promote it anyway (the reason is recorded)."
            )
        if force and not (reason and reason.strip()):
            raise RegistryError("--force needs --reason: say why this model is promoted despite the gate")
        record = Promotion(
            version=version,
            at=utcnow_iso(),
            forced=bool(refused),
            reason=reason.strip() if reason else None,
            gate=refused,
        )
        history = []
        uri = self.path(name, PROMOTED_FILE)
        if storage.exists(uri, self.options):
            history = json.loads(storage.read_bytes(uri, self.options)).get("history", [])
        history.append(asdict(record))
        storage.write_bytes(uri, json.dumps({**asdict(record), "history": history}, indent=2).encode(), self.options)
        self._write_card(name, version, card.with_promotion(record))
        return record

    def _write_card(self, name: str, version: str, card: ModelCard) -> None:
        data = json.dumps(card.to_dict(), indent=2).encode()
        storage.write_bytes(self.path(name, version, CARD_FILE), data, self.options)

    def _cards(self, name: str | None = None) -> list[str]:
        prefix = self.path(name) if name else self.uri.rstrip("/")
        if not storage.is_remote(prefix) and not Path(prefix).is_dir():
            return []  # a new registry: nothing in it yet
        return [u for u in storage.list_files(prefix, self.options) if u.endswith("/" + CARD_FILE)]
