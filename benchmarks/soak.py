"""Soak: the mixed load of tests/test_reliability.py (16 concurrent openai SDK clients; text / audio / image /
video inputs; streamed and not; both voices; wav, mp3, flac, opus, pcm16; 20% aborted mid-stream) in rounds
against a real `python -m omni_vllm.api.serve` on the tiny checkpoint, for a fixed time. Per round: requests, errors,
5xx, latency p50/p95, the gauges left over and the server's resident memory (server + its children). A leak
shows as RSS growing round after round; the run fails on any error, a gauge left non-zero after a round, or
RSS growing more than --max-growth over the first round.

    python benchmarks/soak.py --minutes 30            # CI does not run this
    python benchmarks/soak.py --minutes 5 --round 100
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "tests"))


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument(
        "--minutes",
        type=float,
        default=30.0,
        help="stop starting rounds after this long",
    )
    ap.add_argument("--round", type=int, default=200, help="requests per round")
    ap.add_argument("--max-rounds", type=int, default=1000)
    ap.add_argument(
        "--max-growth",
        type=float,
        default=0.10,
        help="allowed RSS growth over the first round",
    )
    args = ap.parse_args()

    import test_reliability as R
    from api_server import running_server

    from omni_vllm.testing.tiny import build_tiny_checkpoint

    with tempfile.TemporaryDirectory() as d:
        ckpt = build_tiny_checkpoint(Path(d) / "tiny-omni", seed=0)
        parts = R.mixed_media_parts()
        with running_server(ckpt, Path(d) / "server.log", *R.SERVER_ARGS) as server:
            end, base, failed, start = (
                time.monotonic() + 60 * args.minutes,
                None,
                False,
                0,
            )
            for n in range(args.max_rounds):
                if time.monotonic() > end:
                    break
                t0 = time.monotonic()
                results = R.run_round(server, parts, range(start, start + args.round))
                start += args.round
                elapsed = time.monotonic() - t0
                idle = R.wait_idle(server)
                time.sleep(1.0)
                by_process = R.server_rss(server)
                rss = sum(by_process.values())
                base = base or rss
                errors = [r for r in results if r["status"] != 200]
                lat = sorted(r["seconds"] for r in results)
                print(
                    f"round {n}: {len(results)} req in {elapsed:.1f} s, {sum(r['aborted'] for r in results)} "
                    f"aborted, {len(errors)} errors, {sum(r['status'] >= 500 for r in results)} 5xx, "
                    f"p50 {lat[len(lat) // 2]:.2f} s p95 {lat[int(len(lat) * 0.95)]:.2f} s, "
                    f"RSS {R.rss_line(by_process)}, {(rss - base) / base:+.1%}",
                    flush=True,
                )
                if (
                    errors
                    or any(v != 0 for v in idle.values())
                    or rss > base * (1 + args.max_growth)
                ):
                    print("FAILED:", errors[:3], idle, flush=True)
                    failed = True
                    break
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
