"""The FastAPI application serving one index: a JSON search API, thumbnails by id and a page.

Endpoints: ``POST /api/search`` (multipart ``file`` + ``k`` + ``rerank``), ``GET /api/images/{id}``
(JPEG thumbnail), ``GET /api/info``, ``GET /healthz``, ``GET /`` (the search page), ``/docs`` and
``/openapi.json``.

Security: requests name indexed images by integer id only, so no request path or file name ever
reaches the filesystem; uploads are capped in bytes before and while reading and in pixels before
decoding; their type is decided by content. Model inference runs in FastAPI's thread pool (the
endpoints are synchronous) and is serialised by the index's model lock.
"""
# No ``from __future__ import annotations``: FastAPI evaluates the endpoint annotations, and
# ``max_k`` in them is a local of create_app.
import logging
import os
import sqlite3
import threading
import time
from pathlib import Path
from typing import Annotated

from fastapi import FastAPI, File, Form, HTTPException, Request, UploadFile
from fastapi.responses import FileResponse, Response
from fastapi.staticfiles import StaticFiles
from pydantic import BaseModel, Field

from dfsnet import __version__
from dfsnet._validation import check_positive_int
from dfsnet.store import ImageIndex
from dfsnet.web.thumbnails import ThumbnailCache, ThumbnailError
from dfsnet.web.uploads import MULTIPART_OVERHEAD, BodySizeLimit, decode_upload, read_upload

__all__ = ["create_app", "DEFAULT_MAX_UPLOAD_BYTES"]

logger = logging.getLogger(__name__)

DEFAULT_MAX_UPLOAD_BYTES = 20 * 1024 * 1024
STATIC_DIR = Path(__file__).parent / "static"
# The page loads nothing from elsewhere; query previews are blob: URLs.
_PAGE_CSP = ("default-src 'self'; img-src 'self' blob: data:; style-src 'self'; script-src 'self'; "
             "connect-src 'self'; object-src 'none'; base-uri 'none'; frame-ancestors 'none'")


class Hit(BaseModel):
    rank: int = Field(description="1-based position")
    id: int = Field(description="id of the indexed image")
    distance: int = Field(description="Hamming distance between the codes")
    score: float | None = Field(None, description="Euclidean distance of the float features, when re-ranked")
    label: str | None = Field(description="class (sub-folder) of the indexed image, if known")
    name: str = Field(description="file name of the indexed image")
    thumbnail_url: str


class SearchResponse(BaseModel):
    k: int
    rerank: bool
    count: int = Field(description="images in the index")
    bits: int
    seconds: float = Field(description="server-side search time, decoding included")
    hits: list[Hit]


class Info(BaseModel):
    count: int
    bits: int
    backbone: str
    num_classes: int
    has_features: bool
    generation: int
    max_k: int
    max_upload_bytes: int
    labels: dict[str, int] = Field(description="images per label ('' for unlabelled)")
    version: str


class Health(BaseModel):
    status: str
    count: int
    generation: int


def _offline_docs_dir() -> Path | None:
    # FastAPI's /docs loads Swagger UI from a CDN; fastapi-offline ships the same assets.
    try:
        import fastapi_offline
    except ImportError:
        return None
    static = Path(fastapi_offline.__file__).parent / "static"
    return static if (static / "swagger-ui-bundle.js").is_file() else None


class _Refresher:
    """Follows generations committed by other processes (`dfsnet index add`) at most every ``interval`` s."""

    def __init__(self, index: ImageIndex, interval: float):
        self.index = index
        self.interval = interval
        self._last = time.monotonic()
        self._lock = threading.Lock()

    def tick(self) -> None:
        if self.interval <= 0 or time.monotonic() - self._last < self.interval:
            return
        if not self._lock.acquire(blocking=False):
            return
        try:
            self._last = time.monotonic()
            if self.index.refresh():
                logger.info("serving generation %d (%d images)", self.index.manifest["generation"],
                            len(self.index))
        except (OSError, ValueError, sqlite3.Error) as exc:
            logger.warning("keeping the loaded index generation: %s", exc)
        finally:
            self._lock.release()


def create_app(index, *, max_upload_bytes: int = DEFAULT_MAX_UPLOAD_BYTES, max_image_pixels: int | None = None,
               max_k: int = 100, thumbnail_size: int = 256, thumbnail_cache: int = 2048,
               refresh_interval: float = 2.0) -> FastAPI:
    """The web application for one index.

    Parameters
    ----------
    index : path-like or ImageIndex
        An index folder, or a loaded :class:`dfsnet.store.ImageIndex`.
    max_upload_bytes : int
        Largest accepted upload (default 20 MiB); larger ones get 413, refused by their
        ``Content-Length`` before reading, or while reading when there is none.
    max_image_pixels : int, optional
        Largest ``width * height`` decoded (default ``PIL.Image.MAX_IMAGE_PIXELS``); larger
        images get 413 without being decoded.
    max_k : int
        Largest ``k`` a search may ask for.
    thumbnail_size, thumbnail_cache : int
        Longest side of thumbnails in pixels; thumbnails kept in memory.
    refresh_interval : float
        Seconds between checks for a generation committed by another process (0: never).

    Returns
    -------
    fastapi.FastAPI
    """
    from PIL import Image

    index = index if isinstance(index, ImageIndex) else ImageIndex.load(index)
    max_upload_bytes = check_positive_int(max_upload_bytes, name="max_upload_bytes")
    max_k = check_positive_int(max_k, name="max_k")
    if max_image_pixels is None:
        max_image_pixels = int(Image.MAX_IMAGE_PIXELS or 2**31)
    max_image_pixels = check_positive_int(max_image_pixels, name="max_image_pixels")
    thumbnails = ThumbnailCache(size=check_positive_int(thumbnail_size, name="thumbnail_size"),
                                capacity=check_positive_int(thumbnail_cache, name="thumbnail_cache"),
                                max_pixels=max_image_pixels)
    refresher = _Refresher(index, refresh_interval)
    docs_dir = _offline_docs_dir()

    app = FastAPI(
        title="dfsnet image search",
        version=__version__,
        description="Content-based image retrieval over an index built with `dfsnet index build`.",
        docs_url=None if docs_dir else "/docs",
        redoc_url=None if docs_dir else "/redoc",
    )
    app.state.index = index
    app.add_middleware(BodySizeLimit, max_bytes=max_upload_bytes + MULTIPART_OVERHEAD, paths=("/api/search",))
    app.mount("/static", StaticFiles(directory=STATIC_DIR), name="static")
    if docs_dir:
        _add_offline_docs(app, docs_dir)

    @app.get("/", include_in_schema=False)
    def page() -> FileResponse:
        return FileResponse(STATIC_DIR / "index.html", media_type="text/html",
                            headers={"Content-Security-Policy": _PAGE_CSP, "X-Content-Type-Options": "nosniff"})

    @app.get("/healthz", response_model=Health, summary="Liveness and index size")
    def healthz() -> Health:
        return Health(status="ok", count=len(index), generation=index.manifest["generation"])

    @app.get("/api/info", response_model=Info, summary="What the index holds")
    def info() -> Info:
        refresher.tick()
        data = index.info()
        return Info(count=data["count"], bits=data["bits"], backbone=data["backbone"],
                    num_classes=data["num_classes"], has_features=data["has_features"],
                    generation=data["generation"], max_k=max_k, max_upload_bytes=max_upload_bytes,
                    labels={k or "": v for k, v in data["labels"].items()}, version=__version__)

    @app.post("/api/search", response_model=SearchResponse, summary="Search the index by image",
              responses={400: {"description": "not a decodable image, or an empty file"},
                         413: {"description": "upload or image too large"}})
    def search(
        request: Request,
        file: Annotated[UploadFile, File(description="the query image (JPEG, PNG, WebP, GIF, BMP, TIFF, PPM; "
                                                     "checked by content)")],
        k: Annotated[int, Form(ge=1, le=max_k, description="number of results")] = 10,
        rerank: Annotated[bool, Form(description="re-rank a Hamming shortlist by Euclidean distance "
                                                 "(index built with --store-features)")] = False,
    ) -> SearchResponse:
        started = time.perf_counter()
        refresher.tick()
        data = read_upload(file.file, max_bytes=max_upload_bytes)
        image = decode_upload(data, max_pixels=max_image_pixels)
        if rerank and not index.has_features:
            raise HTTPException(400, "rerank: this index stores no float features; rebuild it with "
                                     "--store-features to re-rank")
        hits = index.search(image, k=k, rerank=rerank)
        root = request.scope.get("root_path", "")
        return SearchResponse(
            k=k, rerank=rerank, count=len(index), bits=index.n_bits, seconds=time.perf_counter() - started,
            hits=[Hit(rank=h.rank, id=h.id, distance=h.distance, score=h.score, label=h.label,
                      name=os.path.basename(h.path), thumbnail_url=f"{root}/api/images/{h.id}") for h in hits],
        )

    @app.get("/api/images/{image_id}", summary="JPEG thumbnail of an indexed image",
             response_class=Response,
             responses={200: {"content": {"image/jpeg": {}}}, 404: {"description": "unknown id or missing file"}})
    def image(image_id: int, request: Request) -> Response:
        refresher.tick()
        try:
            record = index.record(image_id)
        except KeyError:
            raise HTTPException(404, f"no image with id {image_id} in the index") from None
        etag = f'"{record.sha256[:32]}-{thumbnails.size}"'
        headers = {"ETag": etag, "Cache-Control": "public, max-age=86400", "X-Content-Type-Options": "nosniff"}
        if request.headers.get("if-none-match") == etag:
            return Response(status_code=304, headers=headers)
        try:
            jpeg = thumbnails.get(record)
        except ThumbnailError as exc:
            raise HTTPException(404, str(exc)) from None
        return Response(jpeg, media_type="image/jpeg", headers=headers)

    return app


def _add_offline_docs(app: FastAPI, docs_dir: Path) -> None:
    from fastapi.openapi.docs import get_redoc_html, get_swagger_ui_html
    from fastapi.responses import HTMLResponse

    app.mount("/docs-static", StaticFiles(directory=docs_dir), name="docs-static")

    @app.get("/docs", include_in_schema=False)
    def swagger(request: Request) -> HTMLResponse:
        root = request.scope.get("root_path", "")
        return get_swagger_ui_html(openapi_url=f"{root}{app.openapi_url}", title=f"{app.title} - API docs",
                                   swagger_js_url=f"{root}/docs-static/swagger-ui-bundle.js",
                                   swagger_css_url=f"{root}/docs-static/swagger-ui.css",
                                   swagger_favicon_url=f"{root}/docs-static/favicon.png")

    @app.get("/redoc", include_in_schema=False)
    def redoc(request: Request) -> HTMLResponse:
        root = request.scope.get("root_path", "")
        return get_redoc_html(openapi_url=f"{root}{app.openapi_url}", title=f"{app.title} - API reference",
                              redoc_js_url=f"{root}/docs-static/redoc.standalone.js",
                              redoc_favicon_url=f"{root}/docs-static/favicon.png", with_google_fonts=False)
