"""HTTP hardening (issue 13): Host allow-list, nosniff, HEAD, body timeout, concurrency limit, FIFOs
and hung reads, and property tests of the upload path and the id route."""
from __future__ import annotations

import io
import os
import shutil
import socket
import threading
import time

import httpx
import pytest
from fastapi.testclient import TestClient
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from PIL import Image

from dfsnet.store import ImageIndex
from dfsnet.web import create_app
from tests.conftest import make_image_folder

LOCAL = "http://localhost"
PROPERTY = settings(max_examples=30, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])


@pytest.fixture(scope="module")
def app(web_index):
    return create_app(ImageIndex.load(web_index["index"]))


@pytest.fixture(scope="module")
def client(app):
    with TestClient(app, base_url=LOCAL) as c:
        yield c


def test_host_header_must_be_allowed(app, web_index):
    with TestClient(app, base_url="http://evil.example") as c:
        response = c.get("/api/info")
    assert response.status_code == 400 and "Host" in response.json()["detail"]
    assert response.headers["x-content-type-options"] == "nosniff"
    for base in ("http://localhost:8000", "http://127.0.0.1", "http://[::1]:8000"):
        with TestClient(app, base_url=base) as c:
            assert c.get("/healthz").status_code == 200, base
    with TestClient(create_app(web_index["index"], allowed_hosts=["photos.lan"]), base_url="http://photos.lan") as c:
        assert c.get("/healthz").status_code == 200
    with TestClient(create_app(web_index["index"], allowed_hosts="*"), base_url="http://anything") as c:
        assert c.get("/healthz").status_code == 200


@pytest.mark.parametrize("path", ["/healthz", "/api/info", "/api/images/0", "/api/images/99", "/", "/static/app.js",
                                  "/openapi.json", "/nowhere"])
def test_nosniff_everywhere_and_head_where_get_is(client, path):
    get = client.get(path)
    assert get.headers["x-content-type-options"] == "nosniff"
    head = client.head(path)
    assert head.status_code == get.status_code and head.content == b""
    assert head.headers.get("content-type") == get.headers.get("content-type")


def test_post_only_route_still_refuses_head(client):
    assert client.head("/api/search").status_code == 405


def _raw_request(port: int, head: bytes) -> socket.socket:
    sock = socket.create_connection(("127.0.0.1", port), timeout=10)
    sock.sendall(head)
    return sock


def test_a_body_that_never_comes_gets_408_and_the_limit_gives_503(web_index, live_server):
    app = create_app(web_index["index"], body_timeout=0.5, max_concurrent_requests=1)
    with live_server(app) as url:
        port = int(url.rsplit(":", 1)[1])
        started = time.monotonic()
        stalled = _raw_request(port, b"POST /api/search HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Length: 5000\r\n"
                                     b"Content-Type: multipart/form-data; boundary=x\r\n\r\n")
        time.sleep(0.1)
        busy = httpx.get(f"{url}/api/info", timeout=5)
        assert busy.status_code == 503 and busy.headers["retry-after"] == "1"
        assert httpx.get(f"{url}/healthz", timeout=5).status_code == 200  # never refused
        reply = stalled.recv(4096)
        stalled.close()
        assert reply.startswith(b"HTTP/1.1 408") and time.monotonic() - started < 5
        assert httpx.get(f"{url}/api/info", timeout=5).status_code == 200


@pytest.fixture
def own_index(web_index, tmp_path):
    images = make_image_folder(tmp_path / "imgs", n_classes=1, per_class=2, seed=41)
    return ImageIndex.build(web_index["ckpt"], images, tmp_path / "idx", bits=32, fit_on=web_index["images"])


def test_a_fifo_in_place_of_an_indexed_image_does_not_hang(own_index):
    """D10: a FIFO in an image's place hung every endpoint on a thumbnail request."""
    path = own_index.record(0).path
    os.unlink(path)
    os.mkfifo(path)
    with TestClient(create_app(own_index, read_timeout=2), base_url=LOCAL) as c:
        started = time.monotonic()
        response = c.get("/api/images/0")
        assert response.status_code == 404 and "regular file" in response.json()["detail"]
        assert time.monotonic() - started < 2 and c.get("/healthz").status_code == 200


def test_a_hung_read_times_out_and_other_endpoints_answer(own_index, monkeypatch):
    from dfsnet.web import thumbnails

    release = threading.Event()

    def hang(path, size):
        release.wait(30)
        raise OSError("released")

    monkeypatch.setattr(thumbnails, "_read_regular_file", hang)
    try:
        with TestClient(create_app(own_index, read_timeout=0.3), base_url=LOCAL) as c:
            results = {}
            worker = threading.Thread(target=lambda: results.setdefault("r", c.get("/api/images/0")))
            worker.start()
            time.sleep(0.05)
            assert c.get("/healthz").status_code == 200 and c.get("/api/info").status_code == 200
            worker.join(10)
            assert results["r"].status_code == 504 and "within 0.3 s" in results["r"].json()["detail"]
    finally:
        release.set()


def test_a_moved_file_thumbnail_is_404_until_re_pointed(own_index, tmp_path):
    path = own_index.record(1).path
    moved = tmp_path / "elsewhere" / "x.jpg"
    moved.parent.mkdir()
    shutil.move(path, moved)
    with TestClient(create_app(own_index, refresh_interval=0.01), base_url=LOCAL) as c:
        assert c.get("/api/images/1").status_code == 404
        ImageIndex.load(own_index.index_dir).add(moved.parent)
        time.sleep(0.05)
        assert c.get("/api/images/1").status_code == 200


@PROPERTY
@given(data=st.binary(max_size=4096))
def test_random_upload_bytes_never_500(client, data):
    response = client.post("/api/search", files={"file": ("q.jpg", data)}, data={"k": "2"})
    assert response.status_code in (200, 400, 413), response.text


@PROPERTY
@given(width=st.integers(1, 300), height=st.integers(1, 300),
       mode=st.sampled_from(["RGB", "L", "LA", "RGBA", "P", "1", "I", "I;16", "F", "CMYK", "YCbCr"]),
       fmt=st.sampled_from(["PNG", "JPEG", "BMP", "GIF", "TIFF", "WEBP", "PPM"]))
def test_valid_images_of_any_geometry_and_mode_never_500(client, width, height, mode, fmt):
    image = Image.new(mode, (width, height))
    out = io.BytesIO()
    try:
        image.save(out, format=fmt)
    except (OSError, ValueError, KeyError):  # PIL cannot write this mode in this format
        return
    response = client.post("/api/search", files={"file": ("q", out.getvalue())}, data={"k": "3"})
    assert response.status_code in (200, 400, 413), response.text


@PROPERTY
@given(image_id=st.one_of(st.integers(), st.integers(-(2**70), 2**70), st.text(max_size=30)))
def test_any_id_never_500(client, image_id):
    from urllib.parse import quote

    response = client.get(f"/api/images/{quote(str(image_id), safe='')}")
    assert response.status_code in (200, 404, 422), response.text
