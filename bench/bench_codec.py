"""LZ4 on real activations: SmolLM2-135M split in 3, hidden states at the two cuts, fp32 and bf16.

    OMP_NUM_THREADS=1 python bench/bench_codec.py [--model-dir DIR] [--prompt-tokens 128] [--decode-steps 32]

For each dtype, tensor kind (prefill [S, D] and decode [1, D]) and cut, prints the raw bytes, the
LZ4 ratio (raw / compressed, >1 is a gain), and median compress/decompress time in microseconds.
The payload is exactly what a peer puts on the wire (``encode_tensor``'s raw bytes).
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch

from openhydra.peer.codec import compress, decompress
from openhydra.peer.proto import peer_pb2 as pb
from openhydra.runtime.shard import ShardRuntime
from openhydra.testing import TEST_CACHE_ROOT

SPLITS = [(0, 10), (10, 20), (20, 30)]


def _raw(t: torch.Tensor) -> bytes:
    return t.contiguous().reshape(-1).view(torch.uint8).numpy().tobytes()


def _time_us(fn, repeats: int = 20) -> float:
    samples = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        samples.append((time.perf_counter() - t0) * 1e6)
    return statistics.median(samples)


def collect(model_dir: str, dtype: torch.dtype, prompt_tokens: int, decode_steps: int) -> dict:
    """Hidden states leaving spans 0 and 1 for one prefill and ``decode_steps`` greedy decode steps."""
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(model_dir)
    text = "The history of peer-to-peer networks begins with file sharing. " * 40
    ids = torch.tensor(tok(text)["input_ids"][:prompt_tokens])
    spans = [ShardRuntime(model_dir, a, b, dtype=dtype) for a, b in SPLITS]
    out: dict = {("prefill", 1): [], ("prefill", 2): [], ("decode", 1): [], ("decode", 2): []}
    feed, pos, kind = ids, 0, "prefill"
    for _ in range(decode_steps + 1):
        positions = torch.arange(pos, pos + feed.numel())
        h = spans[0].forward("bench", positions, input_ids=feed)
        out[(kind, 1)].append(h)
        h = spans[1].forward("bench", positions, hidden_states=h)
        out[(kind, 2)].append(h)
        logits = spans[2].forward("bench", positions, hidden_states=h)
        pos += feed.numel()
        feed, kind = logits[-1].argmax().view(1), "decode"
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model-dir", default=None)
    parser.add_argument("--prompt-tokens", type=int, default=128)
    parser.add_argument("--decode-steps", type=int, default=32)
    args = parser.parse_args()
    from openhydra.testing.machine import announce

    announce()
    torch.set_num_threads(1)
    model_dir = args.model_dir
    if model_dir is None:
        from openhydra.runtime.source import embedded_model_dir

        cache = TEST_CACHE_ROOT
        model_dir = str(embedded_model_dir(cache))
    print(f"model {model_dir}; cuts after layers 10 and 20; lz4 block format")
    print(f"{'dtype':>9} {'kind':>8} {'cut':>4} {'raw B':>8} {'ratio':>6} {'comp us':>8} {'decomp us':>9}")
    for dtype in (torch.float32, torch.bfloat16):
        acts = collect(model_dir, dtype, args.prompt_tokens, args.decode_steps)
        for (kind, cut), tensors in acts.items():
            raws = [_raw(t) for t in tensors]
            total_raw = sum(len(r) for r in raws)
            total_comp = sum(len(compress(r, pb.CODEC_LZ4)) for r in raws)
            sample = raws[-1]
            packed = compress(sample, pb.CODEC_LZ4)
            comp_us = _time_us(lambda s=sample: compress(s, pb.CODEC_LZ4))
            decomp_us = _time_us(lambda p=packed, n=len(sample): decompress(p, pb.CODEC_LZ4, n))
            name = str(dtype).removeprefix("torch.")
            print(
                f"{name:>9} {kind:>8} {cut:>4} {len(sample):>8} {total_raw / total_comp:6.3f} "
                f"{comp_us:8.1f} {decomp_us:9.1f}"
            )


if __name__ == "__main__":
    main()
