"""The ledger of one run: counts, failures, notes and timings, gathered from its image results,
and the run record it becomes in the manifest."""
from __future__ import annotations

import time
from dataclasses import dataclass, field

from ..io.manifest import environment, now
from .outcomes import DONE, ImageResult


@dataclass
class RunLedger:
    """Everything a run learns about its images, one :class:`ImageResult` at a time.

    ``done`` counts only masks this run wrote; ``skipped`` the masks it kept, of which
    ``skipped_other_settings`` were made with other settings (kept by ``--allow-mixed``);
    ``not_run`` what it never reached (interrupted, or stopped by ``--strict`` or a full disk).
    """

    selected: int
    skipped: int = 0
    skipped_other_settings: int = 0
    done: int = 0
    failures: list[dict] = field(default_factory=list)
    notes: dict[str, list[str]] = field(default_factory=dict)
    step_seconds: dict[str, float] = field(default_factory=dict)
    reported: set[str] = field(default_factory=set)
    started: float = field(default_factory=time.time)
    clock: float = field(default_factory=time.perf_counter)

    def record(self, result: ImageResult) -> None:
        self.reported.add(result.image_id)
        if result.status == DONE:
            self.done += 1
            for key, value in result.timings.items():
                self.step_seconds[key] = self.step_seconds.get(key, 0.0) + value
        else:
            self.failures.append({"id": result.image_id, "reason": result.reason})
        if result.notes:
            self.notes[result.image_id] = result.notes

    def add_unreported(self, ids: list[str]) -> None:
        """Masks the workers wrote but could not report before the run stopped."""
        self.done += len([i for i in ids if i not in self.reported])

    @property
    def failed(self) -> int:
        return len(self.failures)

    @property
    def processed(self) -> int:
        return self.done + self.failed

    @property
    def seconds(self) -> float:
        return time.perf_counter() - self.clock

    def counts(self) -> dict[str, int]:
        return {
            "selected": self.selected, "done": self.done, "skipped": self.skipped,
            "skipped_other_settings": self.skipped_other_settings, "failed": self.failed,
            "not_run": self.selected - self.done - self.skipped - self.failed,
        }

    def record_dict(self, **about) -> dict:
        """The run record for the manifest: ``about`` (status, selection, engine...) and the ledger."""
        return {
            **about,
            **environment(),
            "started": time.strftime("%Y-%m-%dT%H:%M:%S%z", time.localtime(self.started)),
            "started_unix": round(self.started, 3),
            "finished": now(),
            "seconds": round(self.seconds, 3),
            "counts": self.counts(),
            "timing": {"per_step_seconds": {k: round(v, 4) for k, v in sorted(self.step_seconds.items())}},
            "failures": sorted(self.failures, key=lambda f: f["id"]),
            "notes": dict(sorted(self.notes.items())),
        }
