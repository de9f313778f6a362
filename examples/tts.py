"""Text to speech with /v1/audio/speech (the model is asked to say the text verbatim).

    python examples/tts.py --text "Hello from Qwen." --format mp3 --out hello.mp3 [--stream]
Formats: mp3, opus, flac, wav, pcm (raw 16-bit 24 kHz). --stream writes the bytes as they arrive.
"""

from common import connect, extra_body, parser

if __name__ == "__main__":
    p = parser(__doc__, "speech.mp3")
    p.add_argument("--text", default="Hello! This is Qwen speaking through omni-vllm.")
    p.add_argument("--format", default=None, help="default: from --out's extension")
    p.add_argument("--speed", type=float, default=1.0)
    args = p.parse_args()
    client, model = connect(args)
    fmt = args.format or args.out.rsplit(".", 1)[-1]
    with (
        client.audio.speech.with_streaming_response.create(
            model=model,
            input=args.text,
            voice=args.voice,
            response_format=fmt,
            speed=args.speed,
            extra_body=extra_body(args),
        ) as resp,
        open(args.out, "wb") as f,
    ):
        for piece in resp.iter_bytes():
            f.write(piece)
    print(f"audio: {args.out} ({resp.headers['content-type']})")
