"""The result of one sandboxed run."""

from __future__ import annotations

import enum
from collections.abc import Mapping, Sequence
from typing import TYPE_CHECKING, Any, Generic, TypeVar

from ._valuetype import FACTORY, fill

if TYPE_CHECKING:
    from dataclasses import dataclass as value_type  # what the classes are
    from dataclasses import field
else:
    from ._valuetype import field, value_type  # the same, without generated code

__all__ = ["Outcome", "Result", "Violation"]

T = TypeVar("T", bytes, str)


class Outcome(str, enum.Enum):
    """Why a run ended. The values are the ``outcome`` strings of ``--result``."""

    EXITED = "exited"
    SIGNALED = "signaled"
    TIMEOUT = "timeout"
    CPU_LIMIT = "cpu_limit"
    MEMORY_LIMIT = "memory_limit"
    OUTPUT_LIMIT = "output_limit"
    SETUP_FAILED = "setup_failed"


@value_type(frozen=True)
class Violation:
    """Something the sandbox refused or stopped (``kind`` plus a human ``detail``)."""

    kind: str
    detail: str
    data: Mapping[str, Any] = field(default_factory=dict)

    def __init__(self, kind: str, detail: str, data: Mapping[str, Any] = FACTORY) -> None:
        fill(self, kind=kind, detail=detail, data=data)

    def to_dict(self) -> dict[str, Any]:
        out: dict[str, Any] = {"kind": self.kind, "detail": self.detail}
        out.update(self.data)
        return out


@value_type(frozen=True, kw_only=True)
class Result(Generic[T]):
    """What a run did and used. ``returncode`` follows ``subprocess``: the exit
    code, or ``-N`` when the command was killed by signal N."""

    id: str
    args: Sequence[str]
    returncode: int
    stdout: T
    stderr: T
    outcome: Outcome
    exit_code: int | None
    signal: int | None
    wall_time_s: float
    cpu_time_s: float
    user_time_s: float
    system_time_s: float
    peak_memory_bytes: int
    stdout_bytes: int
    stderr_bytes: int
    stdout_truncated: bool
    stderr_truncated: bool
    degraded: tuple[str, ...] = ()
    violations: tuple[Violation, ...] = ()
    network: Mapping[str, Any] | None = None
    oom_killed: bool = False

    def __init__(
        self,
        *,
        id: str,
        args: Sequence[str],
        returncode: int,
        stdout: T,
        stderr: T,
        outcome: Outcome,
        exit_code: int | None,
        signal: int | None,
        wall_time_s: float,
        cpu_time_s: float,
        user_time_s: float,
        system_time_s: float,
        peak_memory_bytes: int,
        stdout_bytes: int,
        stderr_bytes: int,
        stdout_truncated: bool,
        stderr_truncated: bool,
        degraded: tuple[str, ...] = (),
        violations: tuple[Violation, ...] = (),
        network: Mapping[str, Any] | None = None,
        oom_killed: bool = False,
    ) -> None:
        fill(
            self,
            id=id,
            args=args,
            returncode=returncode,
            stdout=stdout,
            stderr=stderr,
            outcome=outcome,
            exit_code=exit_code,
            signal=signal,
            wall_time_s=wall_time_s,
            cpu_time_s=cpu_time_s,
            user_time_s=user_time_s,
            system_time_s=system_time_s,
            peak_memory_bytes=peak_memory_bytes,
            stdout_bytes=stdout_bytes,
            stderr_bytes=stderr_bytes,
            stdout_truncated=stdout_truncated,
            stderr_truncated=stderr_truncated,
            degraded=degraded,
            violations=violations,
            network=network,
            oom_killed=oom_killed,
        )

    @property
    def timed_out(self) -> bool:
        return self.outcome is Outcome.TIMEOUT

    @property
    def ok(self) -> bool:
        return self.outcome is Outcome.EXITED and self.returncode == 0

    def check(self) -> Result[T]:
        """Raise :class:`nanobox.SandboxedProcessError` unless the command exited 0."""
        if not self.ok:
            from .errors import SandboxedProcessError

            raise SandboxedProcessError(self)
        return self

    def to_dict(self) -> dict[str, Any]:
        """The ``--result`` JSON object (the keys are a public contract)."""
        out: dict[str, Any] = {
            "id": self.id,
            "command": list(self.args),
            "exit_code": self.exit_code,
            "signal": self.signal,
            "outcome": self.outcome.value,
            "timed_out": self.timed_out,
            "oom_killed": self.oom_killed,
            "wall_time_s": round(self.wall_time_s, 6),
            "cpu_time_s": round(self.cpu_time_s, 6),
            "user_time_s": round(self.user_time_s, 6),
            "system_time_s": round(self.system_time_s, 6),
            "peak_memory_bytes": self.peak_memory_bytes,
            "stdout_bytes": self.stdout_bytes,
            "stderr_bytes": self.stderr_bytes,
            "stdout_truncated": self.stdout_truncated,
            "stderr_truncated": self.stderr_truncated,
            "degraded": list(self.degraded),
            "violations": [v.to_dict() for v in self.violations],
        }
        if self.network is not None:
            out["network"] = dict(self.network)
        return out
