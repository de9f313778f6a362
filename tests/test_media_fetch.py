"""api/media_fetch.py: media URLs that resolve to non-public addresses are refused before any connection,
on every redirect hop, on vLLM's async (server) and sync (offline) paths; chosen networks can be opened.

Every listener here is on loopback and records whether it was ever connected to; "public" is stood in
for by 127.0.0.2, opened through the same allow-list a deployment would use for an internal network.
"""

from __future__ import annotations

import asyncio
import contextlib
import http.server
import io
import threading

import numpy as np
import pytest
import soundfile as sf
from vllm.exceptions import VLLMValidationError

from omni_vllm.api.media_fetch import (
    AddressPolicy,
    PublicMediaConnector,
    PublicOnlyHTTPConnection,
)


def _wav() -> bytes:
    buf = io.BytesIO()
    sf.write(buf, np.zeros(1600, np.float32), 16000, format="WAV")
    return buf.getvalue()


class _Listener(http.server.ThreadingHTTPServer):
    """Serves /a.wav, redirects /go?to=URL; counts connections."""

    def __init__(self, host: str):
        self.connections = 0

        class Handler(http.server.BaseHTTPRequestHandler):
            def do_GET(self):
                if self.path.startswith("/go?to="):
                    self.send_response(302)
                    self.send_header("Location", self.path[len("/go?to=") :])
                    self.end_headers()
                    return
                body = _wav()
                self.send_response(200)
                self.send_header("Content-Type", "audio/wav")
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

            def log_message(self, *args):
                pass

        super().__init__((host, 0), Handler)

    def get_request(self):
        self.connections += 1
        return super().get_request()

    def url(self, path="/a.wav", name=None) -> str:
        return f"http://{name or self.server_address[0]}:{self.server_address[1]}{path}"


@contextlib.contextmanager
def listening(host="127.0.0.1"):
    srv = _Listener(host)
    threading.Thread(target=srv.serve_forever, daemon=True).start()
    try:
        yield srv
    finally:
        srv.shutdown()
        srv.server_close()


def connector(**policy) -> PublicMediaConnector:
    return PublicMediaConnector(
        connection=PublicOnlyHTTPConnection(AddressPolicy(**policy))
    )


def fetch(conn: PublicMediaConnector, url: str, sync: bool):
    if sync:
        return conn.fetch_audio(url)

    async def run():
        try:
            return await conn.fetch_audio_async(url)
        finally:  # its client session belongs to this event loop
            await conn.connection._async_client.close()
            conn.connection._async_client = None

    return asyncio.run(run())


@pytest.mark.parametrize("sync", [False, True], ids=["async", "sync"])
def test_private_addresses_refused_without_connecting(sync):
    with listening() as private:
        for url in (
            private.url(),
            private.url(name="localhost"),
            private.url(name="[::ffff:127.0.0.1]"),
        ):
            with pytest.raises(VLLMValidationError, match="public addresses only"):
                fetch(connector(), url, sync)
        assert private.connections == 0


@pytest.mark.parametrize("sync", [False, True], ids=["async", "sync"])
def test_every_redirect_hop_is_checked(sync):
    with listening() as private, listening("127.0.0.2") as opened:
        conn = connector(allowed=["127.0.0.2/32"])
        audio, sr = fetch(
            conn, opened.url(), sync
        )  # an allowed address is fetched as vLLM would
        assert sr == 16000 and len(audio) == 1600
        for target in (private.url(), private.url(name="localhost")):
            with pytest.raises(VLLMValidationError, match="public addresses only"):
                fetch(conn, opened.url(f"/go?to={target}"), sync)
        assert private.connections == 0 and opened.connections >= 3


def test_allow_private_and_file_urls(tmp_path):
    with listening() as private:
        audio, _ = fetch(connector(allow_private=True), private.url(), sync=False)
        assert len(audio) == 1600 and private.connections == 1
    with pytest.raises(VLLMValidationError, match="file://"):
        fetch(connector(), f"file://{tmp_path}/a.wav", sync=True)
