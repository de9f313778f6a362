"""The browser playground (GET /playground) in headless Chromium against the real server.

Chromium's fake microphone plays a WAV file once (an espeak-ng phrase, then silence); the page
streams it to /v1/realtime, the server's VAD ends the turn, and the reply must be played by the
page's AudioContext and its transcript shown. Debian's `chromium` is driven with the `playwright`
package (no browser download). A missing `playwright` (a pip dependency of the test extra) fails
the test; a missing system program (chromium, espeak-ng) skips it as every such test does
(tests/system_tools.py).
"""

from __future__ import annotations

import os
import urllib.request
from pathlib import Path

import numpy as np
import pytest
import system_tools
from api_server import running_server

from omni_vllm.testing import media

MIC_SR = (
    48000  # the fake capture device's file; Chromium resamples it to the device rate
)
# Random weights never stop speaking: a short reply (speech codes and text tokens capped). Greedy
# text, so that a reply is the same every run (sampled, one ended after a few tokens now and then).
SERVER_ARGS = [
    "--max-audio-tokens",
    "48",
    "--default-voice",
    "ethan",
    "--override-generation-config",
    '{"temperature": 0}',
]
MAX_OUTPUT_TOKENS = 6
REPLY_TIMEOUT_MS = (
    240_000  # two busy cores: the first turn warms up the thinker, talker and vocoder
)


@pytest.fixture(scope="module")
def server(tiny_checkpoint_dir, tmp_path_factory):
    with running_server(
        tiny_checkpoint_dir,
        tmp_path_factory.mktemp("playground") / "server.log",
        *SERVER_ARGS,
    ) as s:
        yield s


def fake_microphone(path: Path) -> Path:
    """0.5 s of silence, a spoken phrase, then 8 s of silence: one turn (Chromium plays it once: a
    second turn on a slow machine would interrupt the first reply before its audio came)."""
    import soundfile as sf

    system_tools.require("espeak-ng")
    phrase = media.spoken_phrase(
        "Hello! Can you hear me? Please tell me a story.", sr=MIC_SR
    )
    phrase = 0.7 * phrase / max(1e-6, float(np.abs(phrase).max()))
    audio = np.concatenate(
        [np.zeros(MIC_SR // 2), phrase, np.zeros(8 * MIC_SR)]
    ).astype(np.float32)
    sf.write(path, audio, MIC_SR, subtype="PCM_16")
    return path


@pytest.fixture
def browser(tmp_path):
    """Headless Debian Chromium (or OMNI_VLLM_CHROMIUM) with the fake microphone."""
    chromium = system_tools.require("chromium")
    try:
        from playwright.sync_api import sync_playwright
    except ImportError:
        pytest.fail(
            "the `playwright` package is missing: pip install -e '.[test]' (the system "
            "Chromium is used, no browser download)"
        )
    wav = fake_microphone(tmp_path / "mic.wav")
    with sync_playwright() as p:
        b = p.chromium.launch(
            executable_path=chromium,
            args=[
                "--use-fake-ui-for-media-stream",
                "--use-fake-device-for-media-stream",
                f"--use-file-for-fake-audio-capture={wav}%noloop",
                "--autoplay-policy=no-user-gesture-required",
                "--no-sandbox",
            ],
        )
        try:
            yield b
        finally:
            b.close()


def test_playground_page_is_served_whole(server):
    """One static page with everything inline: no external URL for a browser to fetch."""
    with urllib.request.urlopen(server["root"] + "/playground", timeout=30) as r:
        assert r.status == 200 and r.headers["content-type"].startswith("text/html")
        page = r.read().decode()
    assert "/v1/realtime" in page and "audioWorklet" in page
    assert "http://" not in page and "https://" not in page and "src=" not in page


# A microphone the test speaks into when it chooses (`window.testSpeak(base64 pcm16 at 48 kHz)`), silent
# otherwise: the page's getUserMedia gets the stream of a WebAudio graph instead of the fake device.
TEST_MICROPHONE = """
navigator.mediaDevices.getUserMedia = async () => {
  const ctx = new AudioContext({ sampleRate: 48000 });
  const out = ctx.createMediaStreamDestination();
  window.testSpeak = (b64) => {
    const bytes = Uint8Array.from(atob(b64), (c) => c.charCodeAt(0));
    const pcm = new Int16Array(bytes.buffer);
    const buf = ctx.createBuffer(1, pcm.length, 48000);
    buf.copyToChannel(Float32Array.from(pcm, (v) => v / 32768), 0);
    const src = ctx.createBufferSource();
    src.buffer = buf;
    src.connect(out);
    src.start();
  };
  await ctx.resume();
  return out.stream;
};
"""


class Playground:
    """The page in a browser tab, read through `window.playground`."""

    def __init__(self, browser, server, init_script: str | None = None):
        self.page = page = browser.new_page(viewport={"width": 1100, "height": 720})
        if init_script:
            page.add_init_script(init_script)
        self.console: list[str] = []
        page.on("console", lambda m: self.console.append(f"{m.type}: {m.text}"))
        page.on("pageerror", lambda e: self.console.append(f"pageerror: {e}"))
        page.goto(server["root"] + "/playground")
        page.wait_for_function("window.playground.model !== null", timeout=30_000)
        assert page.evaluate("window.playground.model") == server["model"]
        page.fill("#max-tokens", str(MAX_OUTPUT_TOKENS))
        page.fill("#instructions", "Answer in one short sentence.")

    def state(self) -> dict:
        return self.page.evaluate(
            "({status: playground.status, counts: playground.counts, errors: playground.errors,"
            " sent: playground.sentSamples, got: playground.receivedSamples, played: playground.playedSamples,"
            " transcript: playground.transcript})"
        )

    def wait_for(self, condition: str, timeout_ms: int) -> None:
        """Until `condition` holds in the page; an error the page shows fails at once."""
        try:
            self.page.wait_for_function(
                f"({condition}) || playground.errors.length > 0", timeout=timeout_ms
            )
        except Exception:
            print(
                "page state:", self.state(), "\nconsole:", "\n".join(self.console[-30:])
            )
            raise
        errors = self.page.evaluate("playground.errors")
        assert not errors, f"the page shows errors: {errors}; state: {self.state()}"

    def connect(self) -> None:
        self.page.click("#connect")
        self.wait_for("playground.counts['session.updated'] > 0", 120_000)


def test_spoken_turn_is_answered_and_played(server, browser, tmp_path):
    """The fake microphone's phrase -> server VAD -> a spoken reply, played, its transcript shown."""
    pg = Playground(browser, server)
    page = pg.page
    pg.connect()
    # A reply heard (its audio played out by the AudioContext) and its words on the page.
    pg.wait_for(
        "playground.playedSamples > 0 && playground.transcript.some(t => t.role === 'assistant' && t.text)",
        REPLY_TIMEOUT_MS,
    )
    s = pg.state()
    print("page state:", {k: v for k, v in s.items() if k != "transcript"})
    counts = s["counts"]
    assert counts["input_audio_buffer.speech_started"] == 1, (
        counts
    )  # one phrase, one turn
    for event in (
        "session.created",
        "input_audio_buffer.speech_stopped",
        "input_audio_buffer.committed",
        "response.created",
        "response.output_audio.delta",
        "response.output_audio_transcript.delta",
    ):
        assert counts.get(event, 0) > 0, (event, counts)
    session = page.evaluate("playground.session")
    assert session["max_output_tokens"] == MAX_OUTPUT_TOKENS and session[
        "output_modalities"
    ] == ["audio"]
    assert session["audio"]["input"]["turn_detection"]["type"] == "server_vad"
    # What was sent was the microphone at 24 kHz; what was played is at most what came (24 kHz too).
    assert s["sent"] >= 24000 and 0 < s["played"] <= s["got"]
    # The page shows both sides: the spoken user turn and the assistant's words.
    assert "spoken" in page.locator(".msg.user").first.text_content()
    assert page.locator(".msg.assistant .text").first.text_content(), s["transcript"]
    assert page.evaluate(
        "document.getElementById('status').textContent === playground.status"
    )
    pg.wait_for(
        "playground.counts['response.done'] > 0", REPLY_TIMEOUT_MS
    )  # the whole reply shown
    shot = Path(
        os.environ.get("OMNI_VLLM_PLAYGROUND_SCREENSHOT", tmp_path / "playground.png")
    )
    page.screenshot(path=str(shot), full_page=True)
    print("screenshot:", shot)


def test_typed_message_answered_in_text(server, browser):
    """Microphone muted, "text" chosen, a typed message: a text reply shown, no audio sent or received."""
    pg = Playground(browser, server)
    page = pg.page
    page.click("#mute")
    page.check('input[name="modality"][value="text"]')
    pg.connect()
    assert page.evaluate("playground.session.output_modalities") == ["text"]
    page.fill("#text", "Hello, who are you?")
    page.press("#text", "Enter")
    pg.wait_for("playground.counts['response.done'] > 0", REPLY_TIMEOUT_MS)
    s = pg.state()
    counts = s["counts"]
    assert counts.get("response.output_text.delta", 0) > 0, counts
    assert (
        "response.output_audio.delta" not in counts and s["got"] == 0 and s["sent"] == 0
    ), s
    user, assistant = (
        page.locator(f".msg.{role} .text").first.text_content()
        for role in ("user", "assistant")
    )
    assert user == "Hello, who are you?" and assistant, s["transcript"]


def test_speaking_over_the_reply_cuts_it(server, browser, tmp_path):
    """Barge-in: speech while a reply streams stops its playback at once, and the page sends
    conversation.item.truncate with what it had played; the server cancels the reply."""
    import base64

    import soundfile as sf

    pg = Playground(browser, server, init_script=TEST_MICROPHONE)
    page = pg.page
    page.fill(
        "#max-tokens", ""
    )  # a long reply: the text runs on after the speech cap's audio came
    pg.connect()
    page.fill("#text", "Tell me a very long story.")
    page.press("#text", "Enter")
    pg.wait_for("playground.receivedSamples > 0", REPLY_TIMEOUT_MS)
    assert page.evaluate("playground.responding || playground.playing"), (
        f"the reply was over: {pg.state()}"
    )
    mic = sf.read(fake_microphone(tmp_path / "phrase.wav"), dtype="int16")[0][
        MIC_SR // 2 : 5 * MIC_SR
    ]
    page.evaluate("b64 => testSpeak(b64)", base64.b64encode(mic.tobytes()).decode())
    # (then the server's VAD ends the user's turn and a new reply starts: not waited for)
    pg.wait_for(
        "playground.counts['conversation.item.truncated'] > 0 && playground.responses.length > 0",
        REPLY_TIMEOUT_MS,
    )
    s = pg.state()
    print("page state:", {k: v for k, v in s.items() if k != "transcript"})
    (cut,) = page.evaluate("playground.truncations")
    assert (
        cut["audio_end_ms"] == s["played"] * 1000 // 24000 <= s["got"] * 1000 // 24000
    ), (cut, s)
    # A reply still running when the user spoke is cancelled by the server (the turn was detected);
    # one that had just ended (its text at the model's length) is cut in the page only.
    events = page.evaluate("playground.events")
    done = page.evaluate("playground.responses")[0]
    if events.index("input_audio_buffer.speech_started") < events.index(
        "response.done"
    ):
        assert (done["status"], done["reason"]) == ("cancelled", "turn_detected"), done
    assert s["counts"]["input_audio_buffer.speech_started"] == 1
    bubble = page.locator(f'.msg[data-item-id="{cut["item_id"]}"]')
    assert "interrupted at" in bubble.locator(".note").text_content()
    # The page then shows what the server kept of the reply (the part heard).
    pg.wait_for("playground.counts['conversation.item.retrieved'] > 0", 60_000)
    kept = page.evaluate("playground.transcript.find(t => t.role === 'assistant').text")
    assert bubble.locator(".text").text_content() == kept
    page.screenshot(path=str(tmp_path / "barge-in.png"), full_page=True)
