"""Reading the small files a command is given (profiles, gate files, tasks, measurements, prompts):
their bytes, with errors that name the file."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from quantcli.errors import InputError, QuantcliError


def read_small(path: Path, what: str, error: type[QuantcliError] = InputError, limit: int | None = None) -> bytes:
    """The bytes of a `what` file (e.g. "profile"); missing, unreadable or over `limit` bytes: `error`."""
    path = Path(path)
    try:
        raw = path.read_bytes()
    except FileNotFoundError:
        raise error(f"{path}: no such {what} file") from None
    except IsADirectoryError:
        raise error(f"{path}: is a directory, not a {what} file") from None
    except OSError as exc:
        raise error(f"{path}: cannot read: {exc.strerror}") from None
    if limit is not None and len(raw) > limit:
        raise error(f"{path}: {what} file is {len(raw)} bytes; the limit is {limit}")
    return raw


def read_small_text(path: Path, what: str, error: type[QuantcliError] = InputError, limit: int | None = None) -> str:
    """`read_small` decoded as UTF-8; other bytes: `error` naming the offset."""
    raw = read_small(path, what, error, limit)
    try:
        return raw.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise error(f"{path}: not UTF-8 text (byte {exc.start})") from None


def read_small_json(path: Path, what: str, error: type[QuantcliError] = InputError, limit: int | None = None) -> Any:
    """`read_small_text` parsed as JSON; a syntax error: `error` naming the line."""
    import json

    text = read_small_text(path, what, error, limit)
    try:
        return json.loads(text)
    except json.JSONDecodeError as exc:
        raise error(f"{path}: not valid JSON (line {exc.lineno}: {exc.msg})") from None

