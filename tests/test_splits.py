"""Which clips train, validate and test (:mod:`deepfusion.data.splits`), function by function:
grouped random splits (no group on two sides, each genre's share, the seed), split files and
their refusals (one line each), the check of a split, and the lines that describe one.

In-process and fast: ``benchmarks/mutation.py`` runs these against each mutant of the module.
"""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import pytest

from deepfusion.config import TrainConfig
from deepfusion.data import splits
from deepfusion.data.splits import (check_split, choose_split, make_split, read_split_file,
                                    resolve_split_file, split_lists, split_summary,
                                    ungrouped_warning)
from deepfusion.errors import DatasetError
from deepfusion.io.featureset import FeatureSet


def _error(call, *args, **kwargs) -> str:
    with pytest.raises(DatasetError) as info:
        call(*args, **kwargs)
    return str(info.value)


def _features(labels, groups, paths=None, *, names=("blues", "jazz", "rock"), group_by=None,
              source="f.pkl") -> FeatureSet:
    labels = np.asarray(labels, np.int64)
    return FeatureSet(arrays={}, labels=labels, class_names=list(names),
                      paths=list(paths) if paths is not None else [""] * len(labels),
                      groups=np.asarray(groups, np.int64), source=source, group_by=group_by)


def _counts(split, labels, label) -> dict[str, int]:
    names, counts = np.unique(split[np.asarray(labels) == label], return_counts=True)
    return dict(zip(names.tolist(), counts.tolist()))


# ------------------------------------------------------------------------------- make_split

def test_each_genre_gets_its_share_of_single_clips():
    labels = np.repeat(np.arange(4), 20)
    for seed in range(3):
        split = make_split(labels, np.arange(80), val_size=0.25, test_size=0.15, seed=seed)
        assert split.dtype == object and len(split) == 80
        for label in range(4):
            assert _counts(split, labels, label) == {"test": 3, "val": 5, "train": 12}


def test_groups_never_span_splits_and_a_group_goes_with_its_first_clips_genre():
    rng = np.random.default_rng(3)
    labels = np.repeat(np.arange(3), 30)
    groups = rng.integers(0, 40, size=90)           # groups of 0 to 7 clips, some across genres
    for seed in range(4):
        split = make_split(labels, groups, val_size=0.2, test_size=0.2, seed=seed)
        check_split(split, groups)
        for g in np.unique(groups):
            assert len(set(split[groups == g])) == 1
    # group 9's first clip is blues, its second jazz: it is the blues' one group, so it
    # stays in train whatever the seed (were it jazz's, it would be dealt as often as theirs)
    labels = np.array([0, 1, 1, 1, 1])
    groups = np.array([9, 2, 3, 9, 4])
    for seed in range(8):
        split = make_split(labels, groups, val_size=0.0, test_size=0.5, seed=seed)
        assert split[0] == split[3] == "train" and (split == "test").sum() == 1, seed


def test_a_group_is_dealt_only_while_that_comes_closer_to_the_share():
    labels = np.zeros(10, int)
    groups = np.repeat(np.arange(5), 2)             # five pairs
    # test: 3 wanted; one pair gives 2, a second 4 (as far from 3): a tie keeps it in train.
    # val: 1 wanted; the first group is dealt whatever its size
    split = make_split(labels, groups, val_size=0.1, test_size=0.3, seed=0)
    assert _counts(split, labels, 0) == {"test": 2, "val": 2, "train": 6}
    # a share under one clip still takes a clip; a share of nothing takes none
    split = make_split(np.zeros(5, int), np.arange(5), val_size=0.0, test_size=0.1, seed=0)
    assert _counts(split, np.zeros(5), 0) == {"test": 1, "train": 4}


def test_the_last_group_of_a_genre_stays_in_train():
    labels = np.array([0, 0, 0, 1, 1, 1, 1, 2])
    groups = np.array([0, 0, 0, 1, 1, 2, 2, 3])     # blues: 1 group, jazz: 2, rock: 1 clip
    split = make_split(labels, groups, val_size=0.5, test_size=0.5, seed=0)
    assert _counts(split, labels, 0) == {"train": 3}
    assert _counts(split, labels, 1) == {"test": 2, "train": 2}
    assert _counts(split, labels, 2) == {"train": 1}


def test_a_seed_gives_one_split_always():
    labels = np.array([0] * 8 + [1] * 8)
    groups = np.array([0, 0, 1, 2, 3, 3, 3, 4, 5, 6, 6, 7, 8, 9, 10, 4])
    splits_of = [make_split(labels, groups, val_size=0.2, test_size=0.2, seed=s).tolist()
                 for s in range(6)]
    assert splits_of[0] == make_split(labels, groups, val_size=0.2, test_size=0.2, seed=0).tolist()
    assert len({tuple(s) for s in splits_of}) > 2
    # the split of a seed is part of every run's result: a later version repeats it
    t, v, r = "test", "val", "train"
    assert splits_of[1] == [v, v, r, r, r, r, r, t, r, r, r, r, r, v, t, t]


# ------------------------------------------------------------------------- split files

def test_the_shipped_split_by_its_alias():
    path = resolve_split_file("gtzan-fault-filtered")
    assert path.name == "gtzan_fault_filtered.csv" and path.is_file()
    assert path.read_text().startswith("path,split\n")
    assert resolve_split_file(Path("gtzan-fault-filtered")) == path


def test_a_split_file_that_is_no_file_is_refused_in_one_line(tmp_path):
    (tmp_path / "s.csv").write_text("path,split\n")
    assert resolve_split_file(tmp_path / "s.csv") == tmp_path / "s.csv"
    assert resolve_split_file(str(tmp_path / "s.csv")) == tmp_path / "s.csv"
    assert _error(resolve_split_file, tmp_path) == (
        f"{tmp_path}: a folder, not a split file; give a CSV with path,split columns")
    assert _error(resolve_split_file, tmp_path / "nope.csv") == (
        f"{tmp_path / 'nope.csv'}: split file not found; give a CSV with path,split columns, "
        "or a shipped split: gtzan-fault-filtered")
    fifo = tmp_path / "fifo.csv"
    os.mkfifo(fifo)
    assert _error(resolve_split_file, fifo) == (
        f"{fifo}: the split file is a FIFO (named pipe); give a regular file")


def _split_file(tmp_path, text: str | bytes, name: str = "s.csv") -> Path:
    path = tmp_path / name
    if isinstance(text, bytes):
        path.write_bytes(text)
    else:
        path.write_text(text, encoding="utf-8", newline="")
    return path


def test_a_split_file_gives_each_listed_clip_its_split(tmp_path):
    path = _split_file(tmp_path, "\ufeffsplit,path,note\r\n train ,a/1.wav,x\r\nval, b/2.wav \r\n"
                                 "test,c/3.wav,\r\n")
    split = read_split_file(path, ["a/1.wav", "b/2.wav", "c/3.wav", "d/4.wav", ""])
    assert split.dtype == object
    assert split.tolist() == ["train", "val", "test", "", ""]


def test_a_split_file_of_the_wrong_shape_is_refused_naming_the_line(tmp_path):
    paths = ["a.wav", "b.wav"]
    cases = {
        "path,genre\na.wav,train\n": "needs 'path' and 'split' columns",
        "path\na.wav\n": "needs 'path' and 'split' columns",
        "": "needs 'path' and 'split' columns",
        "path,split\na.wav,train\nb.wav,Test\n": "line 3: split must be train, val or test, got 'Test'",
        "path,split\na.wav\n": "line 2: split must be train, val or test, got ''",
        "path,split\na.wav,train\n../b.wav,val\n":
            "line 3: path '../b.wav' leaves the dataset root; paths are relative to --audio-dir",
        "path,split\n/b.wav,val\n":
            "line 2: path '/b.wav' leaves the dataset root; paths are relative to --audio-dir",
        "path,split\n ,test\na.wav,train\n": "line 2: empty path",
        "split,path\nval,a.wav\ntest\n": "line 3: empty path",
        "path,split\na.wav,train\nb.wav,val\n a.wav ,test\n":
            "line 4: 'a.wav' is listed again (first on line 2); list each clip once",
        "path,split\nx.wav,train\n": "none of its paths is a clip of f.pkl (it lists x.wav; f.pkl "
                                     "has paths like a.wav, relative to the audio folder)",
        "path,split\n": "none of its paths is a clip of f.pkl (it lists no clip)",
    }
    for i, (text, words) in enumerate(cases.items()):
        path = _split_file(tmp_path, text, f"s{i}.csv")
        assert _error(read_split_file, path, paths, source="f.pkl") == f"{path}: {words}", text
    path = _split_file(tmp_path, "path,split\nx.wav,train\n")
    assert _error(read_split_file, path, ["", "b.wav"]) == (
        f"{path}: none of its paths is a clip of the features file (it lists x.wav; the features "
        "file has paths like b.wav, relative to the audio folder)")
    assert _error(read_split_file, path, ["", ""]) == (
        f"{path}: the features file records no clip paths to match")


def test_a_split_file_that_is_not_readable_text_is_one_line(tmp_path, monkeypatch):
    path = _split_file(tmp_path, b"path,split\na.wav,train\n\xe9b.wav,val\n")
    assert _error(read_split_file, path, ["a.wav"]) == (
        f"{path}: not a UTF-8 text CSV (byte 0xe9 at position 23); save it as CSV UTF-8")
    path = _split_file(tmp_path, "path,split\n\"" + "x" * 200_000 + "\",train\n", "long.csv")
    assert _error(read_split_file, path, ["a.wav"]) == (
        f"{path}: not a readable CSV (field larger than field limit (131072))")

    def denied(*args, **kwargs):
        raise PermissionError(13, "Permission denied")

    monkeypatch.setattr(splits, "open", denied, raising=False)
    assert _error(read_split_file, path, ["a.wav"]) == (
        f"{path}: cannot read split file (permission denied)")


# --------------------------------------------------------------------------- check_split

def test_a_group_across_two_splits_is_refused_naming_its_clips():
    groups = np.array([1, 2, 1, 3])
    split = np.array(["train", "val", "test", "train"], dtype=object)
    paths = ["a.wav", "b.wav", "c.wav", "d.wav"]
    one_group = ("a.wav and c.wav are one group (identical audio, or one track, album or "
                 "artist) but in train and test; put them in one split")
    assert _error(check_split, split, groups, paths=paths, split_file="s.csv") == \
        f"s.csv: {one_group}"
    assert _error(check_split, split, groups, paths=paths) == one_group
    spans = "a group of identical or same-track clips spans train and test; put its clips in one split"
    assert _error(check_split, split, groups) == spans
    assert _error(check_split, split, groups, split_file=Path("s.csv")) == f"s.csv: {spans}"
    for missing in (["", "b", "c", "d"], ["a", "b", "", "d"]):
        assert _error(check_split, split, groups, paths=missing) == spans
    # clips a split file leaves out ('') belong to no side
    check_split(np.array(["train", "val", "", "train"], dtype=object), groups, paths=paths)
    check_split(np.array(["", "val", "test", "train"], dtype=object), groups, paths=paths)
    assert _error(check_split, np.array(["", "val", "test", "test"], dtype=object),
                  np.array([5, 1, 1, 3])) == spans.replace("train and test", "val and test")
    check_split(np.array(["test", "val", "test", "test"], dtype=object), groups)


# ---------------------------------------------------------------------------- choose_split

def test_choose_split_takes_the_given_the_files_or_a_grouped_random_split(tmp_path):
    labels = [0, 0, 0, 0, 1, 1, 1, 1]
    paths = [f"{i}.wav" for i in range(8)]
    fs = _features(labels, [0, 0, 1, 2, 3, 4, 5, 5], paths, names=("blues", "jazz"))
    given = ["train", "train", "val", "test", "train", "val", "test", "test"]
    split = choose_split(fs, Path("f.pkl"), TrainConfig(), split=given)
    assert split.dtype == object and split.tolist() == given
    with pytest.raises(DatasetError, match="^a group of identical or same-track clips spans"):
        choose_split(fs, Path("f.pkl"), TrainConfig(), split=["train", "val", *given[2:]])

    path = _split_file(tmp_path, "path,split\n" + "".join(
        f"{p},{s}\n" for p, s in zip(paths, given)))
    assert choose_split(fs, Path("f.pkl"), TrainConfig(split_file=str(path))).tolist() == given
    path = _split_file(tmp_path, "path,split\n9.wav,train\n", "n.csv")
    assert _error(choose_split, fs, Path("f.pkl"), TrainConfig(split_file=str(path))) == (
        f"{path}: none of its paths is a clip of f.pkl (it lists 9.wav; f.pkl has paths like "
        "0.wav, relative to the audio folder)")
    path = _split_file(tmp_path, "path,split\n0.wav,train\n1.wav,test\n4.wav,val\n", "g.csv")
    assert _error(choose_split, fs, Path("f.pkl"), TrainConfig(split_file=str(path))) == (
        f"{path}: 0.wav and 1.wav are one group (identical audio, or one track, album or "
        "artist) but in train and test; put them in one split")

    config = TrainConfig(val_size=0.25, test_size=0.25, seed=4)
    assert choose_split(fs, Path("f.pkl"), config).tolist() == make_split(
        fs.labels, fs.groups, val_size=0.25, test_size=0.25, seed=4).tolist()


def test_choose_split_refuses_a_split_without_training_or_validation_clips_or_genres():
    fs = _features([0, 0, 1, 1], [0, 1, 2, 3], names=("blues", "jazz"))
    for given, train, val in ((["val", "val", "val", "test"], 0, 3),
                              (["train", "test", "train", "test"], 2, 0)):
        assert _error(choose_split, fs, Path("f.pkl"), TrainConfig(), split=given) == (
            f"f.pkl: the split leaves {train} training and {val} validation clips; both need at "
            "least one (more clips, or a larger --val-size)")
    fs = _features([0, 0, 1, 1, 2, 2], range(6))
    assert _error(choose_split, fs, Path("f.pkl"), TrainConfig(),
                  split=["train", "val", "val", "val", "test", "val"]) == (
        "f.pkl: no training clip of genre(s) jazz, rock")
    assert choose_split(fs, Path("f.pkl"), TrainConfig(),
                        split=["train", "val", "train", "val", "train", "val"]) is not None


# ------------------------------------------------------------------ what is said of a split

def test_split_lists_are_paths_when_each_clip_has_its_own_else_indices():
    split = np.array(["test", "train", "val", "train"], dtype=object)
    fs = _features([0, 0, 1, 1], range(4), ["a", "b", "c", "d"])
    assert split_lists(fs, split) == {"by": "path", "train": ["b", "d"], "val": ["c"],
                                      "test": ["a"]}
    for paths in (["a", "b", "", "d"], ["a", "b", "a", "d"]):
        assert split_lists(_features([0, 0, 1, 1], range(4), paths), split) == {
            "by": "index", "train": [1, 3], "val": [2], "test": [0]}


def test_split_summary_and_the_warning_for_clips_without_groups():
    fs = _features([0, 1, 2, 2, 1], [7, 7, 8, 9, 9], names=("blues", "jazz", "rock"))
    indices = (np.array([0, 1, 2]), np.array([3]), np.array([4]))
    assert split_summary(fs, indices) == \
        "5 clips, 3 genres (blues, jazz, rock); split: train 3, val 1, test 1"
    assert ungrouped_warning(fs) == (
        "warning: the clips carry no artist, album or track, so test clips may be excerpts of "
        "recordings in the training clips, and the test accuracy then measures the recording, "
        "not the genre; give extract a metadata table with an artist, album or track_id column "
        "(a manifest.csv at the collection root, or --manifest), or train with a --split-file")
    fs = _features([0, 1, 2, 2, 1], [7, 7, 8, 9, 9], names=("blues", "jazz", "rock"),
                   group_by="artist")
    assert split_summary(fs, indices) == (
        "5 clips, 3 genres (blues, jazz, rock); split: train 3, val 1, test 1; each artist on "
        "one side (2/1/1 artists)")
    assert ungrouped_warning(fs) is None
