"""Why cached / batched greedy output used to differ from a cold run, measured (issue #15).

On real SmolLM2-135M weights, for a prompt B = system prompt + "What is a sextant?" after a prompt
A = system prompt + "What is a lighthouse for?":
- one-shot: B prefilled in one piece (what a node without the prefix cache computes);
- old warm: the system prompt's K/V taken from A's one-shot prefill, then B's tail (the old prefix-cache path);
- blocks cold / blocks warm: B in 32-token pieces from 0, and B seeded with A's pieces (the exact mode).
Prints the max |logit| difference of B's last position against one-shot and between warm and cold,
and the first generated token where greedy decoding departs. Then the matmul fact behind batching:
F.linear on M=1 vs M=8 rows, per row. CPU figures; print the load average for context.

    python bench/bench_exactness.py [--dtype bf16|fp32] [--tokens 24] [--repeat 8] [--threads 1]
"""

from __future__ import annotations

import argparse
import os

import torch
import torch.nn.functional as F

from openhydra.runtime.prefix_cache import PrefixCache, PrefixKey, block_hashes
from openhydra.runtime.shard import ShardRuntime
from openhydra.runtime.source import embedded_model_dir
from openhydra.testing import TEST_CACHE_ROOT
from openhydra.testing.machine import announce

SYSTEM = ("You are a knowledgeable and patient assistant for a maritime museum. Visitors ask about the objects on "
          "display: navigation instruments, lights, charts and ship fittings. Answer in two or three clear "
          "sentences, say what the object does and how sailors used it, and never invent names or dates.")


def _ids(tokenizer, question: str, repeat: int) -> list[int]:
    system = " ".join([SYSTEM] * repeat)
    messages = [{"role": "system", "content": system}, {"role": "user", "content": question}]
    text = tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
    return tokenizer(text, add_special_tokens=False)["input_ids"]


def _greedy(rt: ShardRuntime, sid: str, logits: torch.Tensor, pos: int, n: int) -> list[int]:
    out = []
    for _ in range(n):
        out.append(int(logits[-1].argmax()))
        logits = rt.forward(sid, torch.tensor([pos]), input_ids=torch.tensor(out[-1:]))
        pos += 1
    rt.close_session(sid)
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--dtype", choices=["bf16", "fp32"], default="bf16")
    parser.add_argument("--tokens", type=int, default=24)
    parser.add_argument("--repeat", type=int, default=8, help="system prompt = the museum text this many times")
    parser.add_argument("--threads", type=int, default=1)
    args = parser.parse_args()
    announce()  # the machine, its load and the versions, printed with the result
    torch.set_num_threads(args.threads)
    print(f"load average {os.getloadavg()}, dtype {args.dtype}, threads {args.threads}")
    from transformers import AutoTokenizer

    model_dir = embedded_model_dir(TEST_CACHE_ROOT)
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    a, b = (_ids(tokenizer, q, args.repeat) for q in ("What is a lighthouse for?", "What is a sextant?"))
    shared = next(i for i, (x, y) in enumerate(zip(a, b, strict=False)) if x != y) // 32 * 32
    dtype = torch.bfloat16 if args.dtype == "bf16" else torch.float32
    rt = ShardRuntime(model_dir, dtype=dtype)
    n, ids_b = len(b), torch.tensor(b)
    one_shot = rt.forward("one", torch.arange(n), input_ids=ids_b)
    one_tokens = _greedy(rt, "one", one_shot, n, args.tokens)
    # the old prefix path: A's one-shot K/V for the shared positions, then B's tail in one piece
    rt.forward("a", torch.arange(len(a)), input_ids=torch.tensor(a))
    src = rt._sessions.acquire("a").cache
    dst = rt._sessions.acquire("old").cache
    for i, layer in enumerate(src.layers):
        dst.layers[i].update(layer.keys[:, :, :shared].clone(), layer.values[:, :, :shared].clone())
    rt._sessions.acquire("old").length = shared
    rt.close_session("a")
    old = rt.forward("old", torch.arange(shared, n), input_ids=ids_b[shared:])
    old_tokens = _greedy(rt, "old", old, n, args.tokens)
    # the exact mode: block pieces, cold and seeded from A
    rt.prefix_cache = PrefixCache(rt.layer_types, 1 << 30, 32)
    secret = b"s" * 32
    key_a, key_b = (PrefixKey(tuple(block_hashes(x, 32, secret)), 32) for x in (a, b))
    blocks_cold = rt.forward("bc", torch.arange(n), input_ids=ids_b, prefix=key_b)
    cold_tokens = _greedy(rt, "bc", blocks_cold, n, args.tokens)
    rt.prefix_cache.clear()
    rt.forward("a2", torch.arange(len(a)), input_ids=torch.tensor(a), prefix=key_a)
    rt.close_session("a2")
    warm = rt.forward("bw", torch.arange(shared, n), input_ids=ids_b[shared:], prefix=key_b)
    warm_tokens = _greedy(rt, "bw", warm, n, args.tokens)

    def diff(x: torch.Tensor, y: torch.Tensor) -> str:
        return f"{(x - y).abs().max().item():.3g}"

    def departs(x: list[int], y: list[int]) -> str:
        return next((str(i) for i, (p, q) in enumerate(zip(x, y, strict=True)) if p != q), "never")

    print(f"prompt B {n} tokens, shared prefix reused {shared} positions")
    print(f"{'path':<26}{'max|dlogit| vs one-shot':>26}{'greedy departs at':>20}")
    print(f"{'old warm (one-shot K/V)':<26}{diff(old, one_shot):>26}{departs(old_tokens, one_tokens):>20}")
    print(f"{'blocks cold':<26}{diff(blocks_cold, one_shot):>26}{departs(cold_tokens, one_tokens):>20}")
    print(f"{'blocks warm':<26}{diff(warm, one_shot):>26}{departs(warm_tokens, one_tokens):>20}")
    print(f"old warm vs one-shot: {diff(old, one_shot)}; blocks warm vs blocks cold: {diff(warm, blocks_cold)} "
          f"(tokens equal: {warm_tokens == cold_tokens})")
    print("decoded one-shot :", repr(tokenizer.decode(one_tokens)))
    print("decoded old warm :", repr(tokenizer.decode(old_tokens)))
    print("decoded blocks   :", repr(tokenizer.decode(warm_tokens)))
    # batching: the same row through a 1-row and an 8-row matmul of the first MLP projection
    w = rt.modules.layers[0].mlp.gate_proj.weight
    x = torch.randn(8, w.shape[1], generator=torch.Generator().manual_seed(0)).to(dtype)
    rows8 = F.linear(x, w)
    rows1 = torch.cat([F.linear(x[r : r + 1], w) for r in range(8)])
    moved = x.clone()
    moved[[0, 5]] = moved[[5, 0]]
    print(f"F.linear {tuple(w.shape)}: M=8 vs M=1 per row max diff {diff(rows8.float(), rows1.float())}; "
          f"M=8 row moved to another slot, other rows changed: equal={torch.equal(F.linear(moved, w)[5], rows8[0])}")


if __name__ == "__main__":
    main()
