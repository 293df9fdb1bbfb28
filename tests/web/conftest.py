"""Fixtures of the web tests: a tiny random-weight index and a real uvicorn server on loopback."""
from __future__ import annotations

import contextlib
import socket
import threading
import time

import pytest

from tests.conftest import make_image_folder

BITS = 32


@pytest.fixture(scope="session")
def web_index(tmp_path_factory) -> dict:
    """An index (with stored features) of 3 classes x 4 generated images, and one without features."""
    import torch

    from dfsnet.models import DFSNet, create_backbone, save_checkpoint
    from dfsnet.store import ImageIndex

    root = tmp_path_factory.mktemp("web")
    torch.manual_seed(0)
    net = DFSNet(create_backbone("test_efficientnet", pretrained=False), num_classes=3)
    ckpt = save_checkpoint(net, root / "model" / "best.safetensors", extra={"image_size": 32})
    images = make_image_folder(root / "images", n_classes=3, per_class=4, size=48, seed=2)
    ImageIndex.build(ckpt, images, root / "index", bits=BITS, fit_on=images, store_features=True, batch_size=12)
    ImageIndex.build(ckpt, images / "class_0", root / "plain", bits=BITS, fit_on=images)
    return {"root": root, "ckpt": ckpt, "images": images, "index": root / "index", "plain": root / "plain"}


@pytest.fixture
def live_server():
    """``with live_server(app) as url:`` runs the app on loopback for the block."""
    return _live_server


@contextlib.contextmanager
def _live_server(app, *, timeout: float = 30.0):
    """Run ``app`` with uvicorn on 127.0.0.1 at a free port in a thread; yield its base URL."""
    import uvicorn

    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.bind(("127.0.0.1", 0))
    port = sock.getsockname()[1]
    config = uvicorn.Config(app, log_level="warning", backlog=512, timeout_graceful_shutdown=5)
    server = uvicorn.Server(config)
    thread = threading.Thread(target=server.run, kwargs={"sockets": [sock]}, daemon=True)
    thread.start()
    deadline = time.monotonic() + timeout
    while not server.started:
        if not thread.is_alive() or time.monotonic() > deadline:
            raise RuntimeError("uvicorn did not start")
        time.sleep(0.05)
    try:
        yield f"http://127.0.0.1:{port}"
    finally:
        server.should_exit = True
        thread.join(timeout=timeout)
        sock.close()
