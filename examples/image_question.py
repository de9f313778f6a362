"""Image + question, spoken answer.

    python examples/image_question.py --image photo.jpg --question "What is in this picture?" --out answer.wav
Without --image a small gradient picture is sent.
"""

import mimetypes
from pathlib import Path

from common import connect, data_url, gradient_bmp, parser, speak

if __name__ == "__main__":
    p = parser(__doc__, "image_answer.wav")
    p.add_argument("--image", default=None, help="a picture file (or an http(s) URL)")
    p.add_argument("--question", default="What is in this picture?")
    args = p.parse_args()
    client, model = connect(args)
    if args.image and args.image.startswith(("http://", "https://")):
        url = args.image
    elif args.image:
        url = data_url(
            Path(args.image).read_bytes(),
            mimetypes.guess_type(args.image)[0] or "image/jpeg",
        )
    else:
        url = data_url(gradient_bmp(), "image/bmp")
    speak(
        client,
        model,
        args,
        [
            {
                "role": "user",
                "content": [
                    {"type": "image_url", "image_url": {"url": url}},
                    {"type": "text", "text": args.question},
                ],
            }
        ],
    )
