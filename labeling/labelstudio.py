"""Label Studio interchange for teams that review there.

Export: one Label Studio task per queued clip, in its JSON import format for audio
transcription (an ``<Audio name="audio" value="$audio"/>`` with a
``<TextArea name="transcription" toName="audio"/>``), the model's text as a prediction whose
``score`` is the utterance confidence.

Import: Label Studio's JSON export of those tasks; each annotation's transcription becomes a
review (submit) of the clip, attributed to the importing admin with the annotator in the note.
"""

from __future__ import annotations

from typing import Any

from sqlalchemy import select

from labeling.models import Clip, Task
from labeling.queue import ReviewQueue

FROM_NAME, TO_NAME = "transcription", "audio"


class LabelStudioError(ValueError):
    pass


def to_labelstudio(queue: ReviewQueue, project: str, *, audio_url: str) -> list[dict[str, Any]]:
    """Tasks for every clip with a review task; ``audio_url`` has a ``{clip_id}`` placeholder."""
    with queue.Session() as s:
        pid = queue.project_id(s, project)
        clips = s.scalars(
            select(Clip).join(Task, Task.clip_pk == Clip.id).where(Clip.project_id == pid).order_by(Task.priority)
        )
        return [
            {
                "data": {
                    "audio": audio_url.format(clip_id=c.clip_id),
                    "clip_id": c.clip_id,
                    "lang": c.lang_detected,
                    "source_uri": c.source_uri,
                    "offset_s": c.offset_s,
                },
                "predictions": [
                    {
                        "model_version": c.model_id or "earmark",
                        "score": c.confidence,
                        "result": [
                            {
                                "from_name": FROM_NAME,
                                "to_name": TO_NAME,
                                "type": "textarea",
                                "value": {"text": [c.text or ""]},
                            }
                        ],
                    }
                ],
            }
            for c in clips
        ]


def from_labelstudio(queue: ReviewQueue, project: str, payload: Any, *, reviewer_id: int) -> dict[str, int]:
    """Record the annotations of a Label Studio JSON export as reviews."""
    if not isinstance(payload, list):
        raise LabelStudioError("expected Label Studio's JSON export: a list of tasks")
    imported = skipped = unknown = 0
    for k, task in enumerate(payload):
        if not isinstance(task, dict) or not isinstance(task.get("data"), dict):
            raise LabelStudioError(f"task {k} is not an object with 'data'")
        clip_id = task["data"].get("clip_id")
        annotations = [a for a in task.get("annotations") or [] if not a.get("was_cancelled")]
        if not clip_id or not annotations:
            skipped += 1
            continue
        latest = annotations[-1]
        texts = [
            " ".join(r.get("value", {}).get("text") or [])
            for r in latest.get("result") or []
            if r.get("from_name") == FROM_NAME and r.get("type") == "textarea"
        ]
        if not texts:
            skipped += 1
            continue
        who = latest.get("completed_by")
        who = who.get("email") if isinstance(who, dict) else who
        ok = queue.record_external_review(
            project, str(clip_id), reviewer_id, text=texts[0].strip(), lang=task["data"].get("lang"),
            note=f"label-studio annotation {latest.get('id')} by {who}",
        )  # fmt: skip
        imported, unknown = imported + ok, unknown + (not ok)
    return {"imported": imported, "skipped": skipped, "unknown_clips": unknown}
