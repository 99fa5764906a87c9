"""Honest splits by default: a metadata table at the collection root is picked up, its
coarsest group column keeps artists (albums, tracks) on one side of train's split, a
collection without groups is warned about once, and evaluate's interval and cautions are
honest for few clips and few groups."""

from __future__ import annotations

import csv
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch

from deepfusion.io.metadata import find_metadata, read_metadata
from deepfusion.metrics import accuracy_interval, wilson_interval
from deepfusion.testing import invoke

PROBE = ("--model", "probe", "--quiet", "--val-size", "0.2", "--test-size", "0.3")


def _artist(rel: str) -> str:
    """Three artists per genre, two clips each."""
    genre, name = rel.split("/")
    return f"{genre}-artist-{int(name.split('.')[1]) // 2}"


@pytest.fixture()
def collection(tiny_audio, tmp_path):
    root = tmp_path / "music"
    shutil.copytree(tiny_audio, root)
    rels = sorted(p.relative_to(root).as_posix() for p in root.rglob("*.wav"))
    with open(root / "manifest.csv", "w", newline="") as fh:
        writer = csv.writer(fh)
        writer.writerow(["path", "genre", "album", "artist"])
        for rel in rels:
            writer.writerow([rel, rel.split("/")[0], f"{rel}-album", _artist(rel)])
    return root


def _extract(root: Path, out: Path, *extra):
    result = invoke("extract", "--audio-dir", root, "--out", out, "--duration", "6", "--quiet",
                    "--jobs", "1", "--cache-dir", out.parent / "cache", *extra)
    assert result.exit_code == 0, result.output
    return result


@pytest.mark.slow
def test_a_manifest_at_the_root_groups_the_split_by_artist(collection, tmp_path):
    features = tmp_path / "f.pkl"
    result = _extract(collection, features)
    assert "metadata: manifest.csv (manifest; genre from 'genre', groups by artist ('artist': 9))" \
        in result.stdout
    run = invoke("train", "--features", features, "--model-dir", tmp_path / "m", *PROBE)
    assert run.exit_code == 0, run.output
    assert "each artist on one side" in run.stdout and "warning" not in run.output
    ckpt = torch.load(tmp_path / "m" / "best.pth", weights_only=True)
    side = {}
    for name in ("train", "val", "test"):
        for rel in ckpt["split"][name]:
            assert side.setdefault(_artist(rel), name) == name, f"{_artist(rel)} in two splits"
    assert len(set(side.values())) == 3
    # evaluate names the groups in its interval and says what the figures cannot tell
    report = invoke("evaluate", "--checkpoint", tmp_path / "m" / "best.pth")
    assert report.exit_code == 0, report.output
    assert "Wilson over" in report.stdout and "groups" in report.stdout
    assert "warning: only" in report.stderr and "few artists per genre" in report.stderr


@pytest.mark.slow
def test_no_metadata_means_folder_genres_and_one_warning(collection, tmp_path):
    features = tmp_path / "f.pkl"
    result = _extract(collection, features, "--no-metadata")
    assert "metadata:" not in result.stdout
    run = invoke("train", "--features", features, "--model-dir", tmp_path / "m", *PROBE)
    assert run.exit_code == 0, run.output
    assert run.output.count("warning: the clips carry no artist, album or track") == 1
    # a split file is the user's own: no warning
    split = tmp_path / "split.csv"
    rels = sorted(p.relative_to(collection).as_posix() for p in collection.rglob("*.wav"))
    split.write_text("path,split\n" + "".join(
        f"{r},{('train', 'train', 'train', 'val', 'test', 'train')[i % 6]}\n" for i, r in enumerate(rels)))
    again = invoke("train", "--features", features, "--model-dir", tmp_path / "m2", *PROBE,
                   "--split-file", split)
    assert again.exit_code == 0, again.output
    assert "warning: the clips carry no" not in again.output


def test_other_tables_are_recognised(tmp_path):
    mtg = tmp_path / "mtg"
    (mtg / "14").mkdir(parents=True)
    (mtg / "autotagging_genre.tsv").write_text(
        "TRACK_ID\tARTIST_ID\tALBUM_ID\tPATH\tDURATION\tTAGS\n"
        "track_1\tartist_1\talbum_1\t14/1.mp3\t10.0\tgenre---rock\tgenre---pop\n"
        "track_2\tartist_1\talbum_1\t14/2.mp3\t10.0\tmood---sad\n")
    meta = read_metadata(find_metadata(mtg), mtg)
    assert (meta.kind, meta.group_by) == ("mtg-jamendo", "artist")
    assert [r[:3] for r in meta.rows] == [("14/1.mp3", "rock", "artist_1")]

    fma = tmp_path / "fma"
    (fma / "000").mkdir(parents=True)
    for tid in (2, 5):
        (fma / "000" / f"{tid:06d}.mp3").write_bytes(b"x")
    (fma / "tracks.csv").write_text(",album,artist,track,track\n,id,id,genre_top,title\n"
                                    "track_id,,,,\n2,1,1,Hip-Hop,a\n3,1,1,Hip-Hop,b\n5,2,7,,c\n")
    meta = read_metadata(find_metadata(fma), fma)
    assert (meta.kind, meta.group_by) == ("fma", "artist")
    assert [r[:3] for r in meta.rows] == [("000/000002.mp3", "Hip-Hop", "1")]

    # an explicit group column wins over artist; a table without a genre is not metadata
    plain = tmp_path / "plain"
    plain.mkdir()
    (plain / "notes.csv").write_text("name,amount\nrent,1\n")
    assert find_metadata(plain) is None
    (plain / "manifest.csv").write_text("path,label,artist,group\na.wav,rock,x,g1\n")
    assert read_metadata(plain / "manifest.csv", plain).group_by == "group"


def test_intervals_are_honest_for_few_clips_and_groups():
    assert wilson_interval(8, 8)[0] == pytest.approx(0.676, abs=1e-3)
    lo, hi, how = accuracy_interval(np.ones(8))
    assert (round(lo, 3), hi, how) == (0.676, 1.0, "Wilson, 8 clips")
    groups = np.repeat(np.arange(4), 2)           # 4 tracks of 2 clips: 4 observations, not 8
    lo_g, hi_g, how_g = accuracy_interval(np.ones(8), groups)
    assert lo_g < lo and hi_g == 1.0 and "4 groups" in how_g
    # many independent clips: close to the usual interval
    rng = np.random.default_rng(0)
    correct = (rng.random(2000) < 0.7).astype(float)
    lo, hi, _ = accuracy_interval(correct)
    assert hi - lo < 0.05 and lo < correct.mean() < hi
