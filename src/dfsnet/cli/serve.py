"""`dfsnet serve INDEX_DIR`: the search page and JSON API of an index, over HTTP."""
from __future__ import annotations


def register(subparsers) -> None:
    serve = subparsers.add_parser(
        "serve", help="serve an index: a search page and a JSON API",
        description="Run the dfsnet web service (FastAPI + uvicorn) for one index. The page is at /, "
                    "the API docs at /docs, the OpenAPI schema at /openapi.json.")
    serve.add_argument("index_dir", metavar="INDEX_DIR")
    serve.add_argument("--host", default="127.0.0.1", help="address to bind (default: 127.0.0.1, this machine only)")
    serve.add_argument("--port", type=int, default=8000, help="port (default: 8000)")
    serve.add_argument("--max-upload-mb", type=float, default=20.0,
                       help="largest accepted upload in MiB (default: 20)")
    serve.add_argument("--max-k", type=int, default=100, help="largest k a search may ask for (default: 100)")
    serve.add_argument("--model", metavar="CKPT", default=None,
                       help="refuse unless the index was built with this checkpoint")
    serve.add_argument("--device", default=None, help="torch device (default: cpu)")
    serve.set_defaults(func=_serve)


def _serve(args) -> int:
    import uvicorn

    from dfsnet.errors import UserError
    from dfsnet.store import ImageIndex
    from dfsnet.web import create_app

    if not 0 < args.max_upload_mb <= 4096:
        raise UserError(f"--max-upload-mb: expected a size in (0, 4096] MiB, got {args.max_upload_mb}")
    if not 0 <= args.port <= 65535:
        raise UserError(f"--port: expected 0..65535, got {args.port}")
    index = ImageIndex.load(args.index_dir, model=args.model, device=args.device)
    app = create_app(index, max_upload_bytes=int(args.max_upload_mb * 2**20), max_k=args.max_k)
    print(f"serving {index.index_dir} ({len(index)} images) on http://{args.host}:{args.port}/", flush=True)
    uvicorn.run(app, host=args.host, port=args.port, log_level="info", timeout_graceful_shutdown=5)
    return 0
