"""Audio question in, spoken answer out: a recorded question (WAV/FLAC/MP3/OGG) as `input_audio`.

    python examples/audio_question.py --audio question.wav --out answer.wav
Without --audio a two-second tone is sent (ask "what do you hear?").
"""

import base64
from pathlib import Path

from common import connect, parser, speak, tone_wav

if __name__ == "__main__":
    p = parser(__doc__, "answer.wav")
    p.add_argument("--audio", default=None, help="the question as an audio file")
    args = p.parse_args()
    client, model = connect(args)
    data = Path(args.audio).read_bytes() if args.audio else tone_wav()
    fmt = Path(args.audio).suffix.lstrip(".").lower() if args.audio else "wav"
    speak(
        client,
        model,
        args,
        [
            {
                "role": "user",
                "content": [
                    {
                        "type": "input_audio",
                        "input_audio": {
                            "data": base64.b64encode(data).decode(),
                            "format": fmt,
                        },
                    },
                    {"type": "text", "text": "" if args.audio else "What do you hear?"},
                ],
            }
        ],
    )
