"""Per-token cost of constrained decoding (router/constrained.py) next to SmolLM2's own decode step.

Greedy decoding with the real SmolLM2-135M (transformers, 1 thread, KV cache), one JSON-schema request:
each step times the model forward and, separately, the mask + masked sample. Rounds alternate a fresh
grammar (cold mask cache) and a reused one (warm), medians of each. Prints the load average first.

    .venv/bin/python bench/bench_constrained.py [--tokens 64] [--rounds 5]
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import time

import torch

from openhydra.testing.machine import announce


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--tokens", type=int, default=64)
    parser.add_argument("--rounds", type=int, default=5)
    args = parser.parse_args()
    announce()  # the machine, its load and the versions, printed with the result
    torch.set_num_threads(1)
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from openhydra.router import constrained as C
    from openhydra.runtime.source import embedded_model_dir
    from openhydra.testing import TEST_CACHE_ROOT

    path = embedded_model_dir(TEST_CACHE_ROOT)
    tok = AutoTokenizer.from_pretrained(path)
    model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()
    schema = {"type": "object", "properties": {
        "city": {"type": "string"}, "country": {"type": "string"}, "population": {"type": "integer"},
        "coastal": {"type": "boolean"}, "languages": {"type": "array", "items": {"type": "string"}}},
        "required": ["city", "country", "population", "coastal"], "additionalProperties": False}
    messages = [{"role": "user", "content": "Describe Lisbon as JSON."}]
    ids = tok(tok.apply_chat_template(messages, add_generation_prompt=True, tokenize=False),
              add_special_tokens=False, return_tensors="pt")["input_ids"]
    t0 = time.perf_counter()
    C.TokenTable.of(tok)
    table_s = time.perf_counter() - t0
    print(f"load average: {os.getloadavg()}")
    print(f"token table (once per tokenizer, {len(tok)} tokens): {table_s:.2f} s")
    node = C.compile_schema(schema)
    results: dict[str, list[tuple[float, float]]] = {"cold": [], "warm": []}
    warm_grammar = C.Grammar(C.initial_state(node), C.TokenTable.of(tok))
    for r in range(args.rounds):
        for kind in ("cold", "warm"):
            grammar = C.Grammar(C.initial_state(node), C.TokenTable.of(tok)) if kind == "cold" else warm_grammar
            con = C.Constraint(grammar, {tok.eos_token_id})
            forward, mask_t, text = [], [], []
            with torch.inference_mode():
                out = model(ids, use_cache=True)
                cache = out.past_key_values
                logits = out.logits[0, -1]
                for _ in range(args.tokens):
                    a = time.perf_counter()
                    mask = con.mask(logits.numel())
                    token = int(torch.argmax(logits.masked_fill(~mask, float("-inf"))))
                    con.advance(token)
                    mask_t.append(time.perf_counter() - a)
                    if token == tok.eos_token_id:
                        break
                    text.append(token)
                    a = time.perf_counter()
                    out = model(torch.tensor([[token]]), past_key_values=cache, use_cache=True)
                    forward.append(time.perf_counter() - a)
                    cache, logits = out.past_key_values, out.logits[0, -1]
            results[kind].append((statistics.median(forward), statistics.median(mask_t)))
            if r == 0 and kind == "cold":
                print("output:", tok.decode(text))
                if con.complete:
                    json.loads(tok.decode(text))
    for kind, rows in results.items():
        fwd = statistics.median(f for f, _ in rows) * 1000
        msk = statistics.median(m for _, m in rows) * 1000
        print(f"{kind:4s}: model forward {fwd:.2f} ms/token, mask+sample {msk:.2f} ms/token, "
              f"overhead ratio {msk / fwd:.3f}")


if __name__ == "__main__":
    main()
