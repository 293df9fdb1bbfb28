"""A real uvicorn server on loopback: 200 parallel searches, all answered."""
from __future__ import annotations

import asyncio

import httpx
import pytest

from dfsnet.store import ImageIndex
from dfsnet.web import create_app

N_REQUESTS = 200


@pytest.mark.slow
def test_200_parallel_searches_all_succeed(web_index, live_server):
    pipe = ImageIndex.load(web_index["index"])
    queries = sorted(web_index["images"].rglob("*.jpg"))
    payloads = [q.read_bytes() for q in queries]
    expected = {i: [h.id for h in pipe.search(p, k=5)] for i, p in enumerate(payloads)}

    async def fire(url: str) -> list[httpx.Response]:
        limits = httpx.Limits(max_connections=N_REQUESTS, max_keepalive_connections=0)
        async with httpx.AsyncClient(base_url=url, limits=limits, timeout=120.0) as client:
            async def one(i: int) -> httpx.Response:
                data = payloads[i % len(payloads)]
                return await client.post("/api/search", files={"file": ("q.jpg", data, "image/jpeg")},
                                         data={"k": "5"})
            return await asyncio.gather(*(one(i) for i in range(N_REQUESTS)))

    # All 200 in flight at once: above the default concurrency limit (whose 503s test_hardening checks).
    with live_server(create_app(pipe, max_concurrent_requests=N_REQUESTS)) as url:
        responses = asyncio.run(asyncio.wait_for(fire(url), timeout=300))
        health = httpx.get(f"{url}/healthz", timeout=10)
    assert health.status_code == 200
    statuses = [r.status_code for r in responses]
    assert statuses == [200] * N_REQUESTS, {s: statuses.count(s) for s in set(statuses)}
    for i, response in enumerate(responses):
        assert [h["id"] for h in response.json()["hits"]] == expected[i % len(payloads)]


def test_dfsnet_serve_command(web_index):
    """`dfsnet serve` in a subprocess: it starts, answers, and stops on SIGTERM."""
    import os
    import signal
    import socket
    import subprocess
    import sys
    import time

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    proc = subprocess.Popen([sys.executable, "-m", "dfsnet.cli", "serve", str(web_index["index"]), "--port",
                             str(port), "--max-upload-mb", "1", "--max-k", "7"],
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                            env={**os.environ, "PYTHONUNBUFFERED": "1"})
    try:
        deadline = time.monotonic() + 120
        while True:
            assert proc.poll() is None, proc.stdout.read().decode()
            try:
                if httpx.get(f"http://127.0.0.1:{port}/healthz", timeout=2).status_code == 200:
                    break
            except httpx.TransportError:
                pass
            assert time.monotonic() < deadline, "dfsnet serve did not come up"
            time.sleep(0.2)
        info = httpx.get(f"http://127.0.0.1:{port}/api/info", timeout=10).json()
        assert info["max_k"] == 7 and info["max_upload_bytes"] == 2**20
        data = (web_index["images"] / "class_0" / "000.jpg").read_bytes()
        response = httpx.post(f"http://127.0.0.1:{port}/api/search", files={"file": ("q.jpg", data)},
                              data={"k": "3"}, timeout=60)
        assert response.status_code == 200 and len(response.json()["hits"]) == 3
    finally:
        proc.send_signal(signal.SIGTERM)
        out = proc.communicate(timeout=30)[0].decode()
    # uvicorn shuts down gracefully, then re-raises the signal it caught.
    assert proc.returncode in (0, -signal.SIGTERM), out
    assert "Finished server process" in out
    assert f"on http://127.0.0.1:{port}/" in out


def test_serve_refuses_a_busy_port_before_loading_anything(tmp_path, capsys):
    """CLI: `serve` on a busy port printed "serving on ..." and then failed."""
    import socket

    from dfsnet.cli import main

    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen(1)
        port = busy.getsockname()[1]
        code = main(["serve", str(tmp_path / "no-index-here"), "--port", str(port)])
    out, err = capsys.readouterr()
    assert code == 2 and "serving" not in out
    assert err.startswith("dfsnet serve: error: --port: cannot listen on 127.0.0.1:") and "Traceback" not in err
