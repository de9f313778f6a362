"""Two replicas behind nginx (Debian's package, deploy/nginx.conf), round robin on loopback.

- Audio ids: an id one replica issued is accepted by the other (shared OMNI_VLLM_AUDIO_ID_KEY); an
  altered one is a 400.
- A mixed load of 104 requests (audio and text, streamed and not, second turns that send the first
  turn's audio id back, wherever it lands) with 8 clients at once; half way, one replica is killed.
  Requests in flight on it fail at once (no hang), every other request completes.
"""

from __future__ import annotations

import concurrent.futures as cf
import contextlib
import os
import signal
import subprocess
import threading
import time
import urllib.request
from pathlib import Path

import openai
import pytest
import system_tools
from api_server import ROOT, free_port, running_server

pytestmark = pytest.mark.slow

KEY = {"OMNI_VLLM_AUDIO_ID_KEY": "replicas-test-key"}
FLAGS = ["--max-audio-tokens", "12"]
USER = [{"role": "user", "content": "Hello there."}]
TEARDOWN_S = 5.0  # a SIGKILLed replica (GBs of memory, two processes) is gone within this, on a loaded CI machine
AUDIO = dict(modalities=["text", "audio"], extra_body={"ignore_eos": True})


@contextlib.contextmanager
def nginx(ports: list[int], tmp: Path):
    nginx_bin = system_tools.require("nginx")
    listen = free_port()
    conf = (ROOT / "deploy" / "nginx.conf").read_text()
    conf = conf.replace("listen LISTEN;", f"listen 127.0.0.1:{listen};").replace(
        "# REPLICAS (one `server host:port max_fails=1 fail_timeout=10s;` line each)",
        "\n".join(f"server 127.0.0.1:{p} max_fails=1 fail_timeout=10s;" for p in ports),
    )
    (tmp / "tmp").mkdir(parents=True, exist_ok=True)
    (tmp / "nginx.conf").write_text(conf)
    proc = subprocess.Popen(
        [nginx_bin, "-p", str(tmp), "-c", str(tmp / "nginx.conf")],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.STDOUT,
    )
    try:
        for _ in range(100):
            with (
                contextlib.suppress(OSError),
                urllib.request.urlopen(f"http://127.0.0.1:{listen}/health", timeout=2),
            ):
                break
            assert proc.poll() is None, (tmp / "error.log").read_text()
            time.sleep(0.1)
        yield f"http://127.0.0.1:{listen}"
    finally:
        proc.terminate()
        proc.wait(timeout=10)


def port_of(server) -> int:
    return int(server["root"].rsplit(":", 1)[1])


def client_for(url: str) -> openai.OpenAI:
    return openai.OpenAI(base_url=f"{url}/v1", api_key="-", max_retries=0, timeout=120)


def one(client: openai.OpenAI, model: str, kind: str) -> None:
    """One request of the mix; raises on any error."""
    if kind == "text":
        r = client.chat.completions.create(model=model, messages=USER, max_tokens=3)
        assert r.choices[0].message.content is not None
    elif kind == "stream":
        chunks = list(
            client.chat.completions.create(
                model=model,
                messages=USER,
                max_tokens=3,
                stream=True,
                audio={"voice": "Ethan", "format": "pcm16"},
                **AUDIO,
            )
        )
        last = chunks[-1].choices[0]
        assert last.finish_reason and last.delta.audio.id.startswith("audio_")
    else:
        r = client.chat.completions.create(
            model=model,
            messages=USER,
            max_tokens=3,
            audio={"voice": "Chelsie", "format": "wav"},
            **AUDIO,
        )
        audio = r.choices[0].message.audio
        assert audio.data and audio.id
        if kind == "two_turns":  # the second turn may land on the other replica
            turn2 = [
                *USER,
                {"role": "assistant", "audio": {"id": audio.id}},
                {"role": "user", "content": "More."},
            ]
            r2 = client.chat.completions.create(
                model=model,
                messages=turn2,
                max_tokens=2,
                audio={"voice": "Chelsie", "format": "wav"},
                **AUDIO,
            )
            assert r2.choices[0].message.audio.data


def test_replicas_behind_nginx(tiny_checkpoint_dir, tmp_path):
    system_tools.require("nginx")  # before two servers start for nothing
    with contextlib.ExitStack() as stack:
        a, b = (
            stack.enter_context(
                running_server(
                    tiny_checkpoint_dir, tmp_path / f"{n}.log", *FLAGS, env=KEY
                )
            )
            for n in "ab"
        )
        model = a["model"]

        # an id from one replica is accepted by the other; altered, it is refused
        first = client_for(a["root"]).chat.completions.create(
            model=model,
            messages=USER,
            max_tokens=3,
            audio={"voice": "Chelsie", "format": "wav"},
            **AUDIO,
        )
        audio_id = first.choices[0].message.audio.id
        turn2 = [
            *USER,
            {"role": "assistant", "audio": {"id": audio_id}},
            {"role": "user", "content": "More."},
        ]
        ok = client_for(b["root"]).chat.completions.create(
            model=model, messages=turn2, max_tokens=1
        )
        assert ok.choices[0].message.content is not None
        body, tag = audio_id.rsplit(".", 1)
        altered = body + "." + ("A" if tag[0] != "A" else "B") + tag[1:]
        with pytest.raises(openai.BadRequestError, match="unknown or expired"):
            client_for(b["root"]).chat.completions.create(
                model=model,
                max_tokens=1,
                messages=[
                    *USER,
                    {"role": "assistant", "audio": {"id": altered}},
                    {"role": "user", "content": "?"},
                ],
            )

        lb = stack.enter_context(nginx([port_of(a), port_of(b)], tmp_path / "nginx"))
        client = client_for(lb)
        kinds = ["audio", "stream", "two_turns", "text"] * 26  # 104 requests
        done, killed_at, lock = [], None, threading.Lock()
        # the server process of replica b: the one listening on its port
        import psutil

        b_pid = next(
            c.pid
            for c in psutil.net_connections("tcp")
            if c.laddr and c.laddr.port == port_of(b) and c.status == "LISTEN"
        )

        def run(kind: str):
            nonlocal killed_at
            t0 = time.monotonic()
            try:
                one(client, model, kind)
                error = None
            except Exception as e:  # noqa: BLE001 -- recorded and judged below
                error = e
            t1 = time.monotonic()
            with lock:
                done.append((kind, t0, t1, error))
                if (
                    len(done) == len(kinds) // 2 and killed_at is None
                ):  # half way: replica b dies
                    killed_at = time.monotonic()
                    os.killpg(os.getpgid(b_pid), signal.SIGKILL)

        with cf.ThreadPoolExecutor(8) as pool:
            list(pool.map(run, kinds))

        assert killed_at is not None and len(done) == len(kinds)
        failed = [
            (k, round(t0 - killed_at, 2), round(t1 - killed_at, 2), e)
            for k, t0, t1, e in done
            if e is not None
        ]
        # only requests in flight on b when it died, or sent to it while the killed processes were torn
        # down (its listening socket takes connections until the kernel closes it), fail, and at once:
        # nginx answers 502, or a stream that had started is cut (a connection error for the client)
        assert len(failed) <= 16, failed
        for _, t0, t1, e in failed:
            cut = isinstance(
                e, openai.APIConnectionError
            ) or "RemoteProtocolError" in repr(e)
            assert t0 <= TEARDOWN_S and t1 <= TEARDOWN_S + 10, failed
            assert getattr(e, "status_code", None) == 502 or cut, failed
        after = [e for _, t0, _, e in done if t0 - killed_at > TEARDOWN_S]
        assert all(
            e is None for e in after
        )  # everything sent once b was gone completed (on a)
        time.sleep(max(0.0, killed_at + TEARDOWN_S - time.monotonic()))
        with cf.ThreadPoolExecutor(
            8
        ) as pool:  # and so does a round sent now, through the balancer
            list(pool.map(lambda kind: one(client, model, kind), kinds[:16]))
        print(
            f"{len(done)} requests, {len(failed)} failed (in flight on the killed replica): {failed}"
        )
