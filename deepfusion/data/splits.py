"""Which clips train, validate and test: grouped random splits (a track, an artist or a
source stays on one side), split files (GTZAN's fault-filtered split ships in the package),
the check that no group spans two splits, and the lines that describe a split."""

from __future__ import annotations

import csv
from importlib import resources
from pathlib import Path
from typing import Any, Optional

import numpy as np

from deepfusion.config import TrainConfig
from deepfusion.errors import DatasetError
from deepfusion.io.atomic import library_text, os_error_reason
from deepfusion.io.featureset import FeatureSet

SPLITS = ("train", "val", "test")


#: Split files shipped with deepfusion, by alias.
SPLIT_ALIASES = {"gtzan-fault-filtered": "gtzan_fault_filtered.csv"}


def make_split(labels: np.ndarray, groups: np.ndarray, *, val_size: float, test_size: float,
               seed: int) -> np.ndarray:
    """Assign each clip to train/val/test, stratified by genre, keeping each group on one side.

    Groups are shuffled (seeded) within each genre (a group's genre is its first clip's) and
    dealt to test and val until each holds its share of the genre's clips; the rest is train.

    Returns
    -------
    np.ndarray [shape=(n_clips,)] of str: 'train', 'val' or 'test'
    """
    rng = np.random.default_rng(seed)
    split = np.full(len(labels), "train", dtype=object)
    group_label: dict[int, int] = {}
    members: dict[int, list[int]] = {}
    for i, (label, group) in enumerate(zip(labels.tolist(), groups.tolist())):
        group_label.setdefault(group, label)
        members.setdefault(group, []).append(i)
    for label in sorted(set(group_label.values())):
        gs = [g for g, lab in group_label.items() if lab == label]
        gs = [gs[i] for i in rng.permutation(len(gs))]
        total = sum(len(members[g]) for g in gs)
        want = {"test": test_size * total, "val": val_size * total}
        for name in ("test", "val"):
            have = 0
            # deal groups while that brings the count closer to the target, keeping one for train
            while gs and len(gs) > 1 and want[name] > 0 and (
                    have == 0 or abs(have + len(members[gs[0]]) - want[name]) < abs(have - want[name])):
                g = gs.pop(0)
                split[members[g]] = name
                have += len(members[g])
    return split


def resolve_split_file(spec: str | Path) -> Path:
    """A split file path, or a shipped one by alias (``gtzan-fault-filtered``)."""
    if str(spec) in SPLIT_ALIASES:
        return Path(str(resources.files("deepfusion") / "splits" / SPLIT_ALIASES[str(spec)]))
    from deepfusion.io.guard import require_regular_file

    path = Path(spec)
    if path.is_dir():
        raise DatasetError(f"{path}: a folder, not a split file; give a CSV with path,split "
                           "columns")
    require_regular_file(path, what="the split file", error=DatasetError)
    if not path.is_file():
        aliases = ", ".join(SPLIT_ALIASES)
        raise DatasetError(f"{path}: split file not found; give a CSV with path,split columns, "
                           f"or a shipped split: {aliases}")
    return path


def read_split_file(spec: str | Path, paths: list[str], *, source: str = "") -> np.ndarray:
    """Splits of ``paths`` from a ``path,split`` CSV; clips it does not list get ''.
    ``source``: the features file the paths come from (for the message of no overlap).

    Raises
    ------
    DatasetError
        Malformed file, unknown split names, empty paths or paths leaving the dataset root,
        a path listed twice, or no overlap.
    """
    from deepfusion.audio import resolve_inside

    path = resolve_split_file(spec)
    if not any(paths):
        raise DatasetError(f"{path}: the features file records no clip paths to match")
    wanted: dict[str, str] = {}
    first_line: dict[str, int] = {}
    try:
        with open(path, newline="", encoding="utf-8-sig") as fh:   # a BOM is allowed
            reader = csv.DictReader(fh)
            if not reader.fieldnames or not {"path", "split"} <= set(reader.fieldnames):
                raise DatasetError(f"{path}: needs 'path' and 'split' columns")
            for line, row in enumerate(reader, start=2):
                name = (row["split"] or "").strip()
                rel = (row["path"] or "").strip()
                if name not in SPLITS:
                    raise DatasetError(f"{path}: line {line}: split must be train, val or test, got {name!r}")
                if not rel:     # else its split would go to every clip without a path
                    raise DatasetError(f"{path}: line {line}: empty path")
                resolve_inside(Path("/dataset-root"), rel, source=f"{path}: line {line}",
                               show_root=False)
                if rel in first_line:
                    raise DatasetError(f"{path}: line {line}: {rel!r} is listed again (first on "
                                       f"line {first_line[rel]}); list each clip once")
                first_line[rel] = line
                wanted[rel] = name
    except OSError as exc:
        raise DatasetError(f"{path}: cannot read split file ({os_error_reason(exc)})") from None
    except UnicodeDecodeError as exc:
        raise DatasetError(f"{path}: not a UTF-8 text CSV (byte 0x{exc.object[exc.start]:02x} "
                           f"at position {exc.start}); save it as CSV UTF-8") from None
    except csv.Error as exc:
        raise DatasetError(f"{path}: not a readable CSV ({library_text(exc, 120)})") from None
    split = np.array([wanted.get(p, "") for p in paths], dtype=object)
    if not (split != "").any():
        features = source or "the features file"
        listed = next(iter(wanted), None)
        example = next((p for p in paths if p), "")
        detail = (f" (it lists {listed}; {features} has paths like {example}, relative to the "
                  "audio folder)" if listed is not None else " (it lists no clip)")
        raise DatasetError(f"{path}: none of its paths is a clip of {features}{detail}")
    return split


def check_split(split: np.ndarray, groups: np.ndarray, *, paths: Optional[list[str]] = None,
                split_file: Any = None) -> None:
    """Raise :class:`DatasetError` if a group (duplicate or track) spans two splits; the
    message names two of its clips when ``paths`` are given, and ``split_file``."""
    seen: dict[Any, tuple[str, int]] = {}
    for i, (s, g) in enumerate(zip(split.tolist(), groups.tolist())):
        if s == "":
            continue
        first, j = seen.setdefault(g, (s, i))
        if first != s:
            where = f"{split_file}: " if split_file is not None else ""
            if paths is not None and paths[j] and paths[i]:
                raise DatasetError(f"{where}{paths[j]} and {paths[i]} are one group (identical "
                                   "audio, or one track, album or artist) but in "
                                   f"{first} and {s}; put them in one split")
            raise DatasetError(f"{where}a group of identical or same-track clips spans {first} "
                               f"and {s}; put its clips in one split")


def split_lists(fs: FeatureSet, split: np.ndarray) -> dict[str, Any]:
    """The split as saved with a run: relative paths per split (indices when paths are absent)."""
    use_paths = all(fs.paths) and len(set(fs.paths)) == len(fs.paths)
    out: dict[str, Any] = {"by": "path" if use_paths else "index"}
    for name in ("train", "val", "test"):
        idx = np.flatnonzero(split == name)
        out[name] = [fs.paths[i] for i in idx] if use_paths else idx.tolist()
    return out


def split_summary(fs: FeatureSet, indices) -> str:
    """One line: clips, genres and the clips of each split (``indices``: train, val, test),
    and, when the clips carry groups, what they are and how many each split holds."""
    counts = ", ".join(f"{n} {len(i)}" for n, i in zip(SPLITS, indices))
    line = f"{len(fs)} clips, {len(fs.class_names)} genres ({', '.join(fs.class_names)}); split: {counts}"
    if fs.group_by:
        per = "/".join(str(len(set(fs.groups[i].tolist()))) for i in indices)
        line += f"; each {fs.group_by} on one side ({per} {fs.group_by}s)"
    return line


def ungrouped_warning(fs: FeatureSet) -> Optional[str]:
    """The line train says before a split it makes of clips that carry no groups (no artist,
    album or track: only identical audio is kept together), else None."""
    if fs.group_by is not None:
        return None
    return ("warning: the clips carry no artist, album or track, so test clips may be excerpts "
            "of recordings in the training clips, and the test accuracy then measures the "
            "recording, not the genre; give extract a metadata table with an artist, album or "
            "track_id column (a manifest.csv at the collection root, or --manifest), or train "
            "with a --split-file")


def choose_split(fs: FeatureSet, features: Path, config: TrainConfig,
                 split: Optional[np.ndarray] = None) -> np.ndarray:
    """The split of a training run: the one given (checked), the ``config.split_file``'s, or a
    grouped random one; refused when it leaves no training or validation clip, or a genre
    without a training clip."""
    if split is not None:
        split = np.asarray(split, dtype=object)
        check_split(split, fs.groups)
    elif config.split_file:
        split = read_split_file(config.split_file, fs.paths, source=fs.source)
        check_split(split, fs.groups, paths=fs.paths, split_file=config.split_file)
    else:
        split = make_split(fs.labels, fs.groups, val_size=config.val_size,
                           test_size=config.test_size, seed=config.seed)
    train_idx, val_idx = (np.flatnonzero(split == s) for s in ("train", "val"))
    if len(train_idx) == 0 or len(val_idx) == 0:
        raise DatasetError(f"{features}: the split leaves {len(train_idx)} training and "
                           f"{len(val_idx)} validation clips; both need at least one "
                           "(more clips, or a larger --val-size)")
    names = fs.class_names
    missing = sorted({names[c] for c in fs.labels} - {names[c] for c in fs.labels[train_idx]})
    if missing:
        raise DatasetError(f"{features}: no training clip of genre(s) {', '.join(missing)}")
    return split
