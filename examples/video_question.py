"""A video with its sound, and a question; spoken answer.

    python examples/video_question.py --video clip.mp4 --use-audio-in-video --out answer.wav
    python examples/video_question.py --video clip.mp4 --audio-track clip.wav --out answer.wav

`--use-audio-in-video` lets the server read the clip's own sound track and interleave it with the
frames as Qwen2.5-Omni was trained (2-second chunks, TMRoPE); the server needs PyAV (`pip install av`)
and `--trust-request-mm-kwargs`. `--audio-track` sends the sound as its own audio part instead (works
everywhere; the model then hears it beside the video, not interleaved). Without --video a short clip
is drawn with OpenCV (pip install opencv-python-headless) and a tone is its sound track.
"""

import base64
import os
import tempfile
from pathlib import Path

from common import connect, data_url, parser, speak, tone_wav


def demo_clip() -> bytes:
    import cv2
    import numpy as np

    with tempfile.TemporaryDirectory() as d:
        path = os.path.join(d, "demo.mp4")
        w = cv2.VideoWriter(path, cv2.VideoWriter_fourcc(*"mp4v"), 2, (96, 64))
        for i in range(4):
            frame = np.full((64, 96, 3), 40 * i, np.uint8)
            frame[20:44, 10 + 20 * i:34 + 20 * i] = 255
            w.write(frame)
        w.release()
        return Path(path).read_bytes()


if __name__ == "__main__":
    p = parser(__doc__, "video_answer.wav")
    p.add_argument("--video", default=None, help="a video file (mp4, avi, webm, ...)")
    p.add_argument("--audio-track", default=None, help="the video's sound as an audio file")
    p.add_argument("--use-audio-in-video", action="store_true", help="the server reads the video's own sound")
    p.add_argument("--question", default="What happens in this video, and what do you hear?")
    args = p.parse_args()
    client, model = connect(args)
    video = Path(args.video).read_bytes() if args.video else demo_clip()
    content = [{"type": "video_url", "video_url": {"url": data_url(video, "video/mp4")}}]
    kw = {}
    if args.use_audio_in_video:
        kw["extra_body"] = {"mm_processor_kwargs": {"use_audio_in_video": True}}
    else:
        track = Path(args.audio_track).read_bytes() if args.audio_track else tone_wav(2.0, 330.0)
        fmt = Path(args.audio_track).suffix.lstrip(".") if args.audio_track else "wav"
        content.append({"type": "input_audio", "input_audio": {"data": base64.b64encode(track).decode(),
                                                               "format": fmt}})
    content.append({"type": "text", "text": args.question})
    speak(client, model, args, [{"role": "user", "content": content}], **kw)
