"""The compiled HPSS steps (deepfusion.features.hpss): the sorting network's median, its
kernels and their cache folder, and the soft masks, each against scipy's or librosa's own."""

from __future__ import annotations

import os
import stat

import librosa
import numpy as np
import pytest
import scipy.ndimage

from deepfusion.features import hpss


@pytest.mark.parametrize("size", range(1, hpss.MAX_NETWORK + 1, 2))
def test_the_network_leaves_the_median_in_the_middle(size):
    # applied to many columns at once with numpy, including ties and sorted runs
    rng = np.random.default_rng(size)
    values = np.concatenate([rng.integers(0, 4, (size, 400)), rng.random((size, 400)),
                             np.sort(rng.random((size, 50)), axis=0),
                             np.sort(rng.random((size, 50)), axis=0)[::-1]], axis=1)
    v = list(values.copy())
    for i, j, lo, hi in hpss.median_network(size):
        low, high = np.minimum(v[i], v[j]), np.maximum(v[i], v[j])
        if lo:
            v[i] = low
        if hi:
            v[j] = high
    np.testing.assert_array_equal(v[size // 2], np.median(values, axis=0))


def test_the_default_network_is_pruned():
    net = hpss.median_network(31)
    assert len(net) == 152
    assert len(hpss.median_network(31)) < len([p for p in hpss._batcher(32) if p[1] < 31])
    # a half comparator keeps one side only
    assert any(lo != hi for _, _, lo, hi in net)


def _scipy(S, size, axis):
    shape = [1] * S.ndim
    shape[axis] = size
    return scipy.ndimage.median_filter(S, size=shape, mode="reflect")


@pytest.mark.parametrize("size", [3, 31])
@pytest.mark.parametrize("axis", [0, 1, -1, -2])
@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_running_median_is_scipys(size, axis, dtype):
    rng = np.random.default_rng(size)
    S = rng.random((40, 57)).astype(dtype)
    S[3:9, 10:20] = 0.25            # ties
    got = hpss.running_median(S, size=size, axis=axis)
    assert got.dtype == dtype and got.flags.c_contiguous
    np.testing.assert_array_equal(got, _scipy(S, size, axis))


@pytest.mark.parametrize("shape", [(1, 9), (5, 1), (4, 3)])
def test_windows_longer_than_the_axis_reflect_as_scipy(shape):
    S = np.random.default_rng(0).random(shape).astype(np.float32)
    for axis in (0, 1):
        np.testing.assert_array_equal(hpss.running_median(S, size=31, axis=axis),
                                      _scipy(S, 31, axis))


@pytest.mark.parametrize("axis", [0, 1, 2, -1, -2])
def test_a_batch_is_one_call(axis):
    cube = np.random.default_rng(5).random((3, 20, 25)).astype(np.float32)
    np.testing.assert_array_equal(hpss.running_median(cube, size=5, axis=axis),
                                  _scipy(cube, 5, axis))
    line = cube[0, 0]
    np.testing.assert_array_equal(hpss.running_median(line, size=5, axis=0), _scipy(line, 5, 0))


def test_long_windows_and_integers_take_bottleneck():
    rng = np.random.default_rng(1)
    S = rng.random((30, 140)).astype(np.float32)
    size = hpss.MAX_NETWORK + 2
    np.testing.assert_array_equal(hpss.running_median(S, size=size, axis=1), _scipy(S, size, 1))
    counts = rng.integers(0, 9, (12, 30))
    np.testing.assert_array_equal(hpss.running_median(counts, size=5, axis=1),
                                  _scipy(counts, 5, 1))
    assert hpss.running_median(S, size=1, axis=0) is not S


def test_kernel_files_live_in_a_private_folder(tmp_path, monkeypatch):
    folder = tmp_path / "kernels"
    monkeypatch.setenv("DEEPFUSION_KERNEL_DIR", str(folder))
    assert hpss.kernel_dir() == folder
    assert stat.S_IMODE(folder.stat().st_mode) & 0o077 == 0
    os.chmod(folder, 0o777)
    assert hpss.kernel_dir() is None                # writable by others: its code is not run
    os.chmod(folder, 0o700)
    blocked = tmp_path / "file"
    blocked.write_text("")
    monkeypatch.setenv("DEEPFUSION_KERNEL_DIR", str(blocked / "sub"))
    assert hpss.kernel_dir() is None


def test_a_changed_kernel_file_is_written_again(tmp_path, monkeypatch):
    monkeypatch.setenv("DEEPFUSION_KERNEL_DIR", str(tmp_path))
    hpss._kernel.cache_clear()
    try:
        S = np.random.default_rng(2).random((12, 20)).astype(np.float32)
        want = _scipy(S, 3, 0)
        np.testing.assert_array_equal(hpss.running_median(S, size=3, axis=0), want)
        (path,) = tmp_path.glob("median3_*.py")
        assert path.read_text() == hpss.kernel_source(3, cached=True)
        path.write_text("def kernel(X, out):\n    out[...] = 7\n")   # tampered with
        hpss._kernel.cache_clear()
        np.testing.assert_array_equal(hpss.running_median(S, size=3, axis=0), want)
        assert path.read_text() == hpss.kernel_source(3, cached=True)
    finally:
        hpss._kernel.cache_clear()


def test_without_a_folder_the_kernel_is_compiled_in_memory(monkeypatch):
    monkeypatch.setattr(hpss, "kernel_dir", lambda: None)
    hpss._kernel.cache_clear()
    try:
        S = np.random.default_rng(3).random((15, 11)).astype(np.float32)
        np.testing.assert_array_equal(hpss.running_median(S, size=5, axis=1), _scipy(S, 5, 1))
    finally:
        hpss._kernel.cache_clear()


@pytest.mark.parametrize("power,margin,exact", [(2.0, 1.0, True), (2.0, 3.0, True),
                                                (1.0, 1.0, True), (3.0, 1.5, False)])
def test_soft_masks_are_librosas(power, margin, exact):
    rng = np.random.default_rng(4)
    harm = rng.random((50, 60)).astype(np.float32)
    perc = rng.random((50, 60)).astype(np.float32)
    harm[:5, :5] = perc[:5, :5] = 0          # both zero: split (margin 1) or nothing
    harm[5, :5] = 1e-30                      # tiny, not zero: a ratio, not a split
    split = margin == 1
    want = (librosa.util.softmask(harm, perc * margin, power=power, split_zeros=split),
            librosa.util.softmask(perc, harm * margin, power=power, split_zeros=split))
    got = hpss.soft_masks(harm, perc, power=power, margin=margin)
    for g, w in zip(got, want):
        assert g.dtype == np.float32
        if exact:
            np.testing.assert_array_equal(g, w)
        else:
            np.testing.assert_allclose(g, w, rtol=1e-6, atol=1e-7)
    assert got[0][0, 0] == (0.5 if split else 0.0)


def test_an_infinite_power_is_librosas_hard_mask():
    harm = np.array([[1.0, 0.2]], np.float32)
    perc = np.array([[0.5, 0.4]], np.float32)
    mask_h, mask_p = hpss.soft_masks(harm, perc, power=np.inf, margin=1.0)
    np.testing.assert_array_equal(mask_h, [[True, False]])
    np.testing.assert_array_equal(mask_p, [[False, True]])
