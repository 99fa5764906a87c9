"""Pretrained ImageNet weights: resolve_pretrained's three modes, download, time-outs, cache.

All offline: the "downloads" come from servers these tests start on 127.0.0.1 (through
``DEEPFUSION_WEIGHTS_URL``), the weights are tiny fake state dicts named like torch.hub's files
(``<stem>-<first 8 hex of sha256>.pth``), the torch cache is a temporary ``TORCH_HOME``.
"""

from __future__ import annotations

import functools
import hashlib
import http.server
import io
import os
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch

from deepfusion.config import ModelConfig
from deepfusion.errors import ParameterError, WeightsNotFoundError
from deepfusion.models import weights
from deepfusion.models.net import build_model
from deepfusion.models.weights import pretrained_weights_file, resolve_pretrained

REAL_URL = "https://download.pytorch.org/models"


def _fake_bytes(value: float = 1.0) -> bytes:
    buf = io.BytesIO()
    torch.save({"w": torch.full((2,), value)}, buf)
    return buf.getvalue()


def _hub_name(data: bytes, stem: str = "fakenet") -> str:
    return f"{stem}-{hashlib.sha256(data).hexdigest()[:8]}.pth"


class Echo(list):
    def __call__(self, line: str) -> None:
        self.append(line)


@pytest.fixture
def torch_home(tmp_path, monkeypatch) -> Path:
    """An empty torch cache; returns its checkpoints folder (not created)."""
    home = tmp_path / "torch-home"
    monkeypatch.setenv("TORCH_HOME", str(home))
    monkeypatch.setattr(torch.hub, "_hub_dir", None)      # in case anyone called set_dir
    monkeypatch.delenv(weights.WEIGHTS_URL_ENV, raising=False)
    return home / "hub" / "checkpoints"


@pytest.fixture
def fake(monkeypatch, torch_home) -> SimpleNamespace:
    """resnet18's weights enum replaced by a tiny file's name (its hash prefix is right)."""
    data = _fake_bytes()
    name = _hub_name(data)
    monkeypatch.setattr(weights, "_weights_enum", lambda backbone: SimpleNamespace(url=f"{REAL_URL}/{name}"))
    return SimpleNamespace(data=data, name=name, cached=torch_home / name)


@pytest.fixture
def http_server(tmp_path):
    """A static file server on 127.0.0.1 (port 0) over a folder; yields (folder, base url)."""
    root = tmp_path / "served"
    root.mkdir()

    class Quiet(http.server.SimpleHTTPRequestHandler):
        def log_message(self, *args):
            pass

    server = http.server.ThreadingHTTPServer(
        ("127.0.0.1", 0), functools.partial(Quiet, directory=str(root)))
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield root, f"http://127.0.0.1:{server.server_address[1]}/"
    finally:
        server.shutdown()
        server.server_close()
        thread.join(5)


@pytest.fixture
def silent_server():
    """A listening socket on 127.0.0.1 that never accepts nor answers; yields its base url."""
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    try:
        sock.bind(("127.0.0.1", 0))
        sock.listen(16)               # the kernel completes handshakes; nobody ever replies
        yield f"http://127.0.0.1:{sock.getsockname()[1]}/"
    finally:
        sock.close()


@pytest.fixture
def trickle_server():
    """Answers 200 with a large Content-Length, then 4 KiB every 0.1 s; yields its base url."""
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.bind(("127.0.0.1", 0))
    sock.listen(16)
    sock.settimeout(0.2)
    stop = threading.Event()

    def serve(conn):
        with conn:
            try:
                conn.settimeout(5)
                conn.recv(65536)
                conn.sendall(b"HTTP/1.0 200 OK\r\nContent-Length: 100000000\r\n\r\n")
                while not stop.wait(0.1):
                    conn.sendall(b"x" * 4096)     # 40 KiB/s: below the 64 KiB/s floor
            except OSError:
                pass

    def accept_loop():
        while not stop.is_set():
            try:
                conn, _ = sock.accept()
            except OSError:
                continue
            threading.Thread(target=serve, args=(conn,), daemon=True).start()

    thread = threading.Thread(target=accept_loop, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{sock.getsockname()[1]}/"
    finally:
        stop.set()
        thread.join(5)
        sock.close()


@pytest.fixture
def closed_port_url() -> str:
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.bind(("127.0.0.1", 0))
    port = sock.getsockname()[1]
    sock.close()                      # bound then closed, never listened: connection refused
    return f"http://127.0.0.1:{port}/"


def _cache_is_clean(checkpoints: Path) -> None:
    """Nothing in the cache that is, or could later be taken as, weights; no temp leftovers."""
    left = sorted(p.name for p in checkpoints.iterdir()) if checkpoints.exists() else []
    assert left == [], left


def _assert_one_failure_line(echo: Echo, backbone: str = "resnet18") -> str:
    assert len(echo) == 1, echo
    line = echo[0]
    assert "\n" not in line and "Traceback" not in line
    assert line.startswith(f"warning: ImageNet weights for {backbone} could not be downloaded (")
    assert "training from scratch" in line and "--weights-path" in line and "--no-pretrained" in line
    assert line.count("(") == 1, line      # one level of parentheses
    return line


# ------------------------------------------------------------------------- the three sources

def test_weights_path_is_loaded(fake, tmp_path, monkeypatch, closed_port_url):
    monkeypatch.setenv(weights.WEIGHTS_URL_ENV, closed_port_url)   # no network even if it tried
    path = tmp_path / "my-weights.pth"
    path.write_bytes(_fake_bytes(3.0))
    echo = Echo()
    for mode in ("auto", "require"):
        state, source = resolve_pretrained("resnet18", mode=mode, weights_path=path, echo=echo)
        assert torch.equal(state["w"], torch.full((2,), 3.0))
        assert source == f"file {path}"
    assert echo == []
    _cache_is_clean(fake.cached.parent)


def test_missing_or_bad_weights_path_fails_even_in_auto(fake, tmp_path):
    bad = tmp_path / "garbage.pth"
    bad.write_bytes(b"not a torch file")
    for path in (tmp_path / "absent.pth", bad):
        for mode in ("auto", "require"):
            with pytest.raises(WeightsNotFoundError, match=str(path)) as info:
                resolve_pretrained("resnet18", mode=mode, weights_path=path, echo=Echo())
            assert "\n" not in str(info.value)


def test_torch_cache_is_used(fake, monkeypatch, closed_port_url):
    monkeypatch.setenv(weights.WEIGHTS_URL_ENV, closed_port_url)
    fake.cached.parent.mkdir(parents=True)
    fake.cached.write_bytes(fake.data)
    assert pretrained_weights_file("resnet18") == fake.cached
    echo = Echo()
    state, source = resolve_pretrained("resnet18", mode="auto", echo=echo)
    assert torch.equal(state["w"], torch.ones(2))
    assert source == f"torch cache {fake.cached}"
    assert echo == []


def test_download_from_local_server_lands_in_cache(fake, http_server, monkeypatch):
    root, base = http_server
    (root / fake.name).write_bytes(fake.data)
    monkeypatch.setenv(weights.WEIGHTS_URL_ENV, base)
    echo = Echo()
    state, source = resolve_pretrained("resnet18", mode="auto", progress=False, echo=echo)
    assert torch.equal(state["w"], torch.ones(2))
    assert source == f"downloaded {base}{fake.name}"
    assert echo == []
    assert fake.cached.read_bytes() == fake.data
    assert sorted(p.name for p in fake.cached.parent.iterdir()) == [fake.name]   # no temp left
    # the next run takes it from the cache, even with the server gone
    (root / fake.name).unlink()
    assert resolve_pretrained("resnet18", mode="require", echo=echo)[1] == f"torch cache {fake.cached}"


def test_url_env_keeps_file_name(monkeypatch):
    monkeypatch.setenv(weights.WEIGHTS_URL_ENV, "http://127.0.0.1:8123/mirror/")
    name = Path(weights._weights_enum("resnet50").url).name
    assert weights.pretrained_weights_url("resnet50") == f"http://127.0.0.1:8123/mirror/{name}"
    monkeypatch.setenv(weights.WEIGHTS_URL_ENV, "http://127.0.0.1:8123/mirror")
    assert weights.pretrained_weights_url("resnet50") == f"http://127.0.0.1:8123/mirror/{name}"
    monkeypatch.delenv(weights.WEIGHTS_URL_ENV)
    assert weights.pretrained_weights_url("resnet50").startswith("https://download.pytorch.org/")


# ---------------------------------------------------------------------------------- failures

def test_wrong_hash_auto_and_require(fake, http_server, monkeypatch):
    root, base = http_server
    (root / fake.name).write_bytes(_fake_bytes(2.0))      # content does not match the name's hash
    monkeypatch.setenv(weights.WEIGHTS_URL_ENV, base)
    echo = Echo()
    state, source = resolve_pretrained("resnet18", mode="auto", progress=False, echo=echo)
    assert state is None and source.startswith("none (hash mismatch")
    assert "hash" in _assert_one_failure_line(echo)
    _cache_is_clean(fake.cached.parent)
    with pytest.raises(WeightsNotFoundError) as info:
        resolve_pretrained("resnet18", mode="require", progress=False, echo=echo)
    message = str(info.value)
    assert "\n" not in message and fake.name in message and f"{base}{fake.name}" in message
    assert "hash" in message and "--weights-path" in message and "--no-pretrained" in message
    assert len(echo) == 1
    _cache_is_clean(fake.cached.parent)


def test_http_error(fake, http_server, monkeypatch):
    _, base = http_server                                   # serves nothing: 404
    monkeypatch.setenv(weights.WEIGHTS_URL_ENV, base)
    echo = Echo()
    state, source = resolve_pretrained("resnet18", progress=False, echo=echo)
    assert state is None and source == "none (HTTP 404 File not found)"
    _assert_one_failure_line(echo)
    _cache_is_clean(fake.cached.parent)


@pytest.mark.slow
def test_server_that_never_answers_times_out(fake, silent_server, monkeypatch):
    monkeypatch.setenv(weights.WEIGHTS_URL_ENV, silent_server)
    echo = Echo()
    start = time.monotonic()
    state, source = resolve_pretrained("resnet18", mode="auto", timeout=1, progress=False, echo=echo)
    assert time.monotonic() - start < 15
    assert state is None and source == "none (no answer within 1 s)"
    _assert_one_failure_line(echo)
    _cache_is_clean(fake.cached.parent)
    start = time.monotonic()
    with pytest.raises(WeightsNotFoundError, match="no answer within 1 s"):
        resolve_pretrained("resnet18", mode="require", timeout=1, progress=False, echo=echo)
    assert time.monotonic() - start < 15
    _cache_is_clean(fake.cached.parent)
    assert socket.getdefaulttimeout() is None             # the global default is restored


@pytest.mark.slow
def test_trickling_download_hits_the_wall_clock_bound(fake, trickle_server, monkeypatch):
    monkeypatch.setenv(weights.WEIGHTS_URL_ENV, trickle_server)
    echo = Echo()
    start = time.monotonic()
    state, source = resolve_pretrained("resnet18", timeout=0.5, progress=False, echo=echo)
    elapsed = time.monotonic() - start
    assert 1.5 < elapsed < 10                              # bound: 4 * timeout
    assert state is None and source.startswith("none (timed out after")
    _assert_one_failure_line(echo)
    _cache_is_clean(fake.cached.parent)


def test_connection_refused(fake, closed_port_url, monkeypatch):
    monkeypatch.setenv(weights.WEIGHTS_URL_ENV, closed_port_url)
    echo = Echo()
    state, source = resolve_pretrained("resnet18", timeout=5, progress=False, echo=echo)
    assert state is None and source == "none (connection refused)"
    assert "(connection refused)" in _assert_one_failure_line(echo)
    _cache_is_clean(fake.cached.parent)
    with pytest.raises(WeightsNotFoundError, match="connection refused"):
        resolve_pretrained("resnet18", mode="require", progress=False, echo=echo)


def test_unwritable_cache_is_one_line(fake, http_server, monkeypatch, tmp_path):
    root, base = http_server
    (root / fake.name).write_bytes(fake.data)
    monkeypatch.setenv(weights.WEIGHTS_URL_ENV, base)
    blocker = tmp_path / "torch-home"
    blocker.write_text("a file where the cache folder should be")
    echo = Echo()
    state, source = resolve_pretrained("resnet18", progress=False, echo=echo)
    assert state is None and source.startswith("none (")
    _assert_one_failure_line(echo)


def test_unreadable_cached_file(fake, monkeypatch, closed_port_url):
    monkeypatch.setenv(weights.WEIGHTS_URL_ENV, closed_port_url)
    fake.cached.parent.mkdir(parents=True)
    fake.cached.write_bytes(b"truncated")
    echo = Echo()
    state, source = resolve_pretrained("resnet18", echo=echo)
    assert state is None and source.startswith("none (unreadable file in the torch cache")
    assert len(echo) == 1 and str(fake.cached) in echo[0]
    with pytest.raises(WeightsNotFoundError, match=fake.name):
        resolve_pretrained("resnet18", mode="require", echo=echo)


# ---------------------------------------------------------------------- modes and "not used"

def test_never_and_light_are_not_used(fake, monkeypatch, tmp_path):
    def no_network(*args, **kwargs):
        raise AssertionError("network used")

    monkeypatch.setattr(weights, "_download", no_network)
    monkeypatch.setattr(socket, "create_connection", no_network)
    echo = Echo()
    given = tmp_path / "given.pth"
    given.write_bytes(fake.data)
    for mode in ("auto", "require", "never"):
        assert resolve_pretrained("light", mode=mode, echo=echo) == (None, "not used")
    for backbone in ("resnet18", "resnet34", "resnet50"):
        assert resolve_pretrained(backbone, mode="never", echo=echo) == (None, "not used")
    assert echo == []
    # a --weights-path that is not used is said to be ignored, once per call
    for mode in ("auto", "require", "never"):
        assert resolve_pretrained("light", mode=mode, weights_path=given, echo=echo) == (None, "not used")
    assert echo == ["warning: --weights-path: ignored (backbone light has no ImageNet weights)"] * 3
    echo.clear()
    assert resolve_pretrained("resnet18", mode="never", weights_path=given, echo=echo) == (None, "not used")
    assert echo == ["warning: --weights-path: ignored (--no-pretrained)"]
    _cache_is_clean(fake.cached.parent)


def test_bad_mode_and_timeout():
    with pytest.raises(ParameterError, match="mode"):
        resolve_pretrained("resnet18", mode="always")
    with pytest.raises(ParameterError, match="timeout"):
        resolve_pretrained("resnet18", timeout=0)


# ---------------------------------------------------------------------- atomic cache, leftovers

@pytest.mark.slow
def test_killed_download_leaves_nothing_taken_as_weights(torch_home, trickle_server, closed_port_url,
                                                         monkeypatch):
    """A run killed mid-download (real resnet18 name) leaves no file at the cache name."""
    env = dict(os.environ, TORCH_HOME=str(torch_home.parent.parent),
               **{weights.WEIGHTS_URL_ENV: trickle_server})
    code = ("from deepfusion.models.weights import resolve_pretrained; "
            "resolve_pretrained('resnet18', mode='require', progress=False)")
    proc = subprocess.Popen([sys.executable, "-c", code], env=env,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline:   # wait until bytes are being written
            partial = [f for d in torch_home.glob(".deepfusion-download-*") for f in d.iterdir()
                       if f.stat().st_size > 0] if torch_home.exists() else []
            if partial:
                break
            time.sleep(0.1)
        else:
            pytest.fail("the download never started")
    finally:
        proc.kill()
        proc.wait(10)
    cached = torch_home / Path(weights._weights_enum("resnet18").url).name
    assert not cached.exists()
    leftovers = list(torch_home.glob(".deepfusion-download-*"))
    assert leftovers                         # killed: its private folder stays, under another name
    monkeypatch.setenv(weights.WEIGHTS_URL_ENV, closed_port_url)     # the next run, offline
    state, source = resolve_pretrained("resnet18", timeout=5, progress=False, echo=Echo())
    assert state is None and source == "none (connection refused)"
    assert not cached.exists()


def test_stale_download_folders_are_removed(fake, http_server, monkeypatch):
    root, base = http_server
    (root / fake.name).write_bytes(fake.data)
    monkeypatch.setenv(weights.WEIGHTS_URL_ENV, base)
    stale, fresh = (fake.cached.parent / f".deepfusion-download-{n}" for n in ("stale", "fresh"))
    for folder in (stale, fresh):
        folder.mkdir(parents=True)
        (folder / f"{fake.name}.abc.partial").write_bytes(b"half")
    old = time.time() - 2 * 3600
    for p in (stale / f"{fake.name}.abc.partial", stale):
        os.utime(p, (old, old))
    state, _ = resolve_pretrained("resnet18", progress=False, echo=Echo())
    assert state is not None
    assert not stale.exists() and fresh.exists()   # a fresh one may be another run's download


# ----------------------------------------------------------------------------- build_model

def _small(backbone: str = "resnet18", **kw) -> ModelConfig:
    return ModelConfig(n_classes=3, n_mels=32, aux_rows=(20, 12, 48), backbone=backbone,
                       share_backbone=True, **kw)


def test_build_model_takes_a_resolved_state(tmp_path):
    import torchvision.models as tvm

    state = tvm.resnet18(weights=None).state_dict()
    state["layer1.0.conv1.weight"] = torch.full_like(state["layer1.0.conv1.weight"], 0.25)
    model = build_model(_small(), pretrained_state=state)   # config.pretrained is False: still used
    body = model.mel["mel_spec_orig"].body
    assert torch.equal(body.layer1[0].conv1.weight, state["layer1.0.conv1.weight"])
    # the former keyword: a file, loaded when config.pretrained
    path = tmp_path / "r18.pth"
    torch.save(state, path)
    model = build_model(_small(pretrained=True), weights_path=path)
    assert torch.equal(model.mel["mel_spec_orig"].body.layer1[0].conv1.weight,
                       state["layer1.0.conv1.weight"])
    with pytest.raises(ParameterError, match="^build_model: give pretrained_state or "
                       "weights_path, not both$"):
        build_model(_small(), pretrained_state=state, weights_path=path)
    with pytest.raises(ParameterError, match="^backbone light has no pretrained weights; "
                       "pretrained_state must be None$"):
        build_model(_small("light"), pretrained_state=state)


def test_build_model_refuses_weights_that_do_not_fit():
    with pytest.raises(WeightsNotFoundError, match="not torchvision's ImageNet weights for "
                       r"resnet18 \(no conv1.weight and \d+ more\)") as info:
        build_model(_small(), pretrained_state={"w": torch.zeros(2)})
    assert "\n" not in str(info.value)


def test_build_model_legacy_path_never_downloads(torch_home, monkeypatch):
    def no_download(*args, **kwargs):
        raise AssertionError("downloaded")

    monkeypatch.setattr(weights, "_download", no_download)
    with pytest.raises(WeightsNotFoundError, match="resnet18-.*--no-pretrained"):
        build_model(_small(pretrained=True))


@pytest.mark.slow
def test_dns_failure_and_dns_hang(fake, monkeypatch):
    """Offline: name resolution fails at once, or hangs (socket time-outs do not cover it)."""
    monkeypatch.setenv(weights.WEIGHTS_URL_ENV, "http://weights.invalid/")
    real_getaddrinfo = socket.getaddrinfo

    def failing(host, *args, **kwargs):
        if host == "weights.invalid":
            raise socket.gaierror(socket.EAI_NONAME, "Name or service not known")
        return real_getaddrinfo(host, *args, **kwargs)

    monkeypatch.setattr(socket, "getaddrinfo", failing)
    echo = Echo()
    state, source = resolve_pretrained("resnet18", progress=False, echo=echo)
    assert state is None and source == "none (host not found: name or service not known)"
    _assert_one_failure_line(echo)

    release = threading.Event()

    def hanging(host, *args, **kwargs):
        if host == "weights.invalid":
            release.wait(60)
            raise socket.gaierror(socket.EAI_AGAIN, "Temporary failure in name resolution")
        return real_getaddrinfo(host, *args, **kwargs)

    monkeypatch.setattr(socket, "getaddrinfo", hanging)
    echo = Echo()
    start = time.monotonic()
    try:
        state, source = resolve_pretrained("resnet18", timeout=0.5, progress=False, echo=echo)
    finally:
        release.set()
    assert time.monotonic() - start < 10
    assert state is None and source.startswith("none (timed out after")
    _assert_one_failure_line(echo)
    _cache_is_clean(fake.cached.parent)
