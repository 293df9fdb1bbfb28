"""`dfsnet serve INDEX_DIR`: the search page and JSON API of an index, over HTTP."""
from __future__ import annotations

import socket

from dfsnet.cli._common import add_device_arg, add_precision_arg, add_runtime_arg


def register(subparsers) -> None:
    serve = subparsers.add_parser(
        "serve", help="serve an index: a search page and a JSON API",
        description="Run the dfsnet web service (FastAPI + uvicorn) for one index. The page is at /, "
                    "the API docs at /docs, the OpenAPI schema at /openapi.json.")
    serve.add_argument("index_dir", metavar="INDEX_DIR")
    serve.add_argument("--host", default="127.0.0.1", help="address to bind (default: 127.0.0.1, this machine only)")
    serve.add_argument("--port", type=int, default=8000, help="port (default: 8000)")
    serve.add_argument("--allowed-host", dest="allowed_hosts", metavar="NAME", action="append", default=[],
                       help="a host name clients may use in the Host header, besides localhost and the bound "
                            "address (repeatable; '*' allows any, giving up the DNS-rebinding guard)")
    serve.add_argument("--max-upload-mb", type=float, default=20.0,
                       help="largest accepted upload in MiB (default: 20)")
    serve.add_argument("--max-k", type=int, default=100, help="largest k a search may ask for (default: 100)")
    serve.add_argument("--max-concurrent", type=int, default=64, metavar="N",
                       help="requests in flight before more get 503 (default: %(default)s)")
    serve.add_argument("--max-batch", type=int, default=16, metavar="N",
                       help="concurrent searches embedded in one forward pass; 1 = one forward per request "
                            "(default: %(default)s)")
    serve.add_argument("--batch-wait-ms", type=float, default=5.0, metavar="MS",
                       help="how long a search waits for others to share its forward (default: %(default)s)")
    serve.add_argument("--model", metavar="CKPT", default=None,
                       help="refuse unless the index was built with this checkpoint")
    add_device_arg(serve)
    add_precision_arg(serve)
    add_runtime_arg(serve)
    serve.set_defaults(func=_serve)


def bind_socket(host: str, port: int) -> socket.socket:
    """A listening TCP socket on ``host:port``; a busy port or unknown address is a UserError."""
    from dfsnet.errors import UserError

    try:
        infos = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE)
    except socket.gaierror as exc:
        raise UserError(f"--host: cannot resolve {host!r} ({exc.strerror})") from None
    family, kind, proto, _, address = infos[0]
    sock = socket.socket(family, kind, proto)
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind(address)
        sock.listen(2048)
    except OSError as exc:
        sock.close()
        raise UserError(f"--port: cannot listen on {host}:{port} ({exc.strerror or exc}); is another server "
                        "using it? choose another with --port") from None
    sock.set_inheritable(True)
    return sock


def _serve(args) -> int:
    import uvicorn

    from dfsnet.errors import UserError
    from dfsnet.store import ImageIndex
    from dfsnet.web import DEFAULT_ALLOWED_HOSTS, create_app

    if not 0 < args.max_upload_mb <= 4096:
        raise UserError(f"--max-upload-mb: expected a size in (0, 4096] MiB, got {args.max_upload_mb}")
    if not 0 <= args.port <= 65535:
        raise UserError(f"--port: expected 0..65535, got {args.port}")
    if args.max_concurrent < 1:
        raise UserError(f"--max-concurrent: expected a positive integer, got {args.max_concurrent}")
    if args.max_batch < 1:
        raise UserError(f"--max-batch: expected a positive integer, got {args.max_batch}")
    if not 0 <= args.batch_wait_ms <= 1000:
        raise UserError(f"--batch-wait-ms: expected 0..1000 ms, got {args.batch_wait_ms}")
    # The port first: a busy one is refused before the index and model are loaded.
    sock = bind_socket(args.host, args.port)
    try:
        index = ImageIndex.load(args.index_dir, model=args.model, device=args.device, precision=args.precision,
                                runtime=args.runtime)
        hosts = [*DEFAULT_ALLOWED_HOSTS, *args.allowed_hosts]
        if args.host not in ("0.0.0.0", "::", ""):  # a wildcard bind has no one name to allow
            hosts.append(args.host)
        app = create_app(index, max_upload_bytes=int(args.max_upload_mb * 2**20), max_k=args.max_k,
                         allowed_hosts=hosts, max_concurrent_requests=args.max_concurrent,
                         max_batch=args.max_batch, batch_wait=args.batch_wait_ms / 1000)
        port = sock.getsockname()[1]
        shown = f"[{args.host}]" if ":" in args.host else args.host
        print(f"serving {index.index_dir} ({len(index)} images) on http://{shown}:{port}/", flush=True)
        server = uvicorn.Server(uvicorn.Config(app, log_level="info", timeout_graceful_shutdown=5))
        server.run(sockets=[sock])
    finally:
        sock.close()
    return 0
