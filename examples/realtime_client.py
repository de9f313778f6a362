"""Speech to speech over the Realtime API (`/v1/realtime`, WebSocket) with the `openai` SDK.

    python examples/realtime_client.py --audio question.wav --out reply.wav [--play]
The WAV (mono or stereo, any rate) is streamed in 100 ms chunks as a microphone would send it, then
a second of silence: the server's VAD hears the turn end and answers. With --manual, server VAD is
off and the turn is committed by hand. The reply (pcm16, 24 kHz) is written to --out as it arrives
and its transcript printed; --play also plays it (needs `sounddevice`). Without --audio a tone is
sent (a tone is no speech: it is committed by hand). Needs `pip install "openai[realtime]"`.
"""

import asyncio
import base64
import io
import os
import wave
from pathlib import Path

import numpy as np
from common import SAMPLE_RATE, WavWriter, parser, tone_wav

CHUNK_S = 0.1


def pcm16_24k(wav_bytes: bytes) -> bytes:
    """A WAV file's audio as mono pcm16 at 24 kHz (the Realtime API's audio/pcm)."""
    with wave.open(io.BytesIO(wav_bytes)) as w:
        rate, channels, width = w.getframerate(), w.getnchannels(), w.getsampwidth()
        frames = w.readframes(w.getnframes())
    if width != 2:
        raise SystemExit("a 16-bit WAV file, please")
    x = np.frombuffer(frames, "<i2").reshape(-1, channels).mean(axis=1)
    if rate != SAMPLE_RATE:
        t = np.arange(0, len(x) / rate, 1 / SAMPLE_RATE)
        x = np.interp(t, np.arange(len(x)) / rate, x)
    return np.clip(x, -32768, 32767).astype("<i2").tobytes()


async def main(args) -> None:
    from openai import AsyncOpenAI

    client = AsyncOpenAI(
        base_url=args.base_url, api_key=os.environ.get("OPENAI_API_KEY", "unused")
    )
    model = args.model or (await client.models.list()).data[0].id
    manual = args.manual or args.audio is None
    audio = pcm16_24k(
        Path(args.audio).read_bytes() if args.audio else tone_wav(2.0, sr=SAMPLE_RATE)
    )
    out, played = WavWriter(args.out), []
    async with client.realtime.connect(model=model) as conn:
        session = {
            "type": "realtime",
            "output_modalities": ["audio"],
            "max_output_tokens": args.max_tokens,
            "audio": {"output": {"voice": args.voice}},
        }
        if manual:
            session["audio"]["input"] = {"turn_detection": None}
        await conn.session.update(session=session)
        step = int(CHUNK_S * SAMPLE_RATE) * 2
        tail = (
            b"" if manual else bytes(SAMPLE_RATE * 2)
        )  # a second of silence ends the turn
        for i in range(0, len(audio + tail), step):
            await conn.input_audio_buffer.append(
                audio=base64.b64encode((audio + tail)[i : i + step]).decode()
            )
        if manual:
            await conn.input_audio_buffer.commit()
            await conn.response.create()
        async for event in conn:
            if event.type == "input_audio_buffer.speech_started":
                print(f"[server VAD] speech from {event.audio_start_ms} ms")
            elif event.type == "input_audio_buffer.speech_stopped":
                print(f"[server VAD] speech ended at {event.audio_end_ms} ms")
            elif event.type == "response.output_audio.delta":
                pcm = base64.b64decode(event.delta)
                out.write(pcm)
                played.append(pcm)
            elif event.type == "response.output_audio_transcript.delta":
                print(event.delta, end="", flush=True)
            elif event.type == "error":
                print(f"\n[error] {event.error.message}")
            elif event.type == "response.done":
                usage = event.response.usage
                print(
                    f"\n[{event.response.status}] {usage.output_token_details.audio_tokens if usage else 0} "
                    f"speech tokens -> {args.out}"
                )
                break
    out.close()
    if args.play:
        import sounddevice

        sounddevice.play(
            np.frombuffer(b"".join(played), "<i2"), SAMPLE_RATE, blocking=True
        )


if __name__ == "__main__":
    p = parser(__doc__, "reply.wav")
    p.add_argument("--audio", default=None, help="the question as a 16-bit WAV file")
    p.add_argument(
        "--manual", action="store_true", help="no server VAD: commit the turn by hand"
    )
    p.add_argument(
        "--play", action="store_true", help="play the reply too (needs sounddevice)"
    )
    asyncio.run(main(p.parse_args()))
