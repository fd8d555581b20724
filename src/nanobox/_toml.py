"""Reading a TOML file of the user's (a policy, a seccomp policy): every way
it can fail is a ``PolicyError`` naming the file, never a traceback."""

from __future__ import annotations

import os
import sys

from .errors import PolicyError

TYPE_CHECKING = False
if TYPE_CHECKING:
    from typing import Any


# A policy is a few KiB; this bounds what a wrong name (/dev/zero, a log)
# makes the CLI read: it read on until memory ran out.
MAX_BYTES = 1 << 20


def read_toml(path: str | os.PathLike[str], field: str) -> dict[str, Any]:
    """``path``'s TOML as a dict; a failure is a ``PolicyError`` on ``field``.
    Any file that can be read will do (``<(...)``: a pipe), up to
    ``MAX_BYTES``."""
    if sys.version_info >= (3, 11):
        import tomllib
    else:  # pragma: no cover - Python 3.10
        import tomli as tomllib  # type: ignore[import-not-found,unused-ignore]
    name = os.fspath(path)
    try:
        with open(path, "rb") as fh:
            raw = fh.read(MAX_BYTES + 1)
        if len(raw) > MAX_BYTES:
            raise PolicyError(field, f"{name!r} is larger than {MAX_BYTES >> 20} MiB: not a policy")
        data: dict[str, Any] = tomllib.loads(raw.decode("utf-8"))
    except OSError as exc:
        raise PolicyError(field, f"cannot read {name!r}: {exc.strerror}") from None
    except tomllib.TOMLDecodeError as exc:
        raise PolicyError(field, f"{name!r} is not valid TOML: {exc}") from None
    except UnicodeDecodeError as exc:
        raise PolicyError(
            field,
            f"{name!r} is not valid TOML: not UTF-8 text (byte "
            f"0x{exc.object[exc.start]:02x} at offset {exc.start})",
        ) from None
    return data
