"""Laptops behind NAT serve: two home networks behind real nftables NAT routers (masquerade, unsolicited inbound
dropped) each run a node holding part of the model, reachable only through libp2p circuit relays (p2pd); a public
coordinator serves the model through both, token-exact, and keeps serving when the relay carrying a home dies.

Needs root, network namespaces and nft (Debian's nftables, installed when missing); skipped with the reason
elsewhere. Three node processes, one HTTP DHT, four p2pd relays.
"""

from __future__ import annotations

import pytest
import torch

from openhydra.sim.nat import nat_available

OK, WHY = nat_available()


def _reference(model_dir):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()

    def answer(prompt: str, n: int) -> str:
        text = tokenizer.apply_chat_template([{"role": "user", "content": prompt}], add_generation_prompt=True,
                                             tokenize=False)
        ids = torch.tensor([tokenizer(text, add_special_tokens=False)["input_ids"]])
        with torch.inference_mode():
            out = model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=n, min_new_tokens=n,
                                 do_sample=False, pad_token_id=tokenizer.eos_token_id)
        return tokenizer.decode(out[0, ids.shape[1]:], skip_special_tokens=True)

    return answer


@pytest.mark.skipif(not OK, reason=f"needs root, network namespaces and nft: {WHY}")
@pytest.mark.slow
@pytest.mark.timeout(420)
def test_two_homes_behind_nat_serve_exactly_through_relays_and_survive_a_relay_death(tiny_model_dirs):
    from openhydra.sim.nat_swarm import run_nat_scenario

    model_dir = tiny_model_dirs["llama"]
    r = run_nat_scenario(model_dir, 8, _reference(model_dir), prefix="ohnat", tokens=12, ready_timeout_s=240.0)
    print(r)
    # both homes announced only libp2p hop addresses, and said how they are reachable
    assert r["peers"]["homea"]["address"].endswith(".p2p:1") and r["peers"]["homeb"]["address"].endswith(".p2p:1")
    assert r["reachability"]["homea"]["reachable"] == "relayed" and r["reachability"]["homeb"]["reachable"] == "relayed"
    assert r["reachability"]["coord"]["reachable"] == "direct"
    assert r["dashboard_homea"].startswith("relayed (libp2p: dial-back through")  # the dashboard says it too
    # the swarm serves the model exactly (greedy = the single-process answer), streamed or not
    assert r["exact"] and r["exact_streamed"]
    # per hop: the coordinator runs its own span over gRPC and reaches both homes through a relay circuit;
    # homea pushes to homeb (NAT to NAT) through a relay too
    assert [h["path"] for h in r["hop_paths"]] == ["grpc", "relayed", "relayed"], r["hop_paths"]
    assert r["homea_paths"][r["reachability"]["homeb"]["libp2p_peer_id"]] == "relayed"
    # a relay carrying homea dies mid-stream: the stream completes with the same text through another relay
    assert r["killed_relay"] and r["same_text_after_relay_death"] and r["tokens_after_relay_death"] == 12
