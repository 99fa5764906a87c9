"""File names as text that any terminal and any UTF-8 file can hold.

POSIX file names are bytes. Python holds the bytes of a name that are not valid UTF-8 as lone
surrogates (PEP 383: ``caf\\xe9.wav`` becomes ``'caf\\udce9.wav'``), which a strict UTF-8
terminal or file refuses. :func:`escape_bytes` writes them as ``\\xNN``; :func:`shown` also
escapes control characters (a newline in a name), so a message stays one line.
"""

from __future__ import annotations

_CONTROL = {**{c: f"\\x{c:02x}" for c in (*range(32), 127)}, 9: "\\t", 10: "\\n", 13: "\\r"}


def escape_bytes(text: object) -> str:
    """``text`` as valid UTF-8: the name's bytes read as UTF-8 (so a UTF-8 name read under a
    C locale comes back whole), each byte that is not valid UTF-8 written as ``\\xNN``."""
    text = str(text)
    if not any("\ud800" <= ch <= "\udfff" for ch in text):
        return text
    try:
        return text.encode("utf-8", "surrogateescape").decode("utf-8", "backslashreplace")
    except UnicodeEncodeError:      # surrogates that stand for no byte (not from a file name)
        return text.encode("utf-8", "backslashreplace").decode("utf-8")


def shown(text: object, *, keep: str = "") -> str:
    """``text`` fit for a terminal: :func:`escape_bytes`, and control characters other than
    those in ``keep`` (``"\\n"`` for a multi-line report) escaped."""
    table = {c: e for c, e in _CONTROL.items() if chr(c) not in keep}
    return escape_bytes(text).translate(table)


def one_line(text: object, limit: int = 200) -> str:
    """``text`` (an exception's, a server's, a pickle's) on one line of printable
    characters, cut to ``limit`` characters."""
    text = str(text)[:4 * limit]        # a pickle or a server chose it: bounded work
    line = " ".join("".join(c if c.isprintable() else " " for c in text).split())
    return line if len(line) <= limit else line[: limit - 3] + "..."
