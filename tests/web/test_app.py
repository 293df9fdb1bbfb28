"""The FastAPI app through TestClient: search, thumbnails, the page, and every error path."""
from __future__ import annotations

import io
import shutil
import struct
import time
import zlib

import pytest
from fastapi.testclient import TestClient
from PIL import Image

from dfsnet.store import ImageIndex
from dfsnet.web import DEFAULT_MAX_UPLOAD_BYTES, create_app
from tests.conftest import make_image_folder

MAX_UPLOAD = 200_000
# TestClient's default Host, "testserver", is not on the default allow-list.
LOCAL = "http://localhost"


@pytest.fixture(scope="module")
def pipe(web_index) -> ImageIndex:
    return ImageIndex.load(web_index["index"])


@pytest.fixture(scope="module")
def client(pipe) -> TestClient:
    with TestClient(create_app(pipe, max_upload_bytes=MAX_UPLOAD, max_k=20), base_url=LOCAL) as c:
        yield c


def _jpeg(color="red", size=(40, 30)) -> bytes:
    out = io.BytesIO()
    Image.new("RGB", size, color).save(out, format="JPEG")
    return out.getvalue()


def _search(client, data: bytes, name="query.jpg", **form):
    return client.post("/api/search", files={"file": (name, data, "image/jpeg")},
                       data={k: str(v) for k, v in form.items()})


def test_search_returns_hits_with_thumbnails(client, web_index):
    query = web_index["images"] / "class_2" / "001.jpg"
    response = _search(client, query.read_bytes(), k=5)
    assert response.status_code == 200, response.text
    body = response.json()
    assert body["k"] == 5 and body["count"] == 12 and body["bits"] == 32 and not body["rerank"]
    hits = body["hits"]
    assert [h["rank"] for h in hits] == [1, 2, 3, 4, 5]
    assert hits[0]["distance"] == 0 and [h["distance"] for h in hits] == sorted(h["distance"] for h in hits)
    assert any(h["name"] == "001.jpg" and h["label"] == "class_2" for h in hits if h["distance"] == 0)
    assert all("/" not in h["name"] for h in hits)  # no server paths leak
    thumb = client.get(hits[0]["thumbnail_url"])
    assert thumb.status_code == 200 and thumb.headers["content-type"] == "image/jpeg"
    assert max(Image.open(io.BytesIO(thumb.content)).size) <= 256
    again = client.get(hits[0]["thumbnail_url"], headers={"If-None-Match": thumb.headers["etag"]})
    assert again.status_code == 304


def test_search_by_an_indexed_image_and_browse(client, pipe):
    body = client.get("/api/similar/4", params={"k": 3}).json()
    assert body["query_id"] == 4 and body["hits"][0]["id"] == 4 and body["hits"][0]["distance"] == 0
    assert [h["rank"] for h in body["hits"]] == [1, 2, 3] and body["hits"][0]["name"] == "000.jpg"
    assert [h["id"] for h in body["hits"]] == [h.id for h in pipe.search(pipe.record(4).path, k=3)]
    reranked = client.get("/api/similar/4", params={"k": 3, "rerank": "true"}).json()
    assert reranked["hits"][0]["id"] == 4 and reranked["hits"][0]["score"] == pytest.approx(0, abs=1e-5)
    assert client.get("/api/similar/999").status_code == 404
    assert client.get("/api/similar/2", params={"k": 0}).status_code == 422
    page = client.get("/api/images", params={"offset": 10, "limit": 5}).json()
    assert page["count"] == 12 and [i["id"] for i in page["items"]] == [10, 11]
    assert page["items"][0]["label"] == "class_2" and page["items"][0]["thumbnail_url"] == "/api/images/10"
    assert client.get("/api/images", params={"offset": -1}).status_code == 422
    assert client.get("/api/images", params={"limit": 21}).status_code == 422  # above max_k


def test_rerank_over_http(client, web_index):
    query = web_index["images"] / "class_0" / "003.jpg"
    hits = _search(client, query.read_bytes(), k=4, rerank="true").json()["hits"]
    scores = [h["score"] for h in hits]
    assert scores == sorted(scores) and scores[0] == pytest.approx(0, abs=1e-4)


def test_rerank_without_features_is_a_400(web_index):
    with TestClient(create_app(web_index["plain"]), base_url=LOCAL) as c:
        response = _search(c, _jpeg(), rerank="true")
    assert response.status_code == 400 and "store-features" in response.json()["detail"]


def test_page_health_info_and_docs(client):
    page = client.get("/")
    assert page.status_code == 200 and page.headers["content-type"].startswith("text/html")
    assert "default-src 'self'" in page.headers["content-security-policy"]
    assert 'id="file-input"' in page.text and "static/app.js" in page.text
    assert client.get("/static/app.js").status_code == 200
    assert client.get("/static/style.css").status_code == 200
    assert client.get("/healthz").json() == {"status": "ok", "count": 12, "generation": 1}
    info = client.get("/api/info").json()
    assert info["count"] == 12 and info["max_k"] == 20 and info["has_features"] and info["bits"] == 32
    assert info["labels"] == {"class_0": 4, "class_1": 4, "class_2": 4} and info["max_upload_bytes"] == MAX_UPLOAD
    schema = client.get("/openapi.json").json()
    assert {"/api/search", "/api/images/{image_id}", "/api/info", "/healthz"} <= set(schema["paths"])
    docs = client.get("/docs")
    assert docs.status_code == 200 and "swagger" in docs.text.lower()


def test_docs_assets_are_served_locally_when_fastapi_offline_is_installed(client):
    pytest.importorskip("fastapi_offline", reason="fastapi-offline (offline Swagger UI assets) is not installed")
    docs = client.get("/docs").text
    assert "cdn." not in docs and "/docs-static/swagger-ui-bundle.js" in docs
    assert client.get("/docs-static/swagger-ui-bundle.js").status_code == 200
    assert client.get("/redoc").status_code == 200


def test_default_upload_limit_is_20_mib(pipe):
    assert DEFAULT_MAX_UPLOAD_BYTES == 20 * 2**20
    with TestClient(create_app(pipe), base_url=LOCAL) as c:
        assert c.get("/api/info").json()["max_upload_bytes"] == 20 * 2**20
        response = _search(c, b"\xff\xd8" + b"\0" * (21 * 2**20))
    assert response.status_code == 413 and "limit is" in response.json()["detail"]


def test_oversize_upload_is_refused_by_content_length(client):
    response = _search(client, b"\xff\xd8" + b"\0" * (MAX_UPLOAD + 70_000))
    assert response.status_code == 413
    assert "upload too large" in response.json()["detail"]


def test_oversize_upload_without_content_length_is_refused_while_reading(client):
    boundary = "dfsnetboundary"
    head = (f"--{boundary}\r\nContent-Disposition: form-data; name=\"file\"; filename=\"q.jpg\"\r\n"
            "Content-Type: image/jpeg\r\n\r\n").encode()
    sent = []

    def body():
        yield head
        for _ in range(100):  # 100 x 8 KiB: far past the cap, stopped early
            sent.append(1)
            yield b"\0" * 8192
        yield f"\r\n--{boundary}--\r\n".encode()

    response = client.post("/api/search", content=body(),
                           headers={"Content-Type": f"multipart/form-data; boundary={boundary}"})
    assert response.status_code == 413
    assert "more than" in response.json()["detail"]


def test_file_just_over_the_limit_inside_the_envelope_slack_is_refused(client):
    response = _search(client, _jpeg() + b"\0" * MAX_UPLOAD)
    assert response.status_code == 413
    assert f"limit of {MAX_UPLOAD} bytes" in response.json()["detail"]


def test_type_is_checked_by_content_not_extension(client):
    text = _search(client, b"just some text, named like a photo", name="holiday.jpg")
    assert text.status_code == 400 and "not an image of a supported type" in text.json()["detail"]
    html = _search(client, b"<html><script>alert(1)</script></html>", name="x.png")
    assert html.status_code == 400
    png = io.BytesIO()
    Image.new("RGB", (30, 30), "blue").save(png, format="PNG")
    assert _search(client, png.getvalue(), name="named.jpg", k=3).status_code == 200


def test_corrupt_and_empty_images_are_400(client, web_index):
    data = (web_index["images"] / "class_0" / "000.jpg").read_bytes()
    truncated = _search(client, data[: len(data) // 3])
    assert truncated.status_code == 400 and "corrupt or truncated" in truncated.json()["detail"]
    garbage = _search(client, data[:20] + bytes(range(256)) * 8)
    assert garbage.status_code == 400
    empty = _search(client, b"")
    assert empty.status_code == 400 and "empty" in empty.json()["detail"]


def _png_bomb(width: int, height: int) -> bytes:
    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    ihdr = struct.pack(">IIBBBBB", width, height, 1, 0, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", zlib.compress(b"\0" * 64)) + chunk(b"IEND", b"")


# PIL itself only warns between 1x and 2x its pixel limit (10,000 px square); the app refuses both.
@pytest.mark.filterwarnings("ignore::PIL.Image.DecompressionBombWarning")
@pytest.mark.parametrize("side", [10_000, 100_000])
def test_decompression_bombs_are_refused_before_decoding(client, side):
    response = _search(client, _png_bomb(side, side), name="tiny.png")
    assert response.status_code == 413
    assert "pixels" in response.json()["detail"] or "too large" in response.json()["detail"]


def test_configured_pixel_limit(pipe):
    with TestClient(create_app(pipe, max_image_pixels=1000), base_url=LOCAL) as c:
        assert _search(c, _jpeg(size=(40, 30))).status_code == 413
        assert _search(c, _jpeg(size=(20, 20))).status_code == 200


@pytest.mark.parametrize("k", ["0", "-1", "21", "abc", "1.5"])
def test_bad_k_is_rejected(client, k):
    response = _search(client, _jpeg(), k=k)
    assert response.status_code == 422
    assert any(d["loc"][-1] == "k" for d in response.json()["detail"])


def test_missing_file_is_rejected(client):
    response = client.post("/api/search", data={"k": "3"})
    assert response.status_code == 422
    assert any(d["loc"][-1] == "file" for d in response.json()["detail"])


@pytest.mark.parametrize("path", ["/api/images/12", "/api/images/999999", "/api/images/-1"])
def test_unknown_image_id_is_404(client, path):
    response = client.get(path)
    assert response.status_code == 404 and "no image with id" in response.json()["detail"]


@pytest.mark.parametrize("path", ["/api/images/..%2F..%2Fetc%2Fpasswd", "/api/images/%2Fetc%2Fpasswd",
                                  "/api/images/0.5", "/static/..%2F..%2Fpipeline.py", "/static/../app.py"])
def test_no_request_path_reaches_the_filesystem(client, path):
    response = client.get(path)
    assert response.status_code in (404, 422)
    assert b"root:" not in response.content and b"import" not in response.content


def test_changed_or_missing_indexed_file_is_404_not_500(web_index, tmp_path):
    images = make_image_folder(tmp_path / "imgs", n_classes=2, per_class=1, seed=4)
    pipe = ImageIndex.build(web_index["ckpt"], images, tmp_path / "idx", bits=32, fit_on=web_index["images"])
    Image.new("RGB", (8, 8)).save(pipe.record(0).path)
    shutil.rmtree(images / "class_1")
    with TestClient(create_app(pipe), base_url=LOCAL) as c:
        changed = c.get("/api/images/0")
        missing = c.get("/api/images/1")
    assert changed.status_code == 404 and "changed on disk" in changed.json()["detail"]
    assert missing.status_code == 404 and "cannot be read" in missing.json()["detail"]


def test_server_follows_an_index_add_by_another_process(web_index, tmp_path):
    shutil.copytree(web_index["index"], tmp_path / "index")
    with TestClient(create_app(tmp_path / "index", refresh_interval=0.01), base_url=LOCAL) as c:
        assert c.get("/healthz").json()["count"] == 12
        ImageIndex.load(tmp_path / "index").add(make_image_folder(tmp_path / "more", n_classes=2, per_class=1))
        time.sleep(0.05)
        assert c.get("/api/info").json()["count"] == 14
        assert c.get("/api/images/13").status_code == 200


def test_an_index_built_without_labels_is_served(tmp_path):
    from tests.store.test_unsupervised import distinct_images

    images = distinct_images(tmp_path / "images", 6, seed=31)
    index = ImageIndex.build(images_dir=images, out_dir=tmp_path / "index", bits=6, image_size=32, device="cpu")
    with TestClient(create_app(index), base_url=LOCAL) as c:
        info = c.get("/api/info").json()
        assert info["supervised"] is False and info["num_classes"] is None and info["count"] == 6
        hits = _search(c, (images / "003.jpg").read_bytes(), k=2).json()["hits"]
        assert hits[0]["name"] == "003.jpg" and hits[0]["label"] is None
        assert c.get("/api/similar/3", params={"k": 2}).json()["hits"][0]["id"] == 3
