"""Streaming: pcm16 audio chunks are written to a WAV file the moment they arrive (pipe them to a
player the same way), the transcript printed as it comes.

    python examples/stream_to_file.py --base-url http://127.0.0.1:8000/v1 --out streamed.wav
"""

import base64
import time

from common import WavWriter, connect, extra_body, parser

if __name__ == "__main__":
    p = parser(__doc__, "streamed.wav")
    p.add_argument("--question", default="Describe a sunrise over the sea.")
    args = p.parse_args()
    client, model = connect(args)
    t0, first_audio, out = time.monotonic(), None, WavWriter(args.out)
    stream = client.chat.completions.create(
        model=model,
        messages=[{"role": "user", "content": args.question}],
        modalities=["text", "audio"],
        audio={"voice": args.voice, "format": "pcm16"},
        stream=True,
        stream_options={"include_usage": True},
        max_completion_tokens=args.max_tokens,
        extra_body=extra_body(args),
    )
    for chunk in stream:
        if chunk.usage:
            print(f"\nusage: {chunk.usage.model_dump(exclude_none=True)}")
        if not chunk.choices or not chunk.choices[0].delta.audio:
            continue
        audio = chunk.choices[0].delta.audio
        if audio.transcript:
            print(audio.transcript, end="", flush=True)
        if audio.data:
            first_audio = first_audio or time.monotonic() - t0
            out.write(base64.b64decode(audio.data))
    out.close()
    print(f"audio: {args.out}; first audio after {first_audio or 0:.2f} s")
