"""A speculative verify gives plain decoding's bits (runtime/shard.py ``is_verify``).

One forward over the k+1 draft positions rounds differently from k+1 one-position decode steps (a matmul's
rounding depends on its row count): on real SmolLM2 weights in bf16 the logits differed by up to 0.44 and
greedy text through the node's API changed (bench/bench_speculative_api.py, the "open" prompts). Each verify
position now runs as the decode step plain decoding runs there: the same logits bit for bit, in bf16 and fp32,
with and without the prefix cache and the decode batcher, and greedy text equal to plain greedy.
"""

from __future__ import annotations

import asyncio
import functools

import pytest
import torch
from transformers import AutoTokenizer

from openhydra.router.engine import Engine, GenerationRequest
from openhydra.router.pipeline import LocalPipeline
from openhydra.router.speculative import SpeculativeConfig, Speculator, build_drafter
from openhydra.runtime.batching import DecodeBatcher
from openhydra.runtime.prefix_cache import PrefixCache
from openhydra.runtime.shard import ShardRuntime

DTYPES = {"bf16": torch.bfloat16, "fp32": torch.float32}
BLOCK = 32


def _runtime(model_dir, dtype: torch.dtype, serving: str) -> ShardRuntime:
    rt = ShardRuntime(model_dir, dtype=dtype)
    if serving in ("prefix", "batched"):
        rt.prefix_cache = PrefixCache(rt.layer_types, 64 << 20, BLOCK)
    if serving == "batched":
        rt.batcher = DecodeBatcher(rt, max_batch=8, window_ms=2.0)
    return rt


def _verify_vs_steps(rt: ShardRuntime, prompt_len: int = 40, k: int = 5,
                     one_pass: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
    """Logits of one verify over k positions then of the next decode step, and the same for the k positions
    decoded one by one (another session with the same history): [k + 1, V] each."""
    g = torch.Generator().manual_seed(prompt_len)
    prompt = torch.randint(0, rt.vocab_size, (prompt_len,), generator=g)
    drafts = torch.randint(0, rt.vocab_size, (k,), generator=g)
    for session in ("verify", "steps"):
        rt.forward(session, torch.arange(prompt_len), input_ids=prompt)
    verify = rt.forward("verify", torch.arange(prompt_len, prompt_len + k), input_ids=drafts, all_logits=True,
                        one_pass_verify=one_pass)
    steps = torch.cat([rt.forward("steps", torch.tensor([prompt_len + i]), input_ids=drafts[i : i + 1])
                       for i in range(k)])
    # the step after: equal only if the caches the verify left are plain decoding's too
    nxt = torch.tensor([prompt_len + k])
    verify = torch.cat([verify, rt.forward("verify", nxt, input_ids=drafts[:1])])
    steps = torch.cat([steps, rt.forward("steps", nxt, input_ids=drafts[:1])])
    for session in ("verify", "steps"):
        rt.close_session(session)
    return verify, steps


@pytest.mark.parametrize("dtype", list(DTYPES))
@pytest.mark.parametrize("serving", ["plain", "prefix"])
@pytest.mark.parametrize("arch", ["llama", "qwen3"])
def test_verify_logits_are_the_one_position_steps_bits(tiny_model_dirs, arch, serving, dtype):
    verify, steps = _verify_vs_steps(_runtime(tiny_model_dirs[arch], DTYPES[dtype], serving))
    assert verify.shape == steps.shape and torch.equal(verify, steps)


@pytest.mark.parametrize("serving", ["plain", "prefix"])
@pytest.mark.parametrize("arch", ["llama", "qwen3", "qwen3_5"])
def test_the_verify_runs_layer_by_layer_where_it_can(tiny_model_dirs, arch, serving):
    """Plain Llama layers verify layer by layer (runtime/shard.py ``_verify_layer_major``: each layer's weights read
    once per verify while hot, not once per position), with the one-position steps' bits (checked here and in the
    test above); other layers keep the position-by-position loop."""
    rt = _runtime(tiny_model_dirs[arch], torch.bfloat16, serving)
    taken = []
    original = rt._verify_layer_major

    def spy(*args, **kwargs):
        out = original(*args, **kwargs)
        taken.append(out is not None)
        return out

    rt._verify_layer_major = spy
    verify, steps = _verify_vs_steps(rt)
    assert torch.equal(verify, steps)
    assert taken == [arch == "llama"]  # lean Llama layers only (qwen3: q/k norms; qwen3_5: recurrent layers)


def _batched_verify_vs_steps(rt: ShardRuntime, k: int, prompt_len: int = 40) -> tuple[torch.Tensor, torch.Tensor]:
    """With the decode batcher: one verify of k positions (rows of one batched forward, or several when k >
    max_batch) next to another session's decode step, and the same positions as batched decode steps."""
    g = torch.Generator().manual_seed(prompt_len + k)
    prompt = torch.randint(0, rt.vocab_size, (prompt_len,), generator=g)
    drafts = torch.randint(0, rt.vocab_size, (k + 1,), generator=g)
    for session in ("verify", "steps", "other"):
        rt.forward(session, torch.arange(prompt_len), input_ids=prompt)
    batcher = rt.batcher
    other = batcher.submit("other", prompt_len, input_ids=drafts[:1])  # shares the verify's forward if it fits
    verify = batcher.submit_verify("verify", prompt_len, input_ids=drafts[:k]).result()
    other.result()
    steps = torch.cat([batcher.forward("steps", prompt_len + i, input_ids=drafts[i : i + 1]) for i in range(k)])
    nxt = prompt_len + k  # the step after: equal only if the verify left plain decoding's caches
    verify = torch.cat([verify, batcher.forward("verify", nxt, input_ids=drafts[k:])])
    steps = torch.cat([steps, batcher.forward("steps", nxt, input_ids=drafts[k:])])
    for session in ("verify", "steps", "other"):
        rt.close_session(session)
    return verify, steps


@pytest.mark.parametrize("dtype", list(DTYPES))
@pytest.mark.parametrize("arch", ["llama", "qwen3", "qwen3_5", pytest.param("smollm2", marks=pytest.mark.slow)])
def test_batched_verify_rows_are_the_batched_decode_steps_bits(tiny_model_dirs, smollm2_dir, arch, dtype):
    """serving=batched: a verify's positions are rows of one batched forward (cheap: one read of the weights),
    each with the bits of the batched decode step plain decoding runs there, whoever shares the forward; k above
    max_batch takes several forwards; recurrent layers (Qwen3.5) take one row per forward. Real SmolLM2 weights
    too (slow)."""
    if arch == "smollm2":
        torch.set_num_threads(1)
    rt = _runtime(smollm2_dir if arch == "smollm2" else tiny_model_dirs[arch], DTYPES[dtype], "batched")
    try:
        for k in (1, 4, 7, 11) if arch != "smollm2" else (4,):
            verify, steps = _batched_verify_vs_steps(rt, k)
            assert verify.shape == steps.shape == (k + 1, rt.vocab_size) and torch.equal(verify, steps), k
        assert rt.batcher.stats.batches > 0
    finally:
        rt.batcher.close()


@pytest.mark.slow
@pytest.mark.parametrize("dtype", list(DTYPES))
def test_smollm2_verify_logits_are_the_one_position_steps_bits(smollm2_dir, dtype):
    torch.set_num_threads(1)
    rt = _runtime(smollm2_dir, DTYPES[dtype], "prefix")
    verify, steps = _verify_vs_steps(rt)
    assert torch.equal(verify, steps)
    # what one forward over the k positions gives instead (speculative.exact=false, and the old verify)
    one_forward, steps = _verify_vs_steps(rt, one_pass=True)
    assert not torch.equal(one_forward, steps)


@functools.cache
def _tokenizer(model_dir):
    return AutoTokenizer.from_pretrained(model_dir)


PROMPTS = [
    "Write a short story about a robot who learns to paint.",
    "What are some good habits for staying healthy? Explain each one.",
    "Repeat this text exactly, replacing Tuesday with Friday:\n\nThe committee met on Tuesday to review the "
    "budget and agreed to increase funding for the library.",
]


@pytest.mark.slow
@pytest.mark.parametrize("serving", ["prefix", "batched"])
@pytest.mark.parametrize("dtype", list(DTYPES))
def test_smollm2_speculative_greedy_text_equals_plain_greedy(smollm2_dir, dtype, serving):
    """Real weights, the node's serving setups: prompt-lookup speculation changes no greedy token (32 tokens per
    prompt, open-ended prompts where drafts are often rejected, and a grounded one where they are accepted)."""
    torch.set_num_threads(1)
    rt = _runtime(smollm2_dir, DTYPES[dtype], serving)
    tokenizer = _tokenizer(smollm2_dir)
    config = SpeculativeConfig(mode="prompt_lookup", k=4, min_acceptance=0.0)  # never falls back: always verifies
    speculator = Speculator(config, build_drafter(config))
    engines = {name: Engine(tokenizer, LocalPipeline(rt, prefix_block=BLOCK), eos_token_ids=set(),
                            context_length=4096, speculator=spec)
               for name, spec in (("plain", None), ("speculative", speculator))}
    try:
        for prompt in PROMPTS:
            ids = engines["plain"].chat_prompt_ids([{"role": "user", "content": prompt}])
            got = {name: asyncio.run(engine.complete(GenerationRequest(prompt_ids=ids, max_tokens=32)))
                   for name, engine in engines.items()}
            assert got["speculative"].text == got["plain"].text, prompt
        assert speculator.stats.verify_steps > 10 and speculator.stats.drafted > speculator.stats.accepted > 0
    finally:
        for engine in engines.values():
            engine.shutdown()


@pytest.mark.slow
def test_peer_processes_verify_as_plain_decoding_unless_asked_for_one_pass(smollm2_dir):
    """Two real peer processes (SmolLM2 bf16, [0,15) and [15,30)): a verify step's logits are the one-position
    steps' bits; with ``one_pass_verify`` (speculative.exact=false) the flag reaches both hops and the logits are
    one forward's, which differ in bf16."""
    from openhydra.peer.client import ClientTunables, PeerChainClient
    from openhydra.peer.messages import HopSpec
    from openhydra.runtime.sampling import SamplingParams
    from openhydra.testing.processes import terminate_all
    from tests.peer.test_peer_processes import _spawn, _wait_ready

    splits = [(0, 15), (15, 30)]
    procs = [_spawn(smollm2_dir, a, b, "bfloat16") for a, b in splits]
    try:
        route = [HopSpec(address=_wait_ready(p, a, b), start=a, end=b) for p, (a, b) in zip(procs, splits, strict=True)]
        client = PeerChainClient(route, tunables=ClientTunables(step_timeout_s=60.0))
        try:
            g = torch.Generator().manual_seed(40)
            prompt = torch.randint(0, 49152, (40,), generator=g).tolist()
            drafts = torch.randint(0, 49152, (5,), generator=g).tolist()
            greedy = SamplingParams()
            logits = {}
            for name in ("steps", "exact", "one_pass"):
                client.step_result(name, prompt, 0, greedy, 0)
            logits["steps"] = torch.cat([client.step_result("steps", [t], 40 + i, greedy, 1 + i,
                                                            return_logits=True).logits for i, t in enumerate(drafts)])
            for name in ("exact", "one_pass"):
                logits[name] = client.step_result(name, drafts, 40, greedy, 1, return_logits=True, all_logits=True,
                                                  one_pass_verify=name == "one_pass").logits
        finally:
            client.shutdown()
        assert logits["exact"].shape == (5, 49152)
        assert torch.equal(logits["exact"], logits["steps"])
        assert not torch.equal(logits["one_pass"], logits["steps"])
    finally:
        terminate_all(procs)
