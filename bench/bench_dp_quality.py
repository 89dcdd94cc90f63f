"""Quality cost of differential-privacy noise (openhydra/crypto/dp.py) on real SmolLM2-135M weights.

For each configured noise level, noise is injected at a pipeline boundary with a forward hook:
``embed`` (the embeddings the coordinator sends the first peer) and ``L10`` (the output of decoder
layer 9, i.e. the input of layer 10: the first boundary of a 3-way split of the 30 layers). Reported:

- teacher-forced top-1 agreement with the noiseless model over a fixed text (``EVAL_TEXT`` below);
- perplexity of that text;
- free-running greedy agreement: share of positions where N greedily generated tokens equal the
  noiseless generation, over a few prompts;
- ε of one release of one token vector (δ = 1e-5), to show what the noise buys formally;
- at the ``embed`` boundary, how many prompt tokens a malicious first peer recovers from what it
  receives by nearest-neighbour search in the (clipped) embedding table: what the noise buys in
  practice.

Every noised tensor also goes through the coordinator's audit checks (record + received digest).

    python bench/bench_dp_quality.py [--threads 1] [--new-tokens 24] [--png docs/img/dp_quality.png]
"""

from __future__ import annotations

import argparse
import math
import time
from pathlib import Path

import torch
from omegaconf import OmegaConf

from openhydra.crypto.config import PrivacyConfig
from openhydra.crypto.dp import DPAuditor, DPParams, apply_dp, clip_rows, epsilon
from openhydra.runtime.source import embedded_model_dir

REPO = Path(__file__).resolve().parent.parent

# Written for this benchmark (no third-party text): plain expository English, ~300 tokens.
EVAL_TEXT = (
    "A peer-to-peer inference network splits a language model across ordinary computers. "
    "Each machine keeps a contiguous range of layers in memory and receives the hidden state "
    "of every token from the machine before it. It runs its layers, then passes the result on "
    "to the next machine, until the last one turns the final hidden state into a probability "
    "for every word in the vocabulary. The coordinator that accepted the request picks the most "
    "likely word, appends it to the text, and the next step begins. Because no single computer "
    "holds the whole model, a network of laptops can serve a model that none of them could load "
    "alone. The price is latency: every step crosses the network once for each machine in the "
    "chain, so the chain should be short and its links fast. Privacy is the other concern. The "
    "first machine in the chain sees the embeddings of the prompt, and embeddings can often be "
    "mapped back to the words they came from. Encryption protects the links between machines, "
    "but it does not hide the data from the machines themselves. Adding random noise to what "
    "each machine sends makes that mapping harder, at the cost of some accuracy. How much noise "
    "a model tolerates is an empirical question, and the answer differs from layer to layer, "
    "because the size of the hidden state grows as it moves through the network. A careful "
    "operator measures it before turning the feature on, and writes down what was measured."
)
PROMPTS = [
    "The capital of France is",
    "To make a cup of tea, first",
    "Peer-to-peer networks are useful because",
    "def fibonacci(n):",
]
AUDIT_KEY = bytes(range(32))


class NoiseHook:
    """Adds DP noise to a module's output and audits each noised tensor as the coordinator would."""

    def __init__(self, params: DPParams | None) -> None:
        self.params = params
        self.step = 0
        self.auditor = DPAuditor(AUDIT_KEY, params, "bench", 1) if params else None
        self.first_output: torch.Tensor | None = None

    def __call__(self, module: torch.nn.Module, args: tuple, output: torch.Tensor | tuple) -> object:
        if self.params is None:
            return output
        hidden = output[0] if isinstance(output, tuple) else output
        noised, record = apply_dp(hidden, self.params, AUDIT_KEY, "bench", 1, self.step)
        assert self.auditor is not None
        self.auditor.verify_record(record, self.step)
        self.auditor.verify_received(record, noised)
        self.step += 1
        if self.first_output is None:
            self.first_output = noised.detach()
        return (noised, *output[1:]) if isinstance(output, tuple) else noised


def boundary_module(model: torch.nn.Module, boundary: str) -> torch.nn.Module:
    if boundary == "embed":
        return model.model.embed_tokens
    return model.model.layers[int(boundary.removeprefix("L")) - 1]


@torch.no_grad()
def inversion_rate(model: torch.nn.Module, received: torch.Tensor, ids: torch.Tensor, clip: float) -> float:
    """Share of tokens recovered by nearest neighbour of the received vectors in the clipped table."""
    table = clip_rows(model.model.embed_tokens.weight, clip)  # [V, D]
    dist = torch.cdist(received[0].float(), table)  # [S, V]
    return (dist.argmin(-1) == ids[0]).float().mean().item()


@torch.no_grad()
def teacher_forced(model: torch.nn.Module, ids: torch.Tensor) -> tuple[torch.Tensor, float]:
    logits = model(ids).logits[0, :-1].float()  # [S-1, V]
    nll = torch.nn.functional.cross_entropy(logits, ids[0, 1:])
    return logits.argmax(-1), math.exp(nll.item())


@torch.no_grad()
def greedy(model: torch.nn.Module, ids: torch.Tensor, new_tokens: int) -> list[int]:
    out = model.generate(ids, max_new_tokens=new_tokens, do_sample=False, min_new_tokens=new_tokens)
    return out[0, ids.shape[1] :].tolist()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--new-tokens", type=int, default=24)
    ap.add_argument("--boundaries", default="embed,L10")
    ap.add_argument("--png", type=Path, default=REPO / "docs" / "img" / "dp_quality.png")
    args = ap.parse_args()
    from openhydra.testing.machine import announce

    announce()
    torch.set_num_threads(args.threads)

    conf = OmegaConf.load(REPO / "conf" / "privacy" / "onion_dp.yaml")
    base = OmegaConf.load(REPO / "conf" / "privacy" / "encrypted.yaml")
    merged = OmegaConf.merge(base, {k: v for k, v in conf.items() if k != "defaults"})
    merged.identity_path = "unused"
    cfg = PrivacyConfig.model_validate(OmegaConf.to_container(merged))
    sigmas = sorted({cfg.dp_sigma * f for f in (0.1, 0.3, 1.0, 3.0, 10.0, 30.0, 100.0)})
    clips = {"embed": cfg.dp_clip_embeddings}

    from transformers import AutoModelForCausalLM, AutoTokenizer

    folder = embedded_model_dir(Path.home() / ".cache" / "openhydra-test")
    tok = AutoTokenizer.from_pretrained(folder)
    model = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32).eval()
    model.generation_config.pad_token_id = tok.eos_token_id
    text_ids = tok(EVAL_TEXT, return_tensors="pt").input_ids
    prompt_ids = [tok(p, return_tensors="pt").input_ids for p in PROMPTS]
    print(
        f"SmolLM2-135M fp32, {args.threads} thread(s); text {text_ids.shape[1]} tokens; "
        f"{len(PROMPTS)} prompts x {args.new_tokens} greedy tokens; configured dp_sigma={cfg.dp_sigma}, "
        f"dp_clip={cfg.dp_clip}, dp_clip_embeddings={cfg.dp_clip_embeddings}"
    )

    base_top1, base_ppl = teacher_forced(model, text_ids)
    base_gen = [greedy(model, p, args.new_tokens) for p in prompt_ids]
    rows: list[tuple[str, float, float, float, float, float, float, float | None]] = []
    t0 = time.perf_counter()
    for boundary in args.boundaries.split(","):
        clip = clips.get(boundary, cfg.dp_clip)
        module = boundary_module(model, boundary)
        for sigma in [0.0, *sigmas]:
            hook = NoiseHook(DPParams(sigma, clip))  # sigma 0: clipping only
            handle = module.register_forward_hook(hook)
            try:
                top1, ppl = teacher_forced(model, text_ids)
                gens = [greedy(model, p, args.new_tokens) for p in prompt_ids]
            finally:
                handle.remove()
            tf_agree = (top1 == base_top1).float().mean().item()
            gen_agree = sum(
                sum(a == b for a, b in zip(g, b0, strict=True)) for g, b0 in zip(gens, base_gen, strict=True)
            ) / (len(PROMPTS) * args.new_tokens)
            assert hook.first_output is not None
            inverted = inversion_rate(model, hook.first_output, text_ids, clip) if boundary == "embed" else None
            rows.append((boundary, clip, sigma, epsilon(sigma), tf_agree, gen_agree, ppl, inverted))
    elapsed = time.perf_counter() - t0

    print(f"\nnoiseless perplexity {base_ppl:.2f}\n")
    print(
        "| boundary | clip | sigma | noise std | eps (1 vector, d=1e-5) | teacher-forced top-1 agree | "
        "greedy agree | perplexity | prompt tokens a first peer recovers |"
    )
    print("| --- | --- | --- | --- | --- | --- | --- | --- | --- |")
    for boundary, clip, sigma, eps, tf, gen, ppl, inv in rows:
        mark = " (configured)" if math.isclose(sigma, cfg.dp_sigma) else (" (clip only)" if sigma == 0 else "")
        eps_s = "inf" if math.isinf(eps) else f"{eps:,.0f}"
        print(
            f"| {boundary} | {clip:g} | {sigma:g}{mark} | {sigma * clip:.3g} | {eps_s} | {tf:.1%} | {gen:.1%} | "
            f"{ppl:.2f} | {'-' if inv is None else f'{inv:.1%}'} |"
        )
    print(f"\n({elapsed:.0f} s)")

    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(10, 4))
    for color, boundary in zip(("tab:blue", "tab:orange"), args.boundaries.split(","), strict=False):
        pts = [r for r in rows if r[0] == boundary and r[2] > 0]
        xs = [r[2] for r in pts]
        ax1.plot(xs, [r[4] * 100 for r in pts], "o-", color=color, label=f"{boundary} teacher-forced top-1")
        ax1.plot(xs, [r[5] * 100 for r in pts], "s--", color=color, label=f"{boundary} greedy tokens")
        if boundary == "embed":
            ax1.plot(xs, [(r[7] or 0) * 100 for r in pts], "x:", color="tab:red", label="embed: tokens inverted")
        ax2.plot(xs, [r[6] for r in pts], "o-", color=color, label=boundary)
    for ax in (ax1, ax2):
        ax.set_xscale("log")
        ax.set_xlabel("dp_sigma (noise multiplier)")
        ax.axvline(cfg.dp_sigma, color="grey", lw=0.8, ls=":")
        ax.legend(fontsize=8)
    ax1.set_ylabel("agreement with noiseless run (%)")
    ax2.set_ylabel("perplexity")
    ax2.axhline(base_ppl, color="black", lw=0.8, label="noiseless")
    ax2.set_yscale("log")
    fig.suptitle("SmolLM2-135M: DP noise at a pipeline boundary (dotted: configured level)")
    fig.tight_layout()
    args.png.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(args.png, dpi=110)
    print(f"wrote {args.png}")


if __name__ == "__main__":
    main()
