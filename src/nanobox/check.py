"""``nanobox.check()``: what this host can enforce, and why not where not."""

from __future__ import annotations

import sys
from dataclasses import dataclass, field
from typing import Any

__all__ = ["CheckReport", "check"]

# What the default policy needs.
REQUIRED = (
    "user_namespace",
    "mount_namespace",
    "pid_namespace",
    "network_namespace",
    "ipc_namespace",
    "uts_namespace",
    "cgroup_namespace",
    "mount_api",
    "sandbox",
)


@dataclass
class CheckReport:
    """What this host can enforce, mechanism by mechanism."""

    mechanisms: dict[str, dict[str, Any]] = field(default_factory=dict)

    @property
    def default_policy_enforceable(self) -> bool:
        return all(self.mechanisms.get(m, {}).get("available") for m in REQUIRED)

    def to_dict(self) -> dict[str, Any]:
        return {
            "default_policy_enforceable": self.default_policy_enforceable,
            "mechanisms": self.mechanisms,
        }

    def format_text(self) -> str:
        lines = []
        for name, info in self.mechanisms.items():
            mark = "yes" if info.get("available") else "NO "
            need = " (required)" if name in REQUIRED else ""
            lines.append(f"{mark}  {name}{need}: {info.get('detail', '')}")
        verdict = "can" if self.default_policy_enforceable else "CANNOT"
        lines.append(f"nanobox {verdict} enforce its default policy on this host")
        return "\n".join(lines)


def check() -> CheckReport:
    """Probe the host (forks happen in a fresh helper interpreter)."""
    if not sys.platform.startswith("linux"):
        return CheckReport(
            {"platform": {"available": False, "detail": f"{sys.platform} is not supported yet"}}
        )
    from ._linux.probe import run_probe

    mechanisms = run_probe()
    from .errors import SandboxError
    from .sandbox import Sandbox

    try:
        import tempfile

        with tempfile.TemporaryDirectory(prefix="nanobox-check-") as tmp:
            r = Sandbox().run(["/bin/sh", "-c", "exit 0"], cwd=tmp, timeout=30)
        ok = r.returncode == 0
        mechanisms["sandbox"] = {
            "available": ok,
            "detail": "a default-policy sandbox ran" if ok else f"test run ended {r.outcome.value}",
        }
    except SandboxError as exc:
        mechanisms["sandbox"] = {"available": False, "detail": str(exc)}
    return CheckReport(mechanisms)
