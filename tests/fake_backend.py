"""FakeBackend: a SchedulerBackend that keeps its "scheduler" in a folder.

It proves the policy and CLI work against the interface alone: entries are
JSON files under `<LORE_SERVICE_HOME>/fake-scheduler/`, and the commands it
"runs" go through the injected System, so tests see the exact sequence.
"""

from __future__ import annotations

import json
import os
from typing import Any

import lore_service as ls


@ls.register_backend
class FakeBackend(ls.SchedulerBackend):
    name = "fake"
    can_embed = True
    available = True

    @classmethod
    def availability(cls, system: ls.System) -> ls.Check:
        if cls.available:
            return ls.Check("fake scheduler", "ok", "fake scheduler answers")
        return ls.Check("fake scheduler", "fail", "fake scheduler is switched off", "switch it on")

    def _entry(self, manifest: ls.Manifest) -> str:
        root = self.paths.home or self.paths.data_root
        return os.path.join(root, "fake-scheduler", f"{manifest.service_id}.json")

    def plan(self, manifest: ls.Manifest, cfg: ls.ServiceConfig, embedded_token: str | None) -> ls.Plan:
        entry: dict[str, Any] = {"program": manifest.program, "every": manifest.schedule_step_seconds}
        shown = dict(entry)
        if embedded_token:
            entry["env"] = {manifest.token_env: embedded_token}
            shown["env"] = {manifest.token_env: ls.SECRET_PLACEHOLDER}
        return ls.Plan(
            files=[ls.PlannedFile(self._entry(manifest), json.dumps(entry), 0o600, redacted=json.dumps(shown))],
            commands=[["fake-scheduler", "register", manifest.service_id]],
        )

    def uninstall(self, manifest: ls.Manifest) -> None:
        self.run_checked(["fake-scheduler", "unregister", manifest.service_id])
        ls.remove_file(self._entry(manifest))

    def state(self, manifest: ls.Manifest) -> ls.SchedulerState:
        path = self._entry(manifest)
        drift: list[str] = []
        if not os.path.exists(path):
            drift.append(f"{path} is missing")
        else:
            with open(path, encoding="utf-8") as fh:
                if json.load(fh).get("program") != manifest.program:
                    drift.append(f"{path} was edited")
        return ls.SchedulerState(registered=not drift, active=not drift, detail="fake scheduler", drift=drift)

    def file_paths(self, manifest: ls.Manifest) -> list[str]:
        return [self._entry(manifest)]
