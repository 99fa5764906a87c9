"""Rebuild deepfusion/features/pretrained/weights/{MSD,MTT}_musicnn.npz from the musicnn 0.1.0 wheel.

The wheel (ISC licence, on PyPI) holds TensorFlow 1 checkpoints; this reads them without
TensorFlow or protobuf: a checkpoint's ``.index`` is a LevelDB table (an SSTable) mapping each
variable name to a ``BundleEntryProto`` (dtype, shape, offset and size in the
``.data-00000-of-00001`` file, CRC32C of the bytes). Only the 64 inference variables of
``deepfusion.features.pretrained.musicnn.VARIABLES`` are kept (not Adam's slots nor the beta powers),
float32, TensorFlow names and layouts, in that fixed order, in a zip without compression and
with fixed timestamps, so the files are byte-reproducible; each is written atomically and its
SHA-256 checked against ``musicnn.WEIGHTS_SHA256`` (exit 1 on a mismatch).

Usage: python benchmarks/musicnn_convert.py [--wheel musicnn-0.1.0-py3-none-any.whl]
       [--out-dir deepfusion/features/pretrained/weights]
       python benchmarks/musicnn_convert.py --onnx     # the ONNX forms, from the weights

``--onnx`` writes ``<model>.onnx``: the network from patches to the pretrained view's rows,
which ``predict --engine onnx`` computes with onnxruntime where torch is not installed; each
is checked against the torch port before it is written (ONNX bytes depend on the exporter's
version, so these are checked by their outputs, not by a hash).
Without ``--wheel`` the wheel is fetched with ``pip download musicnn==0.1.0 --no-deps`` into a
temporary folder (never installed: it pins numpy < 1.17 and TensorFlow 1).
"""

from __future__ import annotations

import argparse
import hashlib
import os
import struct
import subprocess
import sys
import tempfile
import zipfile
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from deepfusion.features.pretrained import musicnn  # noqa: E402

WHEEL = "musicnn==0.1.0"
_TABLE_MAGIC = 0xDB4775248B80FB57
_DT_FLOAT = 1


# ---------------------------------------------------------------- CRC32C (Castagnoli)

def _crc_table() -> list[int]:
    table = []
    for i in range(256):
        c = i
        for _ in range(8):
            c = (c >> 1) ^ 0x82F63B78 if c & 1 else c >> 1
        table.append(c)
    return table


_CRC_TABLE = _crc_table()


def crc32c(data: bytes) -> int:
    """CRC32C of ``data`` (pure Python, about 1 s for 3 MB: only the variables kept)."""
    crc, table = 0xFFFFFFFF, _CRC_TABLE
    for b in data:
        crc = table[(crc ^ b) & 0xFF] ^ (crc >> 8)
    return crc ^ 0xFFFFFFFF


def _unmask(masked: int) -> int:
    """LevelDB/TensorFlow store CRCs masked: rotate right by 15 bits after subtracting a delta."""
    rot = (masked - 0xA282EAD8) & 0xFFFFFFFF
    return ((rot >> 17) | (rot << 15)) & 0xFFFFFFFF


# ---------------------------------------------------------------- protobuf wire format

def _varint(buf: bytes, pos: int) -> tuple[int, int]:
    value = shift = 0
    while True:
        b = buf[pos]
        pos += 1
        value |= (b & 0x7F) << shift
        if not b & 0x80:
            return value, pos
        shift += 7


def _fields(buf: bytes) -> dict[int, list]:
    """A protobuf message's fields: number -> values (ints for varint/fixed, bytes for
    length-delimited), enough for BundleHeaderProto, BundleEntryProto and TensorShapeProto."""
    out: dict[int, list] = {}
    pos = 0
    while pos < len(buf):
        key, pos = _varint(buf, pos)
        number, wire = key >> 3, key & 7
        if wire == 0:
            value, pos = _varint(buf, pos)
        elif wire == 1:
            value, pos = struct.unpack_from("<Q", buf, pos)[0], pos + 8
        elif wire == 2:
            n, pos = _varint(buf, pos)
            value, pos = buf[pos:pos + n], pos + n
        elif wire == 5:
            value, pos = struct.unpack_from("<I", buf, pos)[0], pos + 4
        else:
            raise ValueError(f"protobuf wire type {wire} not supported")
        out.setdefault(number, []).append(value)
    return out


# ---------------------------------------------------------------- LevelDB table

def _block(table: bytes, offset: int, size: int) -> bytes:
    """One block of the table, its trailer (compression type, masked CRC32C) checked."""
    data = table[offset:offset + size]
    kind, crc = struct.unpack_from("<BI", table, offset + size)
    if kind != 0:
        raise ValueError(f"table block at {offset} is compressed (type {kind}); not supported")
    if crc32c(data + bytes([kind])) != _unmask(crc):
        raise ValueError(f"table block at {offset}: CRC mismatch")
    return data


def _block_entries(block: bytes):
    """(key, value) of a block: prefix-compressed keys, then the restart array."""
    n_restarts = struct.unpack_from("<I", block, len(block) - 4)[0]
    end = len(block) - 4 - 4 * n_restarts
    pos, key = 0, b""
    while pos < end:
        shared, pos = _varint(block, pos)
        unshared, pos = _varint(block, pos)
        n_value, pos = _varint(block, pos)
        key = key[:shared] + block[pos:pos + unshared]
        pos += unshared
        yield key, block[pos:pos + n_value]
        pos += n_value


def table_entries(table: bytes):
    """Every (key, value) of a LevelDB table file, in key order."""
    footer = table[-48:]
    if struct.unpack_from("<Q", footer, 40)[0] != _TABLE_MAGIC:
        raise ValueError("not a LevelDB table (bad magic)")
    _, pos = _varint(footer, 0)                 # metaindex handle: offset, size (unused)
    _, pos = _varint(footer, pos)
    index_offset, pos = _varint(footer, pos)
    index_size, pos = _varint(footer, pos)
    for _, handle in _block_entries(_block(table, index_offset, index_size)):
        offset, p = _varint(handle, 0)
        size, _ = _varint(handle, p)
        yield from _block_entries(_block(table, offset, size))


def read_bundle(index: bytes, data: bytes, names) -> dict[str, np.ndarray]:
    """The float32 tensors ``names`` of a single-shard TensorFlow checkpoint (CRC-checked)."""
    entries = dict(table_entries(index))
    header = _fields(entries.pop(b""))
    if header.get(1, [1])[0] != 1 or header.get(2, [0])[0] != 0:
        raise ValueError("only single-shard little-endian checkpoints are supported")
    out = {}
    for name in names:
        raw = entries.get(name.encode())
        if raw is None:
            raise KeyError(f"{name} not in the checkpoint")
        f = _fields(raw)
        if f.get(1, [0])[0] != _DT_FLOAT or f.get(3, [0])[0] != 0 or 7 in f:
            raise ValueError(f"{name}: not a float32 tensor of shard 0 without slices")
        shape = tuple(_fields(d).get(1, [0])[0] for d in _fields(f[2][0]).get(2, [])) \
            if 2 in f else ()
        offset, size = f.get(4, [0])[0], f.get(5, [0])[0]
        buf = data[offset:offset + size]
        if len(buf) != size or size != 4 * int(np.prod(shape, dtype=np.int64)):
            raise ValueError(f"{name}: {size} bytes for shape {shape}")
        if crc32c(buf) != _unmask(f[6][0]):
            raise ValueError(f"{name}: CRC mismatch")
        out[name] = np.frombuffer(buf, dtype="<f4").reshape(shape).astype(np.float32)
    return out


# ---------------------------------------------------------------- output

def write_npz(path: Path, arrays: dict[str, np.ndarray]) -> None:
    """``np.savez`` without compression, but with fixed zip metadata (no timestamps), written
    to a temporary file beside ``path`` and renamed over it."""
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    try:
        with zipfile.ZipFile(tmp, "w", compression=zipfile.ZIP_STORED) as zf:
            for key, value in arrays.items():
                info = zipfile.ZipInfo(f"{key}.npy", date_time=(1980, 1, 1, 0, 0, 0))
                info.compress_type = zipfile.ZIP_STORED
                info.create_system = 3
                info.external_attr = 0o644 << 16
                with zf.open(info, "w", force_zip64=True) as fh:
                    np.lib.format.write_array(fh, np.ascontiguousarray(value, dtype="<f4"),
                                              allow_pickle=False)
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


def fetch_wheel(folder: Path) -> Path:
    subprocess.run([sys.executable, "-m", "pip", "download", WHEEL, "--no-deps", "-q",
                    "-d", str(folder)], check=True)
    return next(folder.glob("musicnn-0.1.0-*.whl"))


def convert(wheel: Path, out_dir: Path) -> bool:
    """Write both models' .npz into ``out_dir``; True when every hash is the expected one."""
    print(f"wheel {wheel.name} sha256 {hashlib.sha256(wheel.read_bytes()).hexdigest()}")
    names = [n for n, _ in musicnn.VARIABLES]
    ok = True
    with zipfile.ZipFile(wheel) as zf:
        for model in musicnn.MODELS:
            arrays = read_bundle(zf.read(f"musicnn/{model}/.index"),
                                 zf.read(f"musicnn/{model}/.data-00000-of-00001"), names)
            for name, shape in musicnn.VARIABLES:
                if arrays[name].shape != shape:
                    raise ValueError(f"{model} {name}: shape {arrays[name].shape}, "
                                     f"expected {shape}")
            path = out_dir / f"{model}.npz"
            write_npz(path, arrays)
            digest = hashlib.sha256(path.read_bytes()).hexdigest()
            good = digest == musicnn.WEIGHTS_SHA256[model]
            ok &= good
            n_values = sum(a.size for a in arrays.values())
            print(f"{model}: {len(arrays)} variables, {n_values:,} values, "
                  f"{path.stat().st_size:,} bytes -> {path}")
            verdict = "ok" if good else f"mismatch (expected {musicnn.WEIGHTS_SHA256[model]})"
            print(f"{model}: sha256 {digest} {verdict}")
    return ok


def export_onnx(out_dir: Path) -> bool:
    """Write ``<model>.onnx`` beside the weights: the port from patches (P, 187, 96) to the
    pretrained view's rows (P, 811) (:func:`deepfusion.features.pretrained.view.view_rows`), for a
    machine that classifies with onnxruntime and has no torch. Checked against the torch port
    on the reference patches of ``tests/data`` (and random ones) before it is kept."""
    import io

    import onnxruntime as ort
    import torch

    from deepfusion.features.pretrained.view import view_rows

    class Rows(torch.nn.Module):
        def __init__(self, net):
            super().__init__()
            self.net = net

        def forward(self, patches):
            return view_rows(self.net(patches))

    ref = ROOT / "tests" / "data" / "musicnn_reference.npz"
    ok = True
    for model in musicnn.MODELS:
        rows = Rows(musicnn.load_musicnn(model)).eval()
        example = torch.randn(2, musicnn.PATCH_FRAMES, musicnn.N_MELS)
        buffer = io.BytesIO()
        torch.onnx.export(rows, (example,), buffer, dynamo=False, input_names=["patches"],
                          output_names=["rows"], opset_version=17,
                          dynamic_axes={"patches": {0: "patches"}, "rows": {0: "patches"}})
        data = buffer.getvalue()
        with np.load(ref) as f:
            x = np.concatenate([f["x"], np.random.default_rng(0).normal(
                2, 1, (5, musicnn.PATCH_FRAMES, musicnn.N_MELS))]).astype(np.float32)
        session = ort.InferenceSession(data, providers=["CPUExecutionProvider"])
        got = session.run(None, {"patches": x})[0]
        with torch.inference_mode():
            want = rows(torch.from_numpy(x)).numpy()
        diff = float(np.abs(got - want).max() / np.abs(want).max())
        good = diff < 1e-5
        ok &= good
        path = out_dir / f"{model}.onnx"
        if good:
            tmp = path.with_suffix(".onnx.tmp")
            tmp.write_bytes(data)
            os.replace(tmp, path)
        print(f"{model}: ONNX rows vs torch on {len(x)} patches: max difference {diff:.2e} of "
              f"the largest value -> {path if good else 'not written'} ({len(data):,} bytes)")
    return ok


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--wheel", type=Path, help="musicnn-0.1.0 wheel (default: pip download it)")
    ap.add_argument("--out-dir", type=Path, default=ROOT / "deepfusion/features/pretrained/weights")
    ap.add_argument("--onnx", action="store_true", help="write the ONNX forms only (from the "
                    "shipped weights; needs torch, onnx and onnxruntime)")
    args = ap.parse_args(argv)
    args.out_dir.mkdir(parents=True, exist_ok=True)
    if args.onnx:
        ok = export_onnx(args.out_dir)
    elif args.wheel is not None:
        ok = convert(args.wheel, args.out_dir)
    else:
        with tempfile.TemporaryDirectory() as tmp:
            ok = convert(fetch_wheel(Path(tmp)), args.out_dir)
    print("ok" if ok else "mismatch")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
