"""A chat that speaks: one question, the reply as text and as a WAV file.

python examples/chat_speak.py --base-url http://127.0.0.1:8000/v1 --out reply.wav
"""

from common import connect, parser, speak

if __name__ == "__main__":
    p = parser(__doc__, "reply.wav")
    p.add_argument("--question", default="Tell me a short story about a lighthouse.")
    args = p.parse_args()
    client, model = connect(args)
    # No system message: the server adds Qwen2.5-Omni's speech system prompt itself.
    speak(client, model, args, [{"role": "user", "content": args.question}])
