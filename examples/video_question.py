"""A video with its own sound, and a question; spoken answer.

    python examples/video_question.py --video clip.mp4 --out answer.wav

The clip goes in as a `video_url` with `mm_processor_kwargs: {"use_audio_in_video": true}`: the server
reads the clip's own sound track and interleaves it with the frames as Qwen2.5-Omni was trained
(2-second chunks, video then its audio, TMRoPE). The server must be started with
`--trust-request-mm-kwargs` (vLLM's flag for per-request `mm_processor_kwargs`). Without --video a
4-second clip is made with PyAV (`av`): a square moving over 8 frames, and a tone as its sound.
`--no-audio-in-video` sends the frames only.
"""

import io
from pathlib import Path

from common import connect, data_url, parser, speak


def demo_clip(
    seconds: int = 4, fps: int = 2, freq: float = 330.0, sr: int = 16000
) -> bytes:
    """An MP4 (MPEG-4 video, AAC sound) made with PyAV."""
    import av
    import numpy as np

    buf = io.BytesIO()
    with av.open(buf, "w", format="mp4") as out:
        video = out.add_stream("mpeg4", rate=fps)
        video.width, video.height, video.pix_fmt = 96, 64, "yuv420p"
        sound = out.add_stream("aac", rate=sr, layout="mono")
        for i in range(seconds * fps):
            frame = np.full((64, 96, 3), 20 * i, np.uint8)
            frame[20:44, 4 + 8 * i : 28 + 8 * i] = 255
            for packet in video.encode(
                av.VideoFrame.from_ndarray(frame, format="rgb24")
            ):
                out.mux(packet)
        t = np.arange(seconds * sr) / sr
        tone = av.AudioFrame.from_ndarray(
            (0.3 * np.sin(2 * np.pi * freq * t)).astype(np.float32)[None],
            format="flt",
            layout="mono",
        )
        tone.sample_rate = sr
        for stream, frame in ((video, None), (sound, tone), (sound, None)):
            for packet in stream.encode(frame):
                out.mux(packet)
    return buf.getvalue()


if __name__ == "__main__":
    p = parser(__doc__, "video_answer.wav")
    p.add_argument(
        "--video",
        default=None,
        help="a video file (mp4, webm, mkv, ...) with a sound track",
    )
    p.add_argument(
        "--no-audio-in-video", action="store_true", help="send the frames only"
    )
    p.add_argument(
        "--question", default="What happens in this video, and what do you hear?"
    )
    args = p.parse_args()
    client, model = connect(args)
    video = Path(args.video).read_bytes() if args.video else demo_clip()
    content = [
        {"type": "video_url", "video_url": {"url": data_url(video, "video/mp4")}},
        {"type": "text", "text": args.question},
    ]
    kw = (
        {}
        if args.no_audio_in_video
        else {"extra_body": {"mm_processor_kwargs": {"use_audio_in_video": True}}}
    )
    speak(client, model, args, [{"role": "user", "content": content}], **kw)
