"""Writing files atomically, and reading text files line by line with file:line errors."""

from __future__ import annotations

import os
from pathlib import Path

from .errors import DataError, DsanError

# What the JSON and YAML parsers raise, besides their own syntax errors, on text they cannot
# represent: ValueError (an integer beyond int()'s 4300-digit limit, a date such as 2020-13-45)
# or RecursionError (nesting deeper than Python's recursion limit).
PARSER_LIMIT_ERRORS = (ValueError, RecursionError)


def parser_limit_reason(e: Exception) -> str:
    """The short reason of one of PARSER_LIMIT_ERRORS (without Python's advice on raising the limit)."""
    return "nested too deeply" if isinstance(e, RecursionError) else str(e).split(";")[0]


def write_atomically(contents: dict) -> None:
    """Writes {path: str | bytes | callable(tmp_path)} so that each file appears whole or not at all.

    Every file goes to a temporary name beside its target first; only when all are written are
    they renamed into place. On any failure (a full disk, Ctrl-C) the temporary files are
    removed and the targets keep their old content."""
    temporaries = []
    try:
        for path, content in contents.items():
            path = Path(path)
            tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
            temporaries.append((tmp, path))
            if callable(content):
                content(tmp)
            elif isinstance(content, bytes):
                tmp.write_bytes(content)
            else:
                tmp.write_text(content, encoding="utf-8")
        for tmp, path in temporaries:
            os.replace(tmp, path)
    except OSError as e:
        targets = {str(tmp): target for tmp, target in temporaries}  # name the file asked for, not its temporary
        where = targets.get(str(e.filename), e.filename or path)
        raise DsanError(f"cannot write {where}: {e.strerror or e} (nothing was changed)") from None
    finally:
        for tmp, _ in temporaries:
            tmp.unlink(missing_ok=True)


def append_line(path, line: str) -> None:
    """Appends one line (a log or a metrics record); a failed write is a clear error."""
    try:
        with open(path, "a", encoding="utf-8") as f:
            f.write(line + "\n")
    except OSError as e:
        raise DsanError(f"cannot write {path}: {e.strerror or e}") from None


BYTE_ORDER_MARK = b"\xef\xbb\xbf"  # UTF-8's; accepted at the start of every text file dsan reads


def utf8_text(path, raw: bytes, first_line: int = 1, error=DataError) -> str:
    """raw (lines first_line, ... of path) decoded as UTF-8; a byte that is not stops with the
    file, line, byte and column."""
    try:
        return raw.decode("utf-8")
    except UnicodeDecodeError as e:
        line = first_line + raw.count(b"\n", 0, e.start)
        column = e.start - (raw.rfind(b"\n", 0, e.start) + 1) + 1
        raise error(f"{path}:{line}: not UTF-8 text (byte 0x{raw[e.start]:02x} at column {column})") from None


def read_lines(path):
    """(line number, text) of a UTF-8 text file; a leading byte-order mark is dropped, and bytes
    that are not UTF-8 stop with the file, line and byte. Lines end with \\n or \\r\\n: a carriage
    return alone (old Mac line ends) stops with the file and line."""
    path = Path(path)
    with open(path, "rb") as f:
        for number, raw in enumerate(f, 1):
            if number == 1 and raw.startswith(BYTE_ORDER_MARK):
                raw = raw[len(BYTE_ORDER_MARK):]
            if b"\r" in (raw[:-2] if raw.endswith(b"\r\n") else raw):
                raise DataError(f"{path}:{number}: carriage return without a line feed (old Mac line ends are not "
                                "supported; end lines with \\n or \\r\\n)")
            yield number, utf8_text(path, raw, number)
