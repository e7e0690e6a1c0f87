"""RUN/stages.json: which stages of a run are done, with the settings they ran with.

Per stage: ``{"settings": {...}, "status": "running" | "done", "seconds": wall time so far,
"finished": ISO time, "commits": [the prance source of each attempt]}``. A stage is marked running
before it starts and done once its files are written, so after any interruption the ledger says which
stage to continue. Its settings are what :func:`check_unchanged` compares with the settings of a
new invocation: a finished or started stage whose results depend on a changed value is refused,
naming the stage and the setting, instead of being mixed with results of other settings.
"""

from __future__ import annotations

import json
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Mapping, Sequence

from prance.errors import PranceError
from prance.files import atomic_write
from prance.pipeline.config import STAGES, compared, recorded_setting
from prance.source import source_commit

LEDGER = "stages.json"


@dataclass
class Ledger:
    """The stages.json of run folder ``run`` (read at start; only the writing process saves)."""

    run: Path
    stages: dict[str, dict[str, Any]]
    writer: bool = True

    @classmethod
    def read(cls, run: Path, writer: bool = True) -> "Ledger":
        path = run / LEDGER
        if not path.is_file():
            return cls(run, {}, writer)
        try:
            stages = json.loads(path.read_text())
        except (json.JSONDecodeError, UnicodeDecodeError):
            raise PranceError(f"{path} is damaged (not JSON); delete it to start the run over, or choose another "
                              "--out") from None
        unknown = [s for s in stages if s not in STAGES]
        if not isinstance(stages, dict) or unknown:
            raise PranceError(f"{path} is not a prance run's stage record ({unknown[:1] or 'not a mapping'}); choose "
                              "another --out")
        return cls(run, stages, writer)

    def done(self, stage: str) -> bool:
        return self.stages.get(stage, {}).get("status") == "done"

    def seconds(self, stage: str) -> float:
        return float(self.stages.get(stage, {}).get("seconds", 0.0))

    def restart_from(self, stage: str) -> list[str]:
        """Forget ``stage`` and every later one (they run again, from scratch); returns those it had."""
        later = STAGES[STAGES.index(stage):]
        forgotten = [s for s in later if s in self.stages]
        for s in forgotten:
            del self.stages[s]
        self._save()
        return forgotten

    def start(self, stage: str, settings: Mapping[str, Any]) -> None:
        entry = self.stages.get(stage, {})
        commits = [c for c in entry.get("commits", []) if c]  # an interrupted stage may resume on newer code
        here = source_commit()
        if here and here not in commits:
            commits.append(here)
        self.stages[stage] = {"settings": dict(settings), "status": "running", "seconds": entry.get("seconds", 0.0),
                              "finished": None, "commits": commits}
        self._save()

    def finish(self, stage: str, seconds: float) -> None:
        entry = self.stages[stage]
        entry.update(status="done", seconds=round(float(entry.get("seconds", 0.0)) + seconds, 1),
                     finished=time.strftime("%Y-%m-%dT%H:%M:%S%z"))
        self._save()

    def pause(self, stage: str, seconds: float) -> None:
        """Add the wall time of an interrupted attempt (the stage stays running)."""
        entry = self.stages[stage]
        entry["seconds"] = round(float(entry.get("seconds", 0.0)) + seconds, 1)
        self._save()

    def adopt(self, stage: str, record: Mapping[str, Any], source: Path) -> None:
        """Record ``stage`` as done by another run folder (``source``), with that run's record of it."""
        self.stages[stage] = {**record, "reused_from": str(source)}
        self._save()

    def changed(self, stage: str, settings: Mapping[str, Any]) -> str | None:
        """The first setting that ``stage`` was recorded with and ``settings`` change (None: none does)."""
        before = self.stages.get(stage, {}).get("settings", {})
        return next((name for name in sorted(set(before) | set(settings))
                     if compared(name) and recorded_setting(before, name) != recorded_setting(settings, name)), None)

    def check_unchanged(self, settings: Mapping[str, Mapping[str, Any]], config_file: Path,
                        stages: Sequence[str] = STAGES) -> None:
        """Refuse the first recorded stage of ``stages`` whose settings differ from ``settings`` (this run's)."""
        for stage in stages:
            name = self.changed(stage, settings[stage]) if stage in self.stages else None
            if name is not None:
                before = recorded_setting(self.stages[stage].get("settings", {}), name)
                raise PranceError(
                    f"{self.run} ran stage {stage} with {name}={_show(before)}, now "
                    f"{name}={_show(settings[stage].get(name))}: its results and every later stage's depend on it; "
                    f"pass --restart-from {stage} to redo them (earlier stages are kept), choose a new --out, or "
                    f"repeat the run's settings (--config {config_file})")

    def _save(self) -> None:
        if self.writer:
            text = json.dumps(self.stages, indent=2) + "\n"
            atomic_write(self.run / LEDGER, lambda f: f.write(text.encode()))


def _show(value: Any) -> str:
    return "unset" if value is None else json.dumps(value)


__all__ = ["LEDGER", "Ledger"]
