"""A collection's metadata: which clip has which genre, and which clips belong together.

Collections ship a table beside their audio: deepfusion's own manifest (``path`` and
``label``/``genre`` columns, as the shipped real-music corpus has), MTG-Jamendo's TSV files
(``TRACK_ID ARTIST_ID ALBUM_ID PATH DURATION TAGS``) or FMA's ``tracks.csv`` (three header
rows; audio at ``000/000002.mp3``). :func:`find_metadata` recognises one at the root of an
audio folder by its header, not its name; :func:`read_metadata` reads a given one.

Clips of one recording, album or artist must stay on one side of a split, or a test measures
the recording, not the genre. A table's group column is the coarsest it has: an explicit
``group`` column first, then artist, then album, then track (:data:`GROUP_COLUMNS`).
"""

from __future__ import annotations

import csv
from dataclasses import dataclass, field
from pathlib import Path, PurePosixPath
from typing import Iterable, Optional

from deepfusion.errors import DatasetError

#: Group columns, coarsest first: (what the column groups, the header names it goes by).
GROUP_COLUMNS = (("group", ("group",)),
                 ("artist", ("artist", "artist_id", "artist_name", "artistid")),
                 ("album", ("album", "album_id", "album_name", "albumid")),
                 ("track", ("track", "track_id", "trackid", "recording", "recording_id")))
#: Label columns, in order of preference.
LABEL_COLUMNS = ("label", "genre")
#: Table files looked at in the root of an audio folder (by extension; header decides).
TABLE_SUFFIXES = (".csv", ".tsv")
#: Tables larger than this at a folder's root are not read while looking (FMA's tracks.csv is
#: about 160 MB: read when given as --manifest, or when named tracks.csv).
LOOK_LIMIT = 32 * 2**20


@dataclass
class Metadata:
    """What a metadata table says of a collection.

    ``rows``: ``(relative path, label, group or None, line)`` per clip, in file order (the
    line of the table it is on, for messages);
    ``group_by``: what the groups are (``artist``, ``album``, ``track``, ``group``), or None
    when the table has none; ``column``: the header of that column.
    """

    source: Path
    kind: str                       # "manifest", "mtg-jamendo" or "fma"
    label_column: str
    group_by: Optional[str]
    column: Optional[str]
    rows: list[tuple[str, str, Optional[str], int]] = field(default_factory=list)

    def describe(self) -> str:
        """One line for the run summary: which file, which columns."""
        groups = (f"groups by {self.group_by} ('{self.column}': "
                  f"{len({r[2] for r in self.rows if r[2] is not None}):,})"
                  if self.group_by else "no group column (clips of one recording may be split)")
        return f"metadata: {self.source.name} ({self.kind}; genre from '{self.label_column}', {groups})"


def _group_column(fieldnames: Iterable[str]) -> tuple[Optional[str], Optional[str]]:
    """``(what, header)`` of the coarsest group column among ``fieldnames``."""
    lower = {name.strip().lower(): name for name in fieldnames if name}
    for what, names in GROUP_COLUMNS:
        for name in names:
            if name in lower:
                return what, lower[name]
    return None, None


def _open_text(path: Path):
    # utf-8-sig: spreadsheets save "CSV UTF-8" with a byte-order mark
    return open(path, newline="", encoding="utf-8-sig")


def _text_error(path: Path, exc: Exception) -> DatasetError:
    if isinstance(exc, UnicodeDecodeError):
        return DatasetError(f"{path}: not a UTF-8 text table (byte 0x{exc.object[exc.start]:02x} "
                            f"at position {exc.start}); save it as CSV UTF-8")
    if isinstance(exc, OSError):
        from deepfusion.io.atomic import os_error_reason

        return DatasetError(f"{path}: cannot read the metadata table ({os_error_reason(exc)})")
    return DatasetError(f"{path}: not a readable CSV table ({str(exc).rstrip('.')})")


def _header(path: Path) -> list[str]:
    """The first line of a table, split on tabs for ``.tsv`` and commas otherwise."""
    with _open_text(path) as fh:
        line = fh.readline(1 << 16)
    delimiter = "\t" if path.suffix.lower() == ".tsv" or "\t" in line else ","
    return next(csv.reader([line], delimiter=delimiter), [])


def _kind(path: Path) -> Optional[str]:
    """Which kind of table ``path`` is, from its header; None for any other file."""
    try:
        header = [h.strip() for h in _header(path)]
    except (OSError, UnicodeDecodeError, csv.Error):
        return None
    lower = {h.lower() for h in header}
    if "path" in lower and lower & set(LABEL_COLUMNS):
        return "manifest"
    if {"TRACK_ID", "PATH", "TAGS"} <= set(header):
        return "mtg-jamendo"
    if len(header) > 1 and header[0] == "" and {"track", "artist", "album"} <= set(header):
        return "fma"
    return None


def find_metadata(root: Path) -> Optional[Path]:
    """The metadata table at the root of the audio folder ``root``, or None.

    Every ``.csv``/``.tsv`` file there is looked at (its header line); ``manifest.csv``
    first, then in name order. Files over :data:`LOOK_LIMIT` are skipped unless named
    ``tracks.csv`` (FMA).
    """
    try:
        candidates = sorted((p for p in Path(root).iterdir()
                             if p.suffix.lower() in TABLE_SUFFIXES and p.is_file()
                             and not p.name.startswith(".")),
                            key=lambda p: (p.name != "manifest.csv", p.name))
    except OSError:
        return None
    for path in candidates:
        try:
            big = path.stat().st_size > LOOK_LIMIT
        except OSError:
            continue
        if big and path.name != "tracks.csv":
            continue
        if _kind(path) is not None:
            return path
    return None


def read_metadata(path: Path, root: Path) -> Metadata:
    """Read the table ``path`` (any kind :func:`find_metadata` recognises) of the audio
    folder ``root``.

    Raises
    ------
    DatasetError
        Not a table of a known kind, unreadable, or with empty or repeated paths.
    """
    path = Path(path)
    try:
        kind = _kind(path)
        if kind is None:
            header = ", ".join(h for h in _header(path) if h) or "nothing"
            raise DatasetError(f"{path}: needs a header with 'path' and 'label' (or 'genre') "
                               f"columns, found: {header}")
        reader = {"manifest": _manifest, "mtg-jamendo": _mtg_jamendo, "fma": _fma}[kind]
        meta = reader(path, Path(root))
    except (OSError, UnicodeDecodeError, csv.Error) as exc:
        raise _text_error(path, exc) from None
    seen: dict[str, int] = {}
    for rel, _, _, line in meta.rows:
        key = PurePosixPath(rel).as_posix()
        if key in seen:
            raise DatasetError(f"{path}: line {line}: {rel!r} is listed again (first on line "
                               f"{seen[key]}); list each file once")
        seen[key] = line
    if not meta.rows:
        raise DatasetError(f"{path}: lists no clip with a genre")
    return meta


def _manifest(path: Path, root: Path) -> Metadata:
    with _open_text(path) as fh:
        delimiter = "\t" if path.suffix.lower() == ".tsv" else ","
        reader = csv.DictReader(fh, delimiter=delimiter)
        fields = {f.strip().lower(): f for f in reader.fieldnames or [] if f}
        label_col = next(fields[c] for c in LABEL_COLUMNS if c in fields)
        path_col = fields["path"]
        group_by, group_col = _group_column(reader.fieldnames or [])
        rows = []
        for line, row in enumerate(reader, start=2):
            rel, label = (row.get(path_col) or "").strip(), (row.get(label_col) or "").strip()
            if not rel or not label:
                raise DatasetError(f"{path}: line {line}: empty path or {label_col}")
            group = (row.get(group_col) or "").strip() or None if group_col else None
            rows.append((rel, label, group, line))
    return Metadata(path, "manifest", label_col, group_by, group_col, rows)


def _mtg_jamendo(path: Path, root: Path) -> Metadata:
    """MTG-Jamendo's TSV: one track per line, its tags (``genre---rock``) in the last
    columns; the first genre tag is the label (a track without one is left out)."""
    rows = []
    with _open_text(path) as fh:
        reader = csv.reader(fh, delimiter="\t")
        header = next(reader)
        col = {h: i for i, h in enumerate(header)}
        group_col = next((c for c in ("ARTIST_ID", "ALBUM_ID", "TRACK_ID") if c in col), None)
        for line, row in enumerate(reader, start=2):
            if len(row) <= col["PATH"]:
                continue
            genres = [t[len("genre---"):] for t in row[col["TAGS"]:] if t.startswith("genre---")]
            if not genres:
                continue
            group = row[col[group_col]].strip() if group_col and len(row) > col[group_col] else None
            rows.append((row[col["PATH"]].strip(), genres[0], group or None, line))
    what = {"ARTIST_ID": "artist", "ALBUM_ID": "album", "TRACK_ID": "track"}.get(group_col)
    return Metadata(path, "mtg-jamendo", "TAGS (first genre---)", what, group_col, rows)


def _fma(path: Path, root: Path) -> Metadata:
    """FMA's ``tracks.csv``: two header rows name (section, field), a third ``track_id``;
    the label is ``track.genre_top`` (tracks without one are left out), the group the
    artist id; audio files are ``000/000002.mp3`` under ``root``."""
    with _open_text(path) as fh:
        reader = csv.reader(fh)
        top, sub = next(reader), next(reader)
        next(reader)                                   # track_id,,,...
        section = ""
        columns = {}
        for i, (a, b) in enumerate(zip(top, sub)):
            section = a or section
            columns[(section, b)] = i
        genre = columns.get(("track", "genre_top"))
        artist = columns.get(("artist", "id"))
        if genre is None:
            raise DatasetError(f"{path}: an FMA tracks.csv without track.genre_top")
        present = {int(p.stem): p.relative_to(root).as_posix()
                   for p in root.glob("*/*.mp3") if p.stem.isdigit()}
        rows = []
        for line, row in enumerate(reader, start=4):
            if not row or not row[0].strip().isdigit() or len(row) <= genre:
                continue
            rel = present.get(int(row[0]))
            label = row[genre].strip()
            if rel is None or not label:
                continue
            group = row[artist].strip() if artist is not None and len(row) > artist else None
            rows.append((rel, label, group or None, line))
    return Metadata(path, "fma", "track.genre_top", "artist" if artist is not None else None,
                    "artist.id" if artist is not None else None, rows)
