"""Reading a user's files and writing ours atomically. Layer 1: imports only hetmem.errors.

Every user file goes through ``read_user_text``/``read_json_file`` so a missing file, a directory, a
binary file or bad JSON is one line naming the file. Every file hetmem writes goes through
``write_atomic``: a reader (or a crash) never sees half a file.
"""

from __future__ import annotations

import json
import os
import tempfile
from pathlib import Path

from hetmem.errors import HetmemError


def read_user_text(path, what: str, missing_hint: str = "", shown: str | None = None) -> str:
    """A user's UTF-8 text file, or a one-line HetmemError naming ``what`` it was meant to be (and the file,
    as ``shown`` or as given)."""
    p = Path(path)
    name = shown or str(path)
    if not p.exists():
        raise HetmemError(f"{what} {name} does not exist{missing_hint}")
    if not p.is_file():
        raise HetmemError(f"{what} {name} is a directory, not a file" if p.is_dir() else f"{what} {name} is not a file")
    try:
        return p.read_bytes().decode("utf-8")
    except UnicodeDecodeError as exc:
        raise HetmemError(f"{what} {name} is not UTF-8 text (bad byte at offset {exc.start})") from None
    except OSError as exc:
        raise HetmemError(f"cannot read {what} {name}: {exc.strerror or exc}") from None


def read_json_file(path, what: str, missing_hint: str = "") -> object:
    """Parse a user's JSON file, or raise a one-line HetmemError naming ``what`` it was meant to be."""
    text = read_user_text(path, what, missing_hint)
    try:
        return json.loads(text)
    except ValueError as exc:
        raise HetmemError(f"{what} {path} is not valid JSON: {str(exc).splitlines()[0]}") from None


def read_jsonl_objects(path, what: str, field: str, shown: str | None = None,
                       nonempty: bool = False) -> list[tuple[int, dict]]:
    """(line number, object) for every non-blank line of a user's JSONL file; each must be an object with a
    string ``field`` (not blank, with ``nonempty``). A bad line is one HetmemError naming the file and line."""
    name = shown or str(path)
    out = []
    for n, line in enumerate(read_user_text(path, what, shown=shown).splitlines(), start=1):
        if not line.strip():
            continue
        try:
            obj = json.loads(line)
        except json.JSONDecodeError as exc:
            raise HetmemError(f"{name} line {n}: not valid JSON ({exc.msg})") from None
        value = obj.get(field) if isinstance(obj, dict) else None
        if not isinstance(value, str) or (nonempty and not value.strip()):
            kind = "a non-empty string" if nonempty else "a string"
            raise HetmemError(f"{name} line {n}: expected an object with {kind} '{field}' field")
        out.append((n, obj))
    return out


def write_atomic(path, data: str | bytes, fsync: bool = False) -> Path:
    """Write ``data`` to ``path`` through a temporary sibling and one ``os.replace``.

    ``fsync``: flush the data to disk before the rename, so that a power cut, too, leaves the old or
    the new file (the caller fsyncs the directory if the rename itself must be durable).
    """
    p = Path(path)
    fd, tmp = tempfile.mkstemp(prefix=f".{p.name}.", suffix=".tmp", dir=p.parent)
    try:
        with os.fdopen(fd, "wb") as fh:
            fh.write(data.encode("utf-8") if isinstance(data, str) else data)
            if fsync:
                fh.flush()
                os.fsync(fh.fileno())
        os.chmod(tmp, 0o666 & ~_umask())
        os.replace(tmp, p)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return p


def write_json_atomic(path, obj, indent: int | None = 1, fsync: bool = False) -> Path:
    return write_atomic(path, json.dumps(obj, indent=indent), fsync=fsync)


def make_temp_dir(parent, prefix: str) -> Path:
    """``tempfile.mkdtemp`` in ``parent``, but with the mode a plain ``mkdir`` would give (0o777 less the
    umask) rather than mkdtemp's 0o700: the folder is renamed into place and must be as readable as any."""
    d = Path(tempfile.mkdtemp(prefix=prefix, dir=parent))
    try:
        os.chmod(d, 0o777 & ~_umask())
    except BaseException:
        os.rmdir(d)
        raise
    return d


def pid_alive(pid: int) -> bool:
    """Whether a process ``pid`` runs on this machine (one that belongs to another user counts)."""
    if pid <= 0:
        return False
    try:
        os.kill(pid, 0)
    except (ProcessLookupError, OverflowError):
        return False
    except (PermissionError, OSError):
        return True
    return True


def _umask() -> int:
    old = os.umask(0)
    os.umask(old)
    return old


def check_out_dir(path, flag: str, ours: tuple[str, ...]) -> Path:
    """Make sure ``path`` can take our output before any long work starts: it is created if needed, it is
    writable, and if it already holds files they are ours (one of ``ours`` is there), so a typo never
    writes into an unrelated folder."""
    p = Path(path)
    if p.exists() and not p.is_dir():
        raise HetmemError(f"{flag} {path} exists and is not a directory")
    if p.is_dir() and any(p.iterdir()) and not any((p / f).exists() for f in ours):
        raise HetmemError(f"{flag} {path} is a non-empty directory that hetmem did not write (no {ours[0]} in it): "
                          "give a new or empty directory")
    try:
        p.mkdir(parents=True, exist_ok=True)
        fd, probe = tempfile.mkstemp(prefix=".hetmem-write-test.", dir=p)
        os.close(fd)
        os.unlink(probe)
    except OSError as exc:
        raise HetmemError(f"cannot write to {flag} {path}: {exc.strerror or exc}") from None
    return p
