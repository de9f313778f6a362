"""Helpers of tests/test_api.py: start `python -m omni_vllm.api.serve` in a subprocess, make test media."""

from __future__ import annotations

import base64
import contextlib
import io
import os
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
HEALTH_TIMEOUT_S = 300
SERVER_FLAGS = [
    "--max-model-len",
    "2048",
    "--enforce-eager",
    "--kv-cache-memory-bytes",
    str(2**28),
    "--dtype",
    "float32",
]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def tail(log: Path, n: int = 80) -> str:
    return "\n".join(log.read_text(errors="replace").splitlines()[-n:])


def assert_no_traceback(log: Path) -> None:
    """A server log read while the server still runs (its shutdown's races are not ours) holds no
    traceback: every error was answered, none escaped."""
    text = log.read_text(errors="replace")
    assert "Traceback" not in text, text[text.index("Traceback") :][:3000]


@contextlib.contextmanager
def running_server(
    checkpoint: Path | None,
    log: Path,
    *flags: str,
    name: str = "tiny-omni",
    env: dict | None = None,
    module: str = "omni_vllm.api.serve",
):
    """A real server on `checkpoint` (its own engine processes); yields its base URL and log.
    `module`: our `omni_vllm.api.serve`, or vLLM's own `vllm.entrypoints.openai.api_server`; `env`: added variables;
    no `checkpoint`: our demo (its tiny checkpoint built once into .cache, its own model name)."""
    port = free_port()
    model = (
        [str(checkpoint)]
        if module == "omni_vllm.api.serve"
        else ["--model", str(checkpoint)]
    )
    if checkpoint is None:  # our demo: its own checkpoint and model name
        model, named = [], []
    else:
        named = ["--served-model-name", name]
    cmd = [
        sys.executable,
        "-m",
        module,
        *model,
        "--port",
        str(port),
        *SERVER_FLAGS,
        *named,
        *flags,
    ]
    if module != "omni_vllm.api.serve":
        cmd += ["--host", "127.0.0.1"]
    # Serve the way users do: conftest makes test engines in-process, a server keeps its own processes.
    env = {
        **{
            k: v for k, v in os.environ.items() if k != "VLLM_ENABLE_V1_MULTIPROCESSING"
        },
        **(env or {}),
    }
    with open(log, "wb") as out:
        proc = subprocess.Popen(
            cmd,
            cwd=ROOT,
            env=env,
            stdout=out,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
    try:
        t0, deadline = time.monotonic(), time.monotonic() + HEALTH_TIMEOUT_S
        while True:
            if proc.poll() is not None:
                raise RuntimeError(
                    f"server exited with {proc.returncode}:\n{tail(log)}"
                )
            try:
                with urllib.request.urlopen(
                    f"http://127.0.0.1:{port}/health", timeout=2
                ) as r:
                    if r.status == 200:
                        break
            except OSError:
                pass
            if time.monotonic() > deadline:
                raise RuntimeError(
                    f"server not healthy after {HEALTH_TIMEOUT_S} s:\n{tail(log)}"
                )
            time.sleep(0.5)
        print(f"server healthy after {time.monotonic() - t0:.1f} s")
        yield {
            "base_url": f"http://127.0.0.1:{port}/v1",
            "root": f"http://127.0.0.1:{port}",
            "log": log,
            "model": name,
        }
    finally:
        proc.terminate()  # the API server stops its engine processes; then whatever is left of the group
        with contextlib.suppress(subprocess.TimeoutExpired):
            proc.wait(timeout=30)
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGKILL)
        proc.wait(timeout=10)


def metric(root: str, name: str) -> float | None:
    """The first sample of Prometheus metric `name` on the server's /metrics."""
    with urllib.request.urlopen(f"{root}/metrics", timeout=10) as r:
        for line in r.read().decode().splitlines():
            if line.startswith(name) and line[len(name)] in " {":
                return float(line.rsplit(" ", 1)[1])
    return None


# ------------------------------------------------------------------------------- media


def wav_b64(audio: np.ndarray, sr: int = 16000) -> str:
    import soundfile as sf

    buf = io.BytesIO()
    sf.write(buf, audio, sr, format="WAV")
    return base64.b64encode(buf.getvalue()).decode()


def png_data_url(image) -> str:
    buf = io.BytesIO()
    image.save(buf, format="PNG")
    return "data:image/png;base64," + base64.b64encode(buf.getvalue()).decode()


def mp4_data_url(
    frames: np.ndarray, fps: int = 2, audio: np.ndarray | None = None, sr: int = 16000
) -> str:
    """(T, H, W, 3) uint8 RGB frames (MPEG-4 part 2) and, if given, a float32 mono sound track (AAC)
    as an MP4 data URL, written with PyAV."""
    import av

    buf = io.BytesIO()
    with av.open(buf, "w", format="mp4") as out:
        video = out.add_stream("mpeg4", rate=fps)
        video.width, video.height, video.pix_fmt = (
            frames.shape[2],
            frames.shape[1],
            "yuv420p",
        )
        track = (
            None if audio is None else out.add_stream("aac", rate=sr, layout="mono")
        )  # before muxing
        for f in [
            *(
                av.VideoFrame.from_ndarray(np.ascontiguousarray(f), format="rgb24")
                for f in frames
            ),
            None,
        ]:
            for packet in video.encode(f):
                out.mux(packet)
        if track is not None:
            frame = av.AudioFrame.from_ndarray(
                np.asarray(audio, np.float32).reshape(1, -1),
                format="flt",
                layout="mono",
            )
            frame.sample_rate = sr
            for f in (frame, None):
                for packet in track.encode(f):
                    out.mux(packet)
    return "data:video/mp4;base64," + base64.b64encode(buf.getvalue()).decode()
