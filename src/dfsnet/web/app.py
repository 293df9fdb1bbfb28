"""The FastAPI application serving one index: a JSON search API, thumbnails by id and a page.

Endpoints: ``POST /api/search`` (multipart ``file`` + ``k`` + ``rerank``), ``GET /api/similar/{id}``
(search by an indexed image, "more like this"), ``GET /api/images`` (browse, page by page),
``GET /api/images/{id}`` (JPEG thumbnail), ``GET /api/info``, ``GET /healthz``, ``GET /`` (the
search page), ``/docs`` and ``/openapi.json``.

Security: requests name indexed images by integer id only, so no request path or file name ever
reaches the filesystem; uploads are capped in bytes before and while reading and in pixels before
decoding, and a body that stalls is cut off; their type is decided by content. The Host header
must name an allowed host (against DNS rebinding); every response carries ``nosniff``; requests
past a concurrency limit get 503. Model inference runs in FastAPI's thread pool (the endpoints
are synchronous) and is serialised by the index's model lock. Indexed files are read only when
they are regular files, within a timeout.

Integrity: a generation committed by another process is followed only when its files pass the
load checks and its model, encoder and widths are those loaded; otherwise, and when a file of
the served generation turns out damaged, the server keeps answering from what it has (503 for
what it cannot) and ``/healthz`` reports ``"degraded"`` with the reason.
"""
# No ``from __future__ import annotations``: FastAPI evaluates the endpoint annotations, and
# ``max_k`` in them is a local of create_app.
import contextlib
import logging
import os
import sqlite3
import threading
import time
from pathlib import Path
from typing import Annotated

from fastapi import FastAPI, File, Form, HTTPException, Query, Request, UploadFile
from fastapi.responses import FileResponse, JSONResponse, Response
from fastapi.staticfiles import StaticFiles
from pydantic import BaseModel, Field

from dfsnet import __version__
from dfsnet._validation import check_positive_int
from dfsnet.errors import InputError, UserError
from dfsnet.store import ImageIndex, IndexDamagedError
from dfsnet.web.batcher import QueryBatcher
from dfsnet.web.middleware import ConcurrencyLimit, HeadAsGet, HostAllowList, NoSniff
from dfsnet.web.thumbnails import ThumbnailCache, ThumbnailError, ThumbnailTimeout
from dfsnet.web.uploads import MULTIPART_OVERHEAD, BodySizeLimit, decode_upload, read_upload

__all__ = ["create_app", "DEFAULT_MAX_UPLOAD_BYTES", "DEFAULT_ALLOWED_HOSTS"]

logger = logging.getLogger(__name__)

DEFAULT_MAX_UPLOAD_BYTES = 20 * 1024 * 1024
# Names of this machine a local browser uses; `dfsnet serve` adds the address it binds.
DEFAULT_ALLOWED_HOSTS = ("localhost", "127.0.0.1", "[::1]")
# After a generation was refused, wait this long before trying the disk again (its checks
# hash the metadata, so retrying at every request would cost for nothing).
_RETRY_AFTER_FAILURE = 30.0
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
    query_id: int | None = Field(None, description="the indexed image searched by, for /api/similar")
    count: int = Field(description="images in the index")
    bits: int
    seconds: float = Field(description="server-side search time, decoding included")
    hits: list[Hit]


class Item(BaseModel):
    id: int
    label: str | None
    name: str = Field(description="file name of the indexed image")
    thumbnail_url: str


class Page(BaseModel):
    count: int = Field(description="images in the index")
    offset: int
    limit: int
    items: list[Item]


class Info(BaseModel):
    count: int
    bits: int
    backbone: str
    supervised: bool = Field(description="built with a trained model (else a pretrained backbone, no labels)")
    num_classes: int | None
    has_features: bool
    generation: int
    max_k: int
    max_upload_bytes: int
    labels: dict[str, int] = Field(description="images per label ('' for unlabelled)")
    version: str


class Health(BaseModel):
    status: str = Field(description='"ok", or "degraded" when the index on disk could not be followed')
    count: int
    generation: int = Field(description="the generation served")
    problem: str | None = Field(None, description="why the status is degraded")


def _offline_docs_dir() -> Path | None:
    # FastAPI's /docs loads Swagger UI from a CDN; fastapi-offline ships the same assets.
    try:
        import fastapi_offline
    except ImportError:
        return None
    static = Path(fastapi_offline.__file__).parent / "static"
    return static if (static / "swagger-ui-bundle.js").is_file() else None


class _Refresher:
    """Follows generations committed by other processes (`dfsnet index add`) at most every ``interval`` s.

    A generation that cannot be loaded, or was made with another model or widths, is refused:
    the loaded one keeps being served and ``problem`` says why, until a later one loads.
    """

    def __init__(self, index: ImageIndex, interval: float):
        self.index = index
        self.interval = interval
        self.problem: str | None = None
        self._next = time.monotonic() + interval
        self._lock = threading.Lock()

    def tick(self) -> None:
        if self.interval <= 0 or time.monotonic() < self._next:
            return
        if not self._lock.acquire(blocking=False):
            return
        try:
            self._next = time.monotonic() + self.interval
            if self.index.refresh():
                logger.info("serving generation %d (%d images)", self.index.manifest["generation"],
                            len(self.index))
            self.problem = None
        except (UserError, OSError, sqlite3.Error) as exc:
            self.damaged(exc)
            self._next = time.monotonic() + max(self.interval, _RETRY_AFTER_FAILURE)
        finally:
            self._lock.release()

    def damaged(self, exc: Exception) -> None:
        message = f"serving generation {self.index.manifest['generation']}: {exc}"
        if message != self.problem:
            logger.warning("index degraded, %s", message)
        self.problem = message


def create_app(index, *, max_upload_bytes: int = DEFAULT_MAX_UPLOAD_BYTES, max_image_pixels: int | None = None,
               max_k: int = 100, thumbnail_size: int = 256, thumbnail_cache: int = 2048,
               refresh_interval: float = 2.0, allowed_hosts=DEFAULT_ALLOWED_HOSTS,
               max_concurrent_requests: int = 64, body_timeout: float = 30.0,
               read_timeout: float = 10.0, max_batch: int = 16, batch_wait: float = 0.005) -> FastAPI:
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
    allowed_hosts : iterable of str
        Host names (or addresses) the ``Host`` header may name, ports ignored; others get 400.
        ``"*"`` allows any. Default: localhost, 127.0.0.1 and [::1].
    max_concurrent_requests : int
        Requests in flight before more get 503 (``/healthz`` is never refused).
    body_timeout : float
        Seconds a search request may pause while sending its body before it gets 408.
    read_timeout : float
        Seconds to wait for an indexed file to be read for its thumbnail (then 504).
    max_batch, batch_wait : int, float
        Concurrent searches are embedded together, up to ``max_batch`` images per forward,
        waiting at most ``batch_wait`` seconds for company (:class:`dfsnet.web.batcher.QueryBatcher`);
        ``max_batch=1`` runs one forward per request. Uploads are read and decoded in the
        request threads, the network runs in the batcher's one thread.

    Returns
    -------
    fastapi.FastAPI

    Raises
    ------
    InputError
        A damaged or inconsistent index (as :class:`dfsnet.store.ImageIndex`), or a bad option.
    """
    from PIL import Image

    index = index if isinstance(index, ImageIndex) else ImageIndex.load(index)
    max_upload_bytes = check_positive_int(max_upload_bytes, name="max_upload_bytes")
    max_k = check_positive_int(max_k, name="max_k")
    if max_image_pixels is None:
        max_image_pixels = int(Image.MAX_IMAGE_PIXELS or 2**31)
    max_image_pixels = check_positive_int(max_image_pixels, name="max_image_pixels")
    max_concurrent_requests = check_positive_int(max_concurrent_requests, name="max_concurrent_requests")
    for name, value in (("body_timeout", body_timeout), ("read_timeout", read_timeout)):
        if isinstance(value, bool) or not isinstance(value, (int, float)) or not value > 0:
            raise InputError(f"{name}: expected a positive number of seconds, got {value!r}")
    if isinstance(allowed_hosts, str):
        allowed_hosts = [allowed_hosts]
    allowed_hosts = [str(h) for h in allowed_hosts]
    if not allowed_hosts:
        raise InputError("allowed_hosts: expected at least one host name (or '*'), got none")
    thumbnails = ThumbnailCache(size=check_positive_int(thumbnail_size, name="thumbnail_size"),
                                capacity=check_positive_int(thumbnail_cache, name="thumbnail_cache"),
                                max_pixels=max_image_pixels, read_timeout=float(read_timeout))
    refresher = _Refresher(index, refresh_interval)
    batcher = QueryBatcher(index, max_batch=max_batch, max_wait=batch_wait)
    docs_dir = _offline_docs_dir()

    @contextlib.asynccontextmanager
    async def lifespan(app: FastAPI):
        yield
        batcher.close()

    app = FastAPI(
        title="dfsnet image search",
        version=__version__,
        description="Content-based image retrieval over an index built with `dfsnet index build`.",
        docs_url=None if docs_dir else "/docs",
        redoc_url=None if docs_dir else "/redoc",
        lifespan=lifespan,
    )
    app.state.index = index
    # Added innermost first: NoSniff wraps everything, so even the guards' refusals carry it.
    app.add_middleware(BodySizeLimit, max_bytes=max_upload_bytes + MULTIPART_OVERHEAD, paths=("/api/search",),
                       timeout=float(body_timeout))
    app.add_middleware(ConcurrencyLimit, limit=max_concurrent_requests, exempt=("/healthz",))
    app.add_middleware(HeadAsGet)
    app.add_middleware(HostAllowList, hosts=allowed_hosts)
    app.add_middleware(NoSniff)

    @app.exception_handler(IndexDamagedError)
    def damaged(request: Request, exc: IndexDamagedError) -> JSONResponse:
        refresher.damaged(exc)
        return JSONResponse({"detail": f"the index is damaged: {exc}"}, status_code=503)
    app.mount("/static", StaticFiles(directory=STATIC_DIR), name="static")
    if docs_dir:
        _add_offline_docs(app, docs_dir)

    @app.get("/", include_in_schema=False)
    def page() -> FileResponse:
        return FileResponse(STATIC_DIR / "index.html", media_type="text/html",
                            headers={"Content-Security-Policy": _PAGE_CSP, "X-Content-Type-Options": "nosniff"})

    @app.get("/healthz", response_model=Health, response_model_exclude_none=True,
             summary="Liveness, index size, and whether the index on disk could be followed")
    def healthz() -> Health:
        refresher.tick()
        problem = refresher.problem
        return Health(status="degraded" if problem else "ok", count=len(index),
                      generation=index.manifest["generation"], problem=problem)

    @app.get("/api/info", response_model=Info, summary="What the index holds")
    def info() -> Info:
        refresher.tick()
        data = index.info()
        return Info(count=data["count"], bits=data["bits"], backbone=data["backbone"],
                    supervised=data["supervised"], num_classes=data["num_classes"], has_features=data["has_features"],
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
        hits = batcher.submit(image, k=k, rerank=rerank).result()
        return _response(request, hits, k=k, rerank=rerank, started=started)

    def _response(request: Request, hits, *, k: int, rerank: bool, started: float,
                  query_id: int | None = None) -> SearchResponse:
        root = request.scope.get("root_path", "")
        return SearchResponse(
            k=k, rerank=rerank, query_id=query_id, count=len(index), bits=index.n_bits,
            seconds=time.perf_counter() - started,
            hits=[Hit(rank=h.rank, id=h.id, distance=h.distance, score=h.score, label=h.label,
                      name=os.path.basename(h.path), thumbnail_url=f"{root}/api/images/{h.id}") for h in hits],
        )

    @app.get("/api/similar/{image_id}", response_model=SearchResponse,
             summary="Search by an indexed image (more like this), by id: no upload",
             responses={404: {"description": "unknown id"}})
    def similar(
        image_id: int, request: Request,
        k: Annotated[int, Query(ge=1, le=max_k, description="number of results")] = 10,
        rerank: Annotated[bool, Query(description="re-rank by the stored float features")] = False,
    ) -> SearchResponse:
        started = time.perf_counter()
        refresher.tick()
        if rerank and not index.has_features:
            raise HTTPException(400, "rerank: this index stores no float features; rebuild it with "
                                     "--store-features to re-rank")
        try:
            hits = index.search_id(image_id, k=k, rerank=rerank)
        except KeyError:
            raise HTTPException(404, f"no image with id {image_id} in the index") from None
        return _response(request, hits, k=k, rerank=rerank, started=started, query_id=image_id)

    @app.get("/api/images", response_model=Page, summary="Browse the indexed images, by id, page by page")
    def browse(
        request: Request,
        offset: Annotated[int, Query(ge=0, le=2**62, description="images to skip")] = 0,
        limit: Annotated[int, Query(ge=1, le=max_k, description="images per page")] = 24,
    ) -> Page:
        refresher.tick()
        root = request.scope.get("root_path", "")
        items = [Item(id=r.id, label=r.label, name=os.path.basename(r.path), thumbnail_url=f"{root}/api/images/{r.id}")
                 for r in index.records(offset=offset, limit=limit)]
        return Page(count=len(index), offset=offset, limit=limit, items=items)

    @app.get("/api/images/{image_id}", summary="JPEG thumbnail of an indexed image",
             response_class=Response,
             responses={200: {"content": {"image/jpeg": {}}}, 404: {"description": "unknown id or missing file"},
                        504: {"description": "the indexed file could not be read in time"}})
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
        except ThumbnailTimeout as exc:
            raise HTTPException(504, str(exc)) from None
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
