"""Filesystem policy -> the list of mount operations the init executes
(computed on the caller's side; pure except for reading the host's tree).

Rules:
- Paths may start with ``~`` (the caller's ``$HOME``). Sources are
  canonicalised once here (``realpath``); the init then opens each with
  ``openat2(RESOLVE_NO_SYMLINKS)``, so a symlink swapped in afterwards makes
  the run fail instead of redirecting the mount.
- The most specific destination wins: operations are ordered by path depth,
  and at equal depth tmpfs < read-write < read-only < protect < hide.
- Protected paths (``PROTECTED_TOP`` at the top of each writable root,
  ``PROTECTED_GIT`` in every repository ``gitscan`` finds below it) are bound read-only
  onto themselves, and every directory between the writable root and them
  becomes a mount point too, so none can be renamed or removed to put a
  look-alike in place. Missing top-level protected names get an empty
  placeholder created by the fork server and removed after the run.
"""

from __future__ import annotations

import errno
import os
import stat
from collections.abc import Sequence

from ..errors import PolicyError
from ..policy import DEFAULT_HIDES, PROTECTED_GIT, PROTECTED_TOP, Filesystem, unprotect_by_name
from ..units import parse_size
from . import gitfiles
from .gitscan import find_repos

TYPE_CHECKING = False  # not ``typing``'s: on the CLI's start-up path
if TYPE_CHECKING:
    from typing import Any

RUN_SIZE = 64 * 1024 * 1024
_ORDER = {"tmpfs": 0, "bind": 1, "robind": 2, "protect": 3, "hide": 4}


class View:
    """The planned filesystem view: mount ops, and what Landlock grants.
    (A plain class: a dataclass's generated code costs the CLI ~1 ms.)"""

    __slots__ = (
        "git_dirs",
        "hidden",
        "notes",
        "ops",
        "placeholders",
        "readable_extra",
        "writable",
    )

    def __init__(self) -> None:
        self.ops: list[dict[str, Any]] = []
        self.writable: list[str] = []  # sandbox paths writable
        self.readable_extra: list[str] = []
        self.hidden: list[str] = []  # where they really are (resolved)
        self.placeholders: list[tuple[str, str]] = []  # (host path, kind)
        self.notes: list[str] = []
        # Git directories (host paths) in a writable root without a
        # "commondir": one made during a run is removed after it.
        self.git_dirs: list[str] = []

    def to_json(self, rootfs: str, tmp_size: int) -> dict[str, Any]:
        # A destination whose top-level directory is missing ("/data", or
        # "/data/a/b" with no "/data") needs a rebuilt root: a mount point
        # cannot be created in the read-only host root itself.
        mirror = rootfs == "host" and any(
            op["t"] in ("tmpfs", "bind", "robind")  # (the ops that make mount points)
            and not os.path.lexists("/" + op["dst"].lstrip("/").split("/", 1)[0])
            for op in self.ops
        )
        return {
            "rootfs": rootfs,
            "mirror_root": mirror,
            "ops": self.ops,
            "dev": True,
            "proc": True,
            "shm_size": 64 * 1024 * 1024,
            "tmp_size": tmp_size,
        }


def expand(path: str, home: str) -> str:
    if path == "~" or path.startswith("~/"):
        return home + path[1:]
    if path.startswith("~"):
        raise PolicyError("filesystem", f"{path!r}: only '~' and '~/...' are supported")
    return path


def _split(entry: str, home: str) -> tuple[str, str, bool]:
    src, _, dst = entry.partition(":")
    optional = src.endswith("?")
    src = expand(src.rstrip("?"), home)
    return src, expand(dst, home) if dst else src, optional


def _norm(path: str) -> str:
    """``normpath``, and a leading ``//`` made ``/`` (POSIX lets ``normpath``
    keep exactly two; to the kernel they are one, and every path of the plan
    is compared as a string)."""
    path = os.path.normpath(path)
    return "/" + path.lstrip("/") if path.startswith("//") else path


def _not_root(path: str, field_name: str, entry: str, what: str) -> str:
    """``path`` (normalised), unless it is ``/``: a bind, a tmpfs or a hide
    there would replace the whole root filesystem (and was silently ignored,
    or failed at setup). What is mounted by path (a tmpfs, a hide) is also
    checked where a symlink leads (the kernel follows the link)."""
    path = _norm(path)
    if path == "/":
        raise PolicyError(
            field_name, f"{entry!r}: {what} '/' is not supported; name a directory below it"
        )
    return path


class Realpath:
    """``os.path.realpath`` for one plan, each directory on the way looked
    up once (the default hides share the home directory: 11 paths, 23
    ``lstat`` calls by ``os.path.realpath``). The same answers: a path with
    a symlink on the way, or one that is not absolute and normalised, is
    resolved by ``os.path.realpath`` whole; a missing component is kept as
    written, and so is the rest below it, as ``realpath`` does."""

    def __init__(self) -> None:
        # A normalised path -> where it really is, or None where a symlink
        # is on the way.
        self.known: dict[str, str | None] = {"/": "/"}
        self.present: set[str] = {"/"}  # those of them that exist

    def __call__(self, path: str) -> str:
        if not path.startswith("/") or path.startswith("//") or path != os.path.normpath(path):
            return os.path.realpath(path)
        plain = self._plain(path)
        return os.path.realpath(path) if plain is None else plain

    def _plain(self, path: str) -> str | None:
        if path in self.known:
            return self.known[path]
        parent, _, name = path.rpartition("/")
        base = self._plain(parent or "/")
        result: str | None = None
        if base is not None:
            here = base.rstrip("/") + "/" + name
            try:
                mode = os.lstat(here).st_mode
            except OSError:
                result = here
            else:
                result = None if stat.S_ISLNK(mode) else here
                if result is not None:
                    self.present.add(path)
        self.known[path] = result
        return result

    def lexists(self, path: str) -> bool:
        """``os.path.lexists``, from what resolving ``path`` found."""
        if self.known.get(path) is not None:
            return path in self.present
        return os.path.lexists(path)


def _hidden(entry: str, home: str, realpath: Realpath | None = None) -> tuple[str, str]:
    """A ``hide`` entry: the path to mount over, and where it really is
    (for the Landlock rules, planned on real directories)."""
    path = _not_root(expand(entry.rstrip("?"), home), "filesystem.hide", entry, "hiding")
    real = (realpath or Realpath())(path)
    return path, _not_root(real, "filesystem.hide", entry, "hiding")


def _writable_source(real: str, entry: str) -> str:
    """A writable root's resolved source: never the host root itself (a link
    to it, or ``/proc/self/root``, would make every host file writable)."""
    if real == "/":
        raise PolicyError(
            "filesystem.read_write",
            f"{entry!r}: the host root '/' cannot be writable; name a directory below it",
        )
    return real


def _depth(path: str) -> int:
    return 0 if path == "/" else path.rstrip("/").count("/")


def _canonical_source(src: str, optional: bool, field_name: str) -> str | None:
    if not os.path.lexists(src):
        if optional:
            return None
        raise PolicyError(field_name, f"{src!r} does not exist (append '?' to make it optional)")
    return os.path.realpath(src)


def _is_under(path: str, root: str) -> bool:
    return path == root or path.startswith(root.rstrip("/") + "/")


def _hide_entries(fs: Filesystem, home: str, account_home: str | None) -> list[tuple[str, str]]:
    """The paths to hide, as (entry, the home its ``~`` means): the
    default secrets under ``$HOME`` and under the account's home from the
    user database where ``$HOME`` points elsewhere (a service or CI job
    with ``HOME=/tmp/x`` keeps its keys in ``/home/me/.ssh``), then the
    policy's own (``~`` = ``$HOME``)."""
    out: list[tuple[str, str]] = []
    if fs.default_hides:
        out += [(entry, home) for entry in DEFAULT_HIDES]
        if account_home and os.path.realpath(account_home) != os.path.realpath(home):
            out += [(entry, account_home) for entry in DEFAULT_HIDES]
    return out + [(entry, home) for entry in fs.hide]


def build(fs: Filesystem, cwd: str, home: str, account_home: str | None = None) -> View:
    view = View()
    ops: list[dict[str, Any]] = []
    tmp_size = int(fs.tmp_size)
    ops.append({"t": "tmpfs", "dst": "/tmp", "size": tmp_size, "mode": 0o1777})
    ops.append({"t": "tmpfs", "dst": "/run", "size": RUN_SIZE, "mode": 0o755})
    view.writable += ["/tmp"]
    if os.path.isdir("/var/run") and not os.path.islink("/var/run"):
        ops.append({"t": "tmpfs", "dst": "/var/run", "size": RUN_SIZE, "mode": 0o755})
    xdg = os.environ.get("XDG_RUNTIME_DIR")
    if xdg and os.path.isabs(xdg) and not (_is_under(xdg, "/run") or _is_under(xdg, "/tmp")):
        if os.path.isdir(xdg):
            ops.append(
                {"t": "tmpfs", "dst": os.path.realpath(xdg), "size": RUN_SIZE, "mode": 0o700}
            )
    for entry in fs.tmpfs:
        dst, _, size = entry.partition(":")
        dst = _not_root(expand(dst, home), "filesystem.tmpfs", entry, "a tmpfs at")
        _not_root(os.path.realpath(dst), "filesystem.tmpfs", entry, "a tmpfs at")
        ops.append(
            {
                "t": "tmpfs",
                "dst": dst,
                "size": parse_size(size) if size else RUN_SIZE,
                "mode": 0o755,
            }
        )
        view.writable.append(dst)

    writable_roots: list[tuple[str, str]] = []  # (host directory, where the sandbox sees it)
    if fs.workspace:
        ops.append({"t": "bind", "src": cwd, "dst": cwd, "rw": True})
        writable_roots.append((cwd, cwd))
    for entry in fs.read_write:
        src, dst, optional = _split(entry, home)
        dst = _not_root(dst, "filesystem.read_write", entry, "a writable bind at")
        real = _canonical_source(src, optional, "filesystem.read_write")
        if real is None:
            continue
        real = _writable_source(real, entry)
        ops.append({"t": "bind", "src": real, "dst": dst, "rw": True})
        writable_roots.append((real, dst))
    for entry in fs.read_only:
        src, dst, optional = _split(entry, home)
        dst = _not_root(dst, "filesystem.read_only", entry, "a read-only bind at")
        real = _canonical_source(src, optional, "filesystem.read_only")
        if real is None:
            continue
        ops.append({"t": "robind", "src": real, "dst": dst})
        view.readable_extra.append(dst)
    view.writable += [dst for _host, dst in writable_roots]

    realpath = Realpath()
    # A hidden path is hidden where it is written, where it really is (a
    # $HOME or a name behind a symlink: a bind of the real directory,
    # mounted later, would cover a hide made through the link), and where a
    # bind shows a directory above it elsewhere (``~:/home/me``,
    # ``/:/host``), or a secret would be one relocated bind away.
    binds = [(op["src"], op["dst"]) for op in ops if op["t"] in ("bind", "robind")]
    hidden_at: set[str] = set()

    def hide(dst: str, host: str) -> None:
        if dst not in hidden_at:
            hidden_at.add(dst)
            ops.append({"t": "hide", "dst": dst, **({"host": host} if host != dst else {})})

    for entry, its_home in _hide_entries(fs, home, account_home):
        path, real = _hidden(entry, its_home, realpath)
        if not realpath.lexists(path):
            continue
        hide(path, path)
        view.hidden.append(real)
        if real != path and realpath.lexists(real):
            hide(real, real)
        for src, dst in binds:
            rel = os.path.relpath(real, src)
            # (The hidden path itself bound elsewhere is asked for by name.)
            if rel != "." and not rel.startswith("../") and rel != "..":
                hide(_norm(os.path.join(dst, rel)), real)

    if fs.protect:
        # Names ('.vscode', or '.git/hooks' in every repository) and paths.
        names = [p for p in fs.unprotect if unprotect_by_name(p)]
        unprotect = {_norm(expand(p, home)) for p in fs.unprotect if p not in names}
        unprotect_names = set(names)
        for i, (root, dst) in enumerate(writable_roots):
            # The sandbox sees another root bound inside this one (or at the
            # same place, later) instead of what is there on the host: its
            # own operations protect it; none from this root's host tree.
            covered = []
            for j, (_host, other) in enumerate(writable_roots):
                nested = other != dst and _is_under(other, dst)
                if nested or (other == dst and j > i):
                    covered.append(other)
            if dst in covered or not os.path.isdir(root):
                continue  # (a writable file has no protected names below it)
            ops += protect_ops(
                root, unprotect, unprotect_names, view, dst=dst, covered=covered, home=home
            )

    # Most specific wins: shallower first; at equal depth the stricter last.
    ops.sort(key=lambda op: (_depth(op["dst"]), _ORDER[op["t"]]))
    view.ops = _dedupe_chain(ops)
    return view


DEV_WRITABLE = (
    "/dev/null",
    "/dev/zero",
    "/dev/full",
    "/dev/tty",
    "/dev/ptmx",
    "/dev/pts",
    "/dev/random",
    "/dev/urandom",
    "/dev/shm",
)


def build_nons(fs: Filesystem, cwd: str, home: str, account_home: str | None = None) -> View:
    """The view without a mount namespace: nothing is mounted, so every
    path stays where it is and Landlock alone decides."""
    view = View()
    if fs.rootfs != "host":
        raise PolicyError("filesystem.rootfs", "needs a mount namespace (user namespaces are off)")
    if fs.tmpfs:
        raise PolicyError("filesystem.tmpfs", "needs a mount namespace (user namespaces are off)")
    if fs.workspace:
        view.writable.append(cwd)
    for field_name, entries in (("read_write", fs.read_write), ("read_only", fs.read_only)):
        for entry in entries:
            src, dst, optional = _split(entry, home)
            what = "a writable bind at" if field_name == "read_write" else "a read-only bind at"
            _not_root(dst, f"filesystem.{field_name}", entry, what)
            real = _canonical_source(src, optional, f"filesystem.{field_name}")
            if real is None:
                continue
            if field_name == "read_write":
                real = _writable_source(real, entry)
            if _norm(dst) != _norm(src):
                raise PolicyError(
                    f"filesystem.{field_name}",
                    f"{entry!r}: placing a path elsewhere needs a mount namespace "
                    "(user namespaces are off)",
                )
            (view.writable if field_name == "read_write" else view.readable_extra).append(real)
    realpath = Realpath()
    for entry, its_home in _hide_entries(fs, home, account_home):
        path, real = _hidden(entry, its_home, realpath)
        if realpath.lexists(path):
            view.hidden.append(real)
    return view


def unenforced_hides(view: View) -> list[str]:
    """Without a mount namespace (``build_nons``), the hidden paths inside a
    writable root: Landlock grants rights on a directory's whole subtree
    and cannot take them away below it, so these stay readable and
    writable (listed as degradations; hidden paths inside read-only ones
    are left out of their rules, see ``landlock_plan``)."""
    out = []
    for hidden in view.hidden:
        root = next((w for w in view.writable if _is_under(hidden, w)), None)
        if root is not None:
            out.append(
                f"hide: {hidden} is not hidden: it is inside the writable {root} (without a "
                "mount namespace, Landlock cannot take rights away below a directory it grants)"
            )
    return out


MAX_HIDE_DEPTH = 64


def landlock_plan(view: View, *, nons: bool = False, tcp: bool = False) -> dict[str, Any]:
    """The Landlock ruleset matching ``view``: everything readable except the
    hidden paths (their ancestors get list-only rights), writes only to the
    writable roots, private tmpfs mounts and the usual /dev nodes; abstract
    unix sockets and signals scoped to the sandbox."""
    read: list[str] = []
    listing: list[str] = []
    hidden = view.hidden  # resolved (``_hidden``): cover() walks real directories

    def cover(path: str, depth: int, link: bool | None = None) -> None:
        if path in hidden:
            return
        if os.path.islink(path) if link is None else link:
            # A rule would be for where the link leads (``landlock`` opens
            # the path): a link to '/' or to a hidden path's parent would
            # grant what this function leaves out. The target is covered
            # where it really is.
            return
        below = [h for h in hidden if _is_under(h, path)]
        if not below:
            read.append(path)
            return
        if depth > MAX_HIDE_DEPTH:  # granting this whole would grant what is hidden
            raise PolicyError(
                "filesystem.hide",
                f"{below[0]}: more than {MAX_HIDE_DEPTH} directories deep; "
                "Landlock rules cannot be planned around it",
            )
        listing.append(path)
        try:
            entries = list(os.scandir(path))
        except OSError:
            return
        for entry in entries:
            try:
                is_link = entry.is_symlink()  # from the listing where the filesystem says
            except OSError:
                is_link = True  # gone since: no rule
            cover(entry.path, depth + 1, is_link)

    cover("/", 0)
    if nons:
        # Host paths here, and Landlock alone hides: granted around the
        # hidden paths inside them, like the root above.
        for extra in view.readable_extra:
            if not any(_is_under(extra, h) for h in hidden):
                cover(extra, 0)
    else:
        # Paths in the sandbox (what a bind shows there); hides are mounts.
        read += [p for p in view.readable_extra if not any(_is_under(p, h) for h in hidden)]
    if nons:
        # No private mounts: only the writable roots, the run's own $TMPDIR
        # (added by the fork server) and the usual device nodes.
        write = [*view.writable, *DEV_WRITABLE]
    else:
        write = [*view.writable, "/run", "/var/run", *DEV_WRITABLE]
    return {
        "read": read,
        "write": write,
        "list": listing,
        "scope_abstract_unix": True,
        "scope_signal": True,
        "restrict_tcp": tcp,
        "min_abi": 1 if nons else 0,
    }


def _dedupe_chain(ops: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """One protect operation per path: read-only where any asks for it
    (rather than a writable pin of a directory on the way to another)."""
    kept: dict[str, int] = {}  # protected path -> its index in out
    out: list[dict[str, Any]] = []
    for op in ops:
        if op["t"] == "protect":
            at = kept.get(op["dst"])
            if at is not None:
                if out[at].get("rw") and not op.get("rw"):
                    out[at] = op
                continue
            kept[op["dst"]] = len(out)
        out.append(op)
    return out


def protect_ops(
    root: str,
    unprotect: set[str],
    unprotect_names: set[str],
    view: View,
    *,
    dst: str | None = None,
    covered: Sequence[str] = (),
    home: str = "",
) -> list[dict[str, Any]]:
    """Read-only binds for protected paths under the writable ``root``, a
    host directory the sandbox sees at ``dst`` (default: the same path),
    but under the sandbox paths in ``covered`` (other roots bound there).
    What to protect is found in ``root``; the operations name the paths in
    the sandbox, and where those differ, the host path too (``host``: the
    placeholders and the watch of a sandbox built ahead are on the host).

    Besides the names (``PROTECTED_TOP``) and each repository's hooks and
    config, what git's configuration makes it run or read, where that is
    inside ``root`` (``gitfiles.GitConfigs``): a ``core.hooksPath``
    directory (husky's ``.husky/_``), files a configuration includes, and
    the user's global configuration files themselves (a workspace that is
    ``$HOME``). Those may be missing: the first missing name on the way
    gets a placeholder."""
    shown = root if dst is None else dst

    def protect(path: str, **extra: Any) -> dict[str, Any]:
        inside = inside_path(path, root, shown)
        op = {"t": "protect", "dst": inside, **extra}
        if inside != path:
            op["host"] = path
        return op

    def visible(path: str) -> bool:
        inside = inside_path(path, root, shown)
        return not any(_is_under(inside, other) for other in covered)

    # (path, kind): "top" a name at the top (a placeholder if missing),
    # "exists" protected if there, "maybe" a path below that may be missing.
    targets: list[tuple[str, str]] = []
    for name in PROTECTED_TOP:
        if name not in unprotect_names:
            targets.append((os.path.join(root, name), "top"))
    wanted = [
        rel.split("/")[-1]
        for rel in PROTECTED_GIT
        if rel.split("/")[-1] not in unprotect_names and rel not in unprotect_names
    ]
    configs = gitfiles.GitConfigs(home or os.path.expanduser("~"), wanted)
    maybe = [p for p in configs.global_paths() if _is_under(p, root)]
    walked: set[str] = set()  # (common git directories: each walked once)
    for repo in find_repos(root):
        if visible(repo):
            raws = gitfiles.git_dir_paths(repo)  # (read once: as written, then resolved)
            dirs = gitfiles.git_dirs(repo, raws)
            targets += [(path, "exists") for path in _git_targets(repo, dirs, root, wanted)]
            for raw in raws:
                targets += _links_on(raw, root)  # (links a command could retarget)
            maybe += [p for p in configs.repo_paths(repo, dirs) if _is_under(p, root)]
            if "config" in wanted and dirs and _is_under(dirs[0], root):
                # Read only once extensions.worktreeConfig is on, which git
                # sparse-checkout turns on later: a missing one is made here.
                maybe.append(os.path.join(dirs[0], "config.worktree"))
            if dirs and dirs[-1] not in walked and _is_under(dirs[-1], root):
                walked.add(dirs[-1])
                maybe += _linked_targets(dirs[-1], root, wanted, view)
            if "config" in wanted and len(dirs) == 1 and _is_under(dirs[0], root):
                if not os.path.lexists(os.path.join(dirs[0], "commondir")):
                    view.git_dirs.append(dirs[0])
    for path in maybe:
        if path not in unprotect and inside_path(path, root, shown) not in unprotect:
            targets += _resolve_maybe(path, root, view)
    ops: list[dict[str, Any]] = []
    done: set[str] = set()
    for path, kind in targets:
        if path in done:
            continue
        done.add(path)
        if path in unprotect or inside_path(path, root, shown) in unprotect:
            continue
        if not visible(path):
            continue
        st = _lstat(path) if kind != "link" else None
        if kind == "exists" and st is None:
            done.discard(path)  # (missing: a later "maybe" of it makes a placeholder)
            continue
        if kind == "link":
            # A link git follows on the way to what it runs or reads: the
            # command could replace it unless its directory is protected,
            # and the root cannot be (as for a name at the top).
            if os.path.dirname(path) == root:
                raise PolicyError(
                    "filesystem.protect",
                    f"{path} is a symlink, which cannot be protected (git runs or reads what "
                    f"it leads to); remove it, or list {path!r} in filesystem.unprotect",
                )
            st, kind = _lstat(path), "exists"
        if kind == "exists" and st is not None and _empty(path, st):
            # Empty, as a placeholder is: perhaps another server's (two
            # processes running sandboxes in one checkout), which its maker
            # removes when its run ends; protected as it is, it was held by
            # no one here, and its removal detached this sandbox's read-only
            # bind (or failed its build: "no such file"). So it is held for
            # the run like a placeholder: made again if it is gone by then.
            kind = "top"
        if kind == "top":
            chain = os.path.dirname(path)
            # Top-level names: the fork server makes a placeholder when the
            # name is missing (shared by concurrent runs), the init binds
            # whatever is there read-only onto itself.
            if st is not None and stat.S_ISLNK(st.st_mode):
                raise PolicyError(
                    "filesystem.protect",
                    f"{path} is a symlink, which cannot be protected; remove it, or list "
                    f"{os.path.basename(path)!r} in filesystem.unprotect",
                )
            # A missing name gets an empty file, also where the real thing
            # would be a directory (.vscode): it blocks creating the name
            # and anything below it as well, and creating and removing a
            # directory costs ~10x a file on ext4 (its data block).
            kind = "file"
            if st is not None:
                kind = "dir" if stat.S_ISDIR(st.st_mode) else "file"
            view.placeholders.append((path, kind))
            ops.append(protect(path))
            # Below the top, the directories on the way become mount points
            # (they cannot be renamed away and made again without it).
            while _is_under(chain, root) and chain != root:
                ops.append(protect(chain, rw=True))
                chain = os.path.dirname(chain)
            continue
        if st is None:
            continue
        target = path
        if stat.S_ISLNK(st.st_mode):
            # A symlinked protected path cannot be a mount point: protect the
            # directory holding it instead (fail closed; its siblings turn
            # read-only too).
            target = os.path.dirname(path)
            view.notes.append(f"{path} is a symlink: protected its directory {target}")
        ops.append(protect(target))
        # Every directory between the root and the target becomes a mount
        # point, so it cannot be renamed away and replaced.
        parent = os.path.dirname(target)
        while _is_under(parent, root) and parent != root:
            ops.append(protect(parent, rw=True))
            parent = os.path.dirname(parent)
    return ops


def _empty(path: str, st: os.stat_result) -> bool:
    """An empty regular file, or a directory without entries (one that
    cannot be listed counts as not empty: protected as it is)."""
    if stat.S_ISREG(st.st_mode):
        return st.st_size == 0
    if not stat.S_ISDIR(st.st_mode):
        return False
    try:
        with os.scandir(path) as entries:
            return next(entries, None) is None
    except OSError:
        return False


def _lstat(path: str) -> os.stat_result | None:
    try:
        return os.lstat(path)
    except FileNotFoundError:
        return None
    except OSError as exc:  # e.g. EACCES: fail closed, not unprotected
        raise PolicyError("filesystem.protect", f"cannot check {path}: {exc.strerror}") from None


def _resolve_maybe(path: str, root: str, view: View, hops: int = 0) -> list[tuple[str, str]]:
    """What to protect for ``path``, below ``root``, which git runs or reads
    and which may be missing: walked down name by name from the root, the
    path itself if it is there ("exists"); else the first missing name, for
    a placeholder ("top"); a symbolic link on the way ("link": its
    directory is protected) and, if it leads back into the root, what it
    leads to. A name that cannot exist (a file on the way, a name too
    long) needs nothing; a path that is the root itself cannot be
    protected without the whole root (left, with a note)."""
    if path == root or not _is_under(path, root):
        if path == root:
            view.notes.append(f"{root}: git runs hooks from the root itself: not protected")
        return []
    cur = root
    parts = os.path.relpath(path, root).split("/")
    for i, part in enumerate(parts):
        nxt = os.path.join(cur, part)
        try:
            st = os.lstat(nxt)
        except FileNotFoundError:
            return [(nxt, "top")]
        except (NotADirectoryError, ValueError):
            return []
        except OSError as exc:
            if exc.errno in (errno.ENAMETOOLONG, errno.ELOOP):
                return []
            raise PolicyError("filesystem.protect", f"cannot check {nxt}: {exc.strerror}") from None
        if stat.S_ISLNK(st.st_mode):
            out = [(nxt, "link")]
            rest = os.path.join(os.path.realpath(nxt), *parts[i + 1 :])
            if hops < 8:
                out += _resolve_maybe(os.path.normpath(rest), root, view, hops + 1)
            return out
        cur = nxt
    return [(path, "exists")]


def inside_path(path: str, root: str, shown: str) -> str:
    """Where the sandbox sees host ``path`` (at or below ``root``), with
    ``root`` bound at ``shown``."""
    if root == shown:
        return path
    rel = os.path.relpath(path, root)
    return shown if rel == "." else os.path.join(shown, rel)


def _linked_targets(gitdir: str, root: str, names: list[str], view: View) -> list[str]:
    """What git reads or runs of the worktrees and submodules ``gitdir``
    keeps (``gitfiles.linked_git_dirs``), inside ``root``: a worktree's
    ``commondir`` and ``config.worktree`` (without a ``commondir``, its own
    ``config`` and ``hooks``), a submodule's ``config`` and ``hooks``. A
    ``commondir`` made during the run where there was none is removed after
    it (``view.git_dirs``). A missing ``modules`` directory, in ``gitdir``
    and in each worktree's, gets a placeholder: ``git submodule update
    --init`` would use a git directory the command made there, hooks
    included, once a checkout has submodules (any branch may bring
    them: not only where a ``.gitmodules`` is checked out now)."""
    try:
        linked = gitfiles.linked_git_dirs(gitdir)
    except gitfiles.TooManyGitDirs as exc:
        raise PolicyError(
            "filesystem.protect",
            f"{exc.strerror}: too many to protect; remove what is not a worktree's or a "
            "submodule's git directory there ('git worktree prune' removes stale worktrees)",
        ) from None
    out = []
    for d, admin in linked:
        has_common = os.path.lexists(os.path.join(d, "commondir"))
        if admin and has_common:
            wanted = ["commondir", "config.worktree"] if "config" in names else []
        else:
            wanted = names
            if "config" in names and _is_under(d, root):
                view.git_dirs.append(d)  # (a commondir made in it is removed after the run)
        out += [os.path.join(d, n) for n in wanted]
    if names:
        homes = [gitdir] + [d for d, admin in linked if admin]
        missing = [os.path.join(h, "modules") for h in homes]
        out += [m for m in missing if not os.path.lexists(m)]  # (not an existing one:
        # work in the submodules it holds writes there)
    return [p for p in out if _is_under(p, root)]


def _links_on(path: str, root: str) -> list[tuple[str, str]]:
    """The symbolic links ``path`` goes through, inside ``root``, walked as
    the kernel walks it (a '..' after a link is taken where the link
    leads, not by the text): as "link" targets of ``protect_ops``, whose
    directories it protects (the command could otherwise retarget them)."""
    out: list[tuple[str, str]] = []
    parts = path.split("/")
    cur = "/"
    hops = 0
    while parts:
        part = parts.pop(0)
        if part in ("", "."):
            continue
        if part == "..":
            cur = os.path.dirname(cur)
            continue
        nxt = os.path.join(cur, part)
        try:
            st = os.lstat(nxt)
        except OSError:
            break  # (missing: nothing further is there to follow now)
        if not stat.S_ISLNK(st.st_mode):
            cur = nxt
            continue
        if _is_under(nxt, root):
            out.append((nxt, "link"))
        hops += 1
        try:
            target = os.readlink(nxt)
        except OSError:
            break
        if hops > 40:
            break
        parts = target.split("/") + parts
        if target.startswith("/"):
            cur = "/"
    return out


def _git_targets(repo: str, dirs: list[str], root: str, names: list[str]) -> list[str]:
    """What to protect of the repository at ``repo`` (``dirs``: its
    ``gitfiles.git_dirs``): ``names`` (hooks,
    config) in its git directory. Where ``.git`` is a file (a submodule or a
    worktree: "gitdir: PATH"), also that file (redirected, it would make git
    use a git directory the command wrote) and ``config.worktree`` in the
    git directory it names, plus ``names`` in that directory's common
    directory (a worktree's hooks and config are the main repository's);
    those inside ``root`` (elsewhere this root cannot write them). A
    ``.git`` file that is not a git link, which git refuses, is protected
    as it is."""
    if not names:
        return []
    dotgit = os.path.join(repo, ".git")
    if not os.path.isfile(dotgit) or os.path.islink(dotgit):
        return [os.path.join(dotgit, name) for name in names]
    try:
        with open(dotgit, "rb"):
            pass
    except OSError as exc:
        raise PolicyError("filesystem.protect", f"cannot read {dotgit}: {exc.strerror}") from None
    out = [dotgit]
    if not dirs:
        # Not a git link: git refuses the directory ("invalid gitfile
        # format") and runs nothing of it. Only the file itself is kept as
        # it is, so that the command cannot make it one.
        return out if _is_under(dotgit, root) else []
    for i, d in enumerate(dirs):
        extra = ["config.worktree", "commondir"] if i == 0 and "config" in names else []
        out += [os.path.join(d, n) for n in [*names, *extra]]
    return [p for p in out if _is_under(p, root)]
