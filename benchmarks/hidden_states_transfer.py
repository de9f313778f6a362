"""Cost per token of moving thinker hidden states from the EngineCore to the API-server process.

Each token carries two rows of the real model's hidden size (input embedding + last hidden state,
3584 each). A producer process plays the EngineCore, a consumer process plays the API server;
the consumer owns a usable tensor per request at the end (copied out where the transport would
otherwise reuse its memory). Routes:

  naive/token/tensor  multiprocessing.Queue, one put per token of (req id, pos, emb, hid) torch
                      tensors: torch's reducers move each tensor into its own shared-memory segment
  naive/token/pickle  same, the rows as numpy arrays (plain pickling, bytes through the pipe)
  queue/step/pickle   multiprocessing.Queue, one put per engine step: {req id: [n, 2, H] array}
  shm-ring/step       a preallocated shared-memory ring; per step the producer copies the rows
                      in and sends (req id, slot, n) over ZMQ; the consumer copies them out
  ours: vllm/step     what omni-vllm does: the rows ride in the step's EngineCoreOutputs
                      (`pooling_output`, one [n, 2, H] tensor per request) through vLLM's own
                      msgpack encoder and ZMQ socket, tensors as zero-copy frames
  vllm/step, no rows  the same messages without hidden states: the baseline cost vLLM pays anyway

Shapes: decode steps of B requests x 1 token, and one prefill step of 1 request x P tokens.
Reported: end-to-end microseconds per token (producer start -> consumer has everything), and the
producer's own time per token (what the engine's busy loop pays).

    python benchmarks/hidden_states_transfer.py [--dtype bfloat16|float32] [--quick] [--repeats N]
"""

from __future__ import annotations

import argparse
import multiprocessing as mp
import os
import pickle
import tempfile
import time
from multiprocessing import shared_memory

import numpy as np
import torch

HIDDEN = 3584
DONE = b"done"
Step = tuple[
    torch.Tensor, list[str], list[int]
]  # ([n, 2, H] rows of one step, req ids, rows each)


def _rows(n: int, dtype: torch.dtype, seed: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randn(n, 2, HIDDEN, generator=g).to(dtype)


def _np(t: torch.Tensor) -> np.ndarray:
    # bfloat16 has no numpy dtype: ship the raw bits as int16 (as a real implementation would).
    return t.view(torch.int16).numpy() if t.dtype == torch.bfloat16 else t.numpy()


# ---------------------------------------------------------------------------------------------
# Producers (the "EngineCore"); each returns seconds spent producing.
# ---------------------------------------------------------------------------------------------


def produce(route: str, chan, steps: list[Step]) -> float:
    t0 = time.perf_counter()
    if route == "naive/token/tensor":
        for rows, rids, counts in steps:
            for i, rid in enumerate(_per_token(rids, counts)):
                chan.put((rid, i, rows[i, 0].clone(), rows[i, 1].clone()))
        chan.put(None)
    elif route == "naive/token/pickle":
        for rows, rids, counts in steps:
            arr = _np(rows)
            for i, rid in enumerate(_per_token(rids, counts)):
                chan.put((rid, i, arr[i, 0].copy(), arr[i, 1].copy()))
        chan.put(None)
    elif route == "queue/step/pickle":
        for rows, rids, counts in steps:
            chan.put((rids, counts, _np(rows)))
        chan.put(None)
    elif route == "shm-ring/step":
        sock, ring = chan
        slot = 0
        for rows, rids, counts in steps:
            n = len(rows)
            if slot + n > ring["slots"]:
                slot = 0  # (a real ring would also need the consumer's progress: not modelled)
            ring["buf"][slot : slot + n] = _np(rows)  # one copy per step
            sock.send(pickle.dumps((slot, rids, counts)))
            slot += n
        sock.send(DONE)
    elif route.startswith("vllm/step"):
        import zmq
        from vllm.v1.engine import EngineCoreOutput, EngineCoreOutputs
        from vllm.v1.serial_utils import MsgpackEncoder

        encoder = MsgpackEncoder()
        with_rows = route == "vllm/step"
        pending: list = []
        for token, (rows, rids, counts) in enumerate(steps):
            per_req = torch.split(rows, counts) if with_rows else [None] * len(rids)
            outs = EngineCoreOutputs(
                outputs=[
                    EngineCoreOutput(
                        request_id=rid, new_token_ids=[token], pooling_output=r
                    )
                    for rid, r in zip(rids, per_req)
                ]
            )
            # As EngineCoreProc._send_msg_tracking_payload: main frame tracked, tensors as
            # further zero-copy frames; the message is kept alive until ZMQ is done with it.
            bufs = encoder.encode(outs)
            more = zmq.SNDMORE if len(bufs) > 1 else 0
            tracker = chan.send(bufs[0], more, copy=False, track=True)
            if more:
                chan.send_multipart(bufs[1:], copy=False)
            pending.append((tracker, outs))
            while pending and pending[0][0].done:
                pending.pop(0)
        chan.send(DONE)
    else:
        raise ValueError(route)
    return time.perf_counter() - t0


def _per_token(rids: list[str], counts: list[int]) -> list[str]:
    return [rid for rid, n in zip(rids, counts) for _ in range(n)]


# ---------------------------------------------------------------------------------------------
# Consumers (the "API server"): collect per request, report when all has arrived.
# ---------------------------------------------------------------------------------------------


def consume(route: str, addr, queue, ring_name, ring_slots, bf16, result_q) -> None:
    import zmq
    from vllm.v1.engine import EngineCoreOutputs
    from vllm.v1.serial_utils import MsgpackDecoder

    got: dict[str, list] = {}
    ctx = zmq.Context()
    sock = ctx.socket(zmq.PULL)
    if queue is None:
        sock.connect(addr)
    decoder = MsgpackDecoder(EngineCoreOutputs)
    if route == "shm-ring/step":
        shm = shared_memory.SharedMemory(name=ring_name)
        buf = np.ndarray(
            (ring_slots, 2, HIDDEN),
            dtype=np.int16 if bf16 else np.float32,
            buffer=shm.buf,
        )
        int(
            buf.reshape(-1)[:: 4096 // buf.itemsize].sum()
        )  # map every page before the clock
    result_q.put("ready")  # everything imported and connected: the clock may start

    if queue is not None:
        while (item := queue.get()) is not None:
            if route == "queue/step/pickle":
                rids, counts, arr = item
                for rid, r in zip(rids, torch.split(torch.from_numpy(arr), counts)):
                    got.setdefault(rid, []).append(r)
            else:
                rid, _pos, emb, hid = item
                got.setdefault(rid, []).append((emb, hid))
    elif route == "shm-ring/step":
        while (msg := sock.recv()) != DONE:
            slot, rids, counts = pickle.loads(msg)
            block = torch.from_numpy(
                buf[slot : slot + sum(counts)].copy()
            )  # one copy per step
            for rid, r in zip(rids, torch.split(block, counts)):
                got.setdefault(rid, []).append(r)
        del buf
        shm.close()
    else:
        while True:
            frames = sock.recv_multipart(copy=False)
            if len(frames) == 1 and frames[0].bytes == DONE:
                break
            for out in decoder.decode(frames).outputs:
                got.setdefault(out.request_id, []).append(out.pooling_output)
    sock.close()
    ctx.term()
    result_q.put((time.perf_counter(), sum(len(v) for v in got.values())))


def run(route: str, steps: list[Step], dtype: torch.dtype) -> tuple[float, float]:
    # fork: the consumer starts with torch/vllm/zmq already imported (nothing is timed before it
    # reports ready anyway); every ZMQ context is created after the fork.
    ctx = mp.get_context("fork")
    result_q = ctx.Queue()
    queue = (
        ctx.Queue()
        if route.startswith("naive") or route == "queue/step/pickle"
        else None
    )
    addr = f"ipc://{tempfile.mkdtemp()}/hs.sock"
    bf16 = dtype == torch.bfloat16
    ring_slots = max(
        4096, max(len(rows) for rows, _, _ in steps)
    )  # wraps, like a real ring
    shm = None
    if route == "shm-ring/step":
        shm = shared_memory.SharedMemory(create=True, size=ring_slots * 2 * HIDDEN * 4)
    consumer = ctx.Process(
        target=consume,
        args=(
            route,
            addr,
            queue,
            shm.name if shm else None,
            ring_slots,
            bf16,
            result_q,
        ),
    )
    consumer.start()
    sock = zctx = None
    if queue is None:
        import zmq

        zctx = zmq.Context()
        sock = zctx.socket(zmq.PUSH)
        sock.bind(addr)
    assert result_q.get() == "ready"
    chan = queue if queue is not None else sock
    if shm is not None:
        ring = np.ndarray(
            (ring_slots, 2, HIDDEN),
            dtype=np.int16 if bf16 else np.float32,
            buffer=shm.buf,
        )
        ring[:] = (
            0  # a long-lived ring is warm: take the first-touch page faults out of the clock
        )
        chan = (sock, {"buf": ring, "slots": ring_slots})
    t0 = time.perf_counter()
    producer_s = produce(route, chan, steps)
    t_end, n_rows = result_q.get()
    consumer.join()
    if sock is not None:
        sock.close(linger=1000)
        zctx.term()
    if shm is not None:
        del ring, chan
        shm.close()
        shm.unlink()
    return t_end - t0, producer_s


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--dtype", default="bfloat16", choices=["bfloat16", "float32"])
    ap.add_argument(
        "--quick", action="store_true", help="fewer steps and repeats (a smoke run)"
    )
    ap.add_argument("--repeats", type=int, default=3, help="best of N runs per cell")
    args = ap.parse_args()
    dtype = getattr(torch, args.dtype)
    torch.set_num_threads(1)
    import vllm.v1.engine  # noqa: F401  import before any timing (the first import takes seconds)
    import vllm.v1.serial_utils  # noqa: F401

    n_steps = 20 if args.quick else 100
    repeats = 1 if args.quick else args.repeats
    shapes = [  # (label, requests per step, tokens per request, steps)
        ("decode B=1", 1, 1, n_steps * 4),
        ("decode B=16", 16, 1, n_steps),
        ("decode B=64", 64, 1, n_steps // 2),
        ("prefill 1x1024", 1, 1024, 4 if args.quick else 10),
    ]
    routes = [
        "naive/token/tensor",
        "naive/token/pickle",
        "queue/step/pickle",
        "shm-ring/step",
        "vllm/step",
        "vllm/step, no rows",
    ]
    row_bytes = 2 * HIDDEN * torch.finfo(dtype).bits // 8
    print(
        f"hidden {HIDDEN}, {args.dtype}: {row_bytes / 1024:.0f} KiB per token; "
        f"{os.cpu_count()} CPUs; best of {repeats}; "
        "microseconds per token: end-to-end / producer-side"
    )
    header = f"{'route':<20}" + "".join(f"{label:>20}" for label, *_ in shapes)
    print(header)
    print("-" * len(header))
    for route in routes:
        cells = []
        for i, (_label, batch, tokens, n) in enumerate(shapes):
            if route == "naive/token/tensor":
                n = max(
                    1, min(n, 1000 // (batch * tokens))
                )  # ~1.5 ms a token: sample fewer
            rids = [f"req-{r}" for r in range(batch)]
            data = [
                (
                    _rows(batch * tokens, dtype, seed=s + 1000 * i),
                    rids,
                    [tokens] * batch,
                )
                for s in range(n)
            ]
            best = min(
                (run(route, data, dtype) for _ in range(repeats)), key=lambda x: x[0]
            )
            n_tok = n * batch * tokens
            cells.append(f"{best[0] / n_tok * 1e6:8.1f} / {best[1] / n_tok * 1e6:6.1f}")
        print(f"{route:<20}" + "".join(f"{c:>20}" for c in cells), flush=True)


if __name__ == "__main__":
    main()
