"""Speculative decoding across the pipeline (Leviathan et al. 2023, "Fast Inference from Transformers via
Speculative Decoding"; Chen et al. 2023, "Accelerating LLM Decoding with Speculative Sampling").

The coordinator drafts k tokens (openhydra/router/drafters.py) and the whole pipeline verifies them in
one step of k + 1 positions with logits for every position (``Pipeline.verify``), so the hop latency is
paid once per verify instead of once per token. Exact by default (``exact``): every hop computes each verified
position as plain decoding computes it there (one-position steps, or rows of one batched forward under
``serving=batched``), because one forward over k + 1 positions rounds differently (a matmul's rounding depends
on its row count) and in bf16 that changed greedy text; ``exact=false`` asks hops for the one forward.
Rejected positions are cropped on every hop (``Pipeline.truncate``) so the caches hold exactly the accepted
tokens and positions continue.

Acceptance rule, for output index s (row i of the verify logits, target distribution p after the
request's temperature/top-k/top-p, the same processing as :func:`openhydra.runtime.sampling.sample`):

* point-mass drafts (greedy requests, prompt lookup, a greedy draft model): draw x = ``sample(row, params, s)``,
  exactly the token plain decoding would draw at step s, and accept the draft d iff x == d; on the first
  mismatch x is the output. This *is* the standard rule for q = δ_d: P(accept) = p(d) = min(1, p(d)/q(d)), and
  a rejected x is distributed as p conditioned on x != d = norm(max(0, p - δ_d)). It also keeps seeded
  outputs identical to plain decoding (same generator per step), and greedy output identical, given logits
  with plain decoding's bits (``exact``).
* drafts sampled from a draft model's q: accept d with probability min(1, p(d)/q(d)) (uniform draw keyed by
  (seed, s, "accept")); on rejection draw from norm(max(0, p - q)) (keyed by (seed, s, "residual")).
* when every draft is accepted, the bonus token comes from the last row by ``sample`` at its step.

Fallback: k adapts per session (starts at 2, doubles after a fully accepted draft up to ``k``, drops to
accepted + 1 otherwise); when the acceptance rate over a window of verifies (judged from the second one on)
falls below ``min_acceptance``, the session decodes plainly for ``cooldown_tokens`` tokens, then tries again.
Pipelines that cannot crop caches (recurrent layers: Qwen3.5's Gated DeltaNet state) never speculate: the
node checks the model's layer types, and a swarm whose hops refuse ``Truncate`` (UNIMPLEMENTED) rebuilds the
session by replaying its accepted history, and stops speculating after three refusals (SwarmPipeline.truncate).
Speculation is also off under privacy=onion (a Truncate reaches every hop directly) and while verification
audits shadow sessions (their replayed feeds cannot follow a rollback).
"""

from __future__ import annotations

import collections
import logging
import threading
from dataclasses import dataclass, field

import torch

from openhydra.router.drafters import Draft, Drafter, draw_generator
from openhydra.router.speculative_config import SpeculativeConfig
from openhydra.runtime.sampling import SamplingParams, filtered_probs, sample

log = logging.getLogger(__name__)


# ---- the acceptance rule ------------------------------------------------------------------------------------


def target_probs(logits: torch.Tensor, params: SamplingParams) -> torch.Tensor:
    """The distribution ``sample(logits, params, ·)`` draws from, as float32 [V] (temperature > 0)."""
    probs = filtered_probs(logits, params)
    return probs / probs.sum() if params.top_p < 1.0 else probs


def accept_drafts(logits: torch.Tensor, draft: Draft, params: SamplingParams, step: int) -> tuple[int, int]:
    """Verify ``draft`` against target logits [k + 1, V]; returns (accepted count n, the token after them).

    Row i predicts output index ``step + i``; the result is always n accepted drafts plus one more token.
    """
    k = len(draft.tokens)
    if logits.shape[0] != k + 1:
        raise ValueError(f"verify logits have {logits.shape[0]} rows for {k} drafts (expected {k + 1})")
    point_mass = params.greedy or draft.q is None
    for i, d in enumerate(draft.tokens):
        if point_mass:
            x = sample(logits[i], params, step + i)  # the token plain decoding draws at this step
            if x != d:
                return i, x
            continue
        p = target_probs(logits[i], params)  # [V]
        q = draft.q[i]  # [V]
        u = float(torch.rand((), generator=draw_generator(params.seed, step + i, "accept")))
        if u * float(q[d]) < float(p[d]):  # u < p/q, i.e. accept with min(1, p(d)/q(d))
            continue
        residual = torch.clamp(p - q, min=0.0)
        if float(residual.sum()) <= 0.0:  # p == q numerically: any draw from p is exact
            residual = p
        x = int(torch.multinomial(residual / residual.sum(), 1,
                                  generator=draw_generator(params.seed, step + i, "residual")))
        return i, x
    return k, sample(logits[k], params, step + k)


# ---- per-session control and global stats -----------------------------------------------------------------


@dataclass
class SpeculativeStats:
    """Totals over every request of one coordinator (acceptance rate, verify steps, fallbacks)."""

    drafted: int = 0
    accepted: int = 0
    verify_steps: int = 0
    plain_steps: int = 0
    fallbacks: int = 0
    _lock: threading.Lock = field(default_factory=threading.Lock, repr=False)

    def add(self, drafted: int = 0, accepted: int = 0, verify: int = 0, plain: int = 0, fallbacks: int = 0) -> None:
        with self._lock:
            self.drafted += drafted
            self.accepted += accepted
            self.verify_steps += verify
            self.plain_steps += plain
            self.fallbacks += fallbacks

    @property
    def acceptance_rate(self) -> float:
        return self.accepted / self.drafted if self.drafted else 0.0


class KController:
    """Adaptive k and the low-acceptance fallback for one session."""

    def __init__(self, config: SpeculativeConfig) -> None:
        self.config = config
        self.k = min(2, config.k) if config.adaptive else config.k  # earn a longer draft by acceptance
        self.recent: collections.deque[tuple[int, int]] = collections.deque(maxlen=config.window)
        self.cooldown = 0

    def want(self, remaining: int) -> int:
        """Draft tokens to ask for now (0: decode this token plainly)."""
        if self.cooldown > 0:
            self.cooldown -= 1
            return 0
        return max(0, min(self.k, remaining - 1))  # the verify step also yields one token of its own

    def record(self, drafted: int, accepted: int) -> bool:
        """Returns True when this verify tipped the session into a plain-decoding cooldown."""
        cfg = self.config
        if cfg.adaptive:
            self.k = min(cfg.k, self.k * 2) if accepted == drafted else max(1, accepted + 1)
        self.recent.append((drafted, accepted))
        if len(self.recent) >= min(2, self.recent.maxlen):  # judge early: a failed verify costs a round trip
            total = sum(d for d, _ in self.recent)
            if total and sum(a for _, a in self.recent) / total < cfg.min_acceptance:
                self.recent.clear()
                self.cooldown = cfg.cooldown_tokens
                self.k = min(2, cfg.k) if cfg.adaptive else cfg.k
                return True
        return False


class Speculator:
    """A drafter and its config, shared by every request of an Engine; reports acceptance."""

    def __init__(self, config: SpeculativeConfig, drafter: Drafter) -> None:
        if config.mode == "off":
            raise ValueError("speculative.mode=off needs no Speculator")
        self.config = config
        self.drafter = drafter
        self.stats = SpeculativeStats()

    def network_status(self) -> dict:
        s = self.stats
        return {"mode": self.config.mode, "k": self.config.k, "drafted": s.drafted, "accepted": s.accepted,
                "acceptance_rate": round(s.acceptance_rate, 4), "verify_steps": s.verify_steps,
                "plain_steps": s.plain_steps, "fallbacks": s.fallbacks}

    def metrics_text(self) -> str:
        s = self.stats
        return (
            "# HELP openhydra_speculative_draft_tokens_total Draft tokens proposed, by outcome.\n"
            "# TYPE openhydra_speculative_draft_tokens_total counter\n"
            f'openhydra_speculative_draft_tokens_total{{outcome="accepted"}} {s.accepted}\n'
            f'openhydra_speculative_draft_tokens_total{{outcome="rejected"}} {s.drafted - s.accepted}\n'
            "# HELP openhydra_speculative_steps_total Decode steps, by kind (verify or plain).\n"
            "# TYPE openhydra_speculative_steps_total counter\n"
            f'openhydra_speculative_steps_total{{kind="verify"}} {s.verify_steps}\n'
            f'openhydra_speculative_steps_total{{kind="plain"}} {s.plain_steps}\n'
            "# HELP openhydra_speculative_fallbacks_total Sessions sent to plain decoding by low acceptance.\n"
            "# TYPE openhydra_speculative_fallbacks_total counter\n"
            f"openhydra_speculative_fallbacks_total {s.fallbacks}\n"
        )


def build_drafter(config: SpeculativeConfig, draft_runtime=None, target_vocab_size: int | None = None) -> Drafter:
    from openhydra.router.drafters import DraftModelDrafter, PromptLookupDrafter

    if config.mode == "prompt_lookup":
        return PromptLookupDrafter(config.min_ngram, config.max_ngram)
    if config.mode == "draft":
        if draft_runtime is None or target_vocab_size is None:
            raise ValueError("speculative.mode=draft needs a draft model: set model.draft=<catalog name or folder>")
        return DraftModelDrafter(draft_runtime, target_vocab_size)
    raise ValueError(f"no drafter for speculative.mode={config.mode}")


# ---- the per-request token source the Engine drives ------------------------------------------------------


class Decoder:
    """Produces one request's output tokens: the prefill step, then plain or verify steps.

    Invariant between calls: the pipeline's caches hold ``position`` tokens (prompt + accepted output
    except the last token, ``pending``, which the next step feeds first). Sampling step indices equal
    output indices, as in plain decoding.
    """

    def __init__(self, pipeline, session_id: str, prompt_ids: list[int], sampling: SamplingParams,
                 max_tokens: int, speculator: Speculator | None = None, stop_ids: frozenset[int] = frozenset()) -> None:
        self.pipeline = pipeline
        self.stop_ids = stop_ids  # tokens that end the output (EOS, unless the request ignores it)
        self.session_id = session_id
        self.sampling = sampling
        self.max_tokens = max_tokens
        self.history = list(prompt_ids)  # prompt + every produced token
        self.position = 0
        self.produced = 0
        self.drafted = 0
        self.accepted = 0
        self.speculator = speculator if speculator is not None and _can_truncate(pipeline) else None
        self.control = KController(speculator.config) if self.speculator is not None else None
        self.drafting = True  # False after a drafter failure: plain decoding for the rest of the request

    def next_tokens(self) -> list[int]:
        """Blocking (run it on a worker thread): the next one or more output tokens, in order."""
        remaining = self.max_tokens - self.produced
        if remaining <= 0:
            return []
        if self.produced == 0:
            token = self.pipeline.step(self.session_id, self.history, 0, self.sampling, 0)
            self.position = len(self.history)
            return self._produced([token])
        spec = self.speculator
        if spec is not None and self.drafting and _can_truncate(self.pipeline):
            k = self.control.want(remaining)
            draft = self._propose(k) if k else None
            if draft is not None and draft.tokens:
                return self._verify(draft)
        # plain decoding to the end: the pipeline may queue each next step as soon as this one's token is sampled
        chained = ({"more": remaining - 1, "stop_ids": self.stop_ids}
                   if spec is None and getattr(self.pipeline, "chains_steps", False) else {})  # runtime/step_chain.py
        token = self.pipeline.step(self.session_id, [self.history[-1]], self.position, self.sampling, self.produced,
                                   **chained)
        self.position += 1
        if spec is not None:
            spec.stats.add(plain=1)
        return self._produced([token])

    def _propose(self, k: int) -> Draft | None:
        try:
            return self.speculator.drafter.propose(self.session_id, self.history, k, self.sampling, self.produced)
        except Exception:  # a broken drafter must not fail the request: plain decoding for the rest of it
            log.exception("drafter %s failed; session %s decodes plainly", self.speculator.drafter.name,
                          self.session_id)
            self.drafting = False
            return None

    def _verify(self, draft: Draft) -> list[int]:
        spec = self.speculator
        feed = [self.history[-1], *draft.tokens]
        logits = self.pipeline.verify(self.session_id, feed, self.position, self.sampling, self.produced,
                                      one_pass=not spec.config.exact)  # [k+1, V]
        n, token = accept_drafts(logits, draft, self.sampling, self.produced)
        kept = self.position + 1 + n
        if kept < self.position + len(feed):  # crop the rejected drafts from every hop's cache
            self.pipeline.truncate(self.session_id, kept)
        self.position = kept
        k = len(draft.tokens)
        self.drafted += k
        self.accepted += n
        fell_back = self.control.record(k, n)
        spec.stats.add(drafted=k, accepted=n, verify=1, fallbacks=int(fell_back))
        return self._produced([*draft.tokens[:n], token])

    def _produced(self, tokens: list[int]) -> list[int]:
        self.history.extend(tokens)
        self.produced += len(tokens)
        return tokens

    def close(self) -> None:
        if self.speculator is not None:
            self.speculator.drafter.close(self.session_id)

    @property
    def acceptance_rate(self) -> float | None:
        return self.accepted / self.drafted if self.drafted else None


def _can_truncate(pipeline) -> bool:
    return bool(getattr(pipeline, "supports_truncate", False)) and hasattr(pipeline, "verify")


def model_is_recurrent(model_dir) -> bool:
    """Whether any layer of the model keeps a recurrent state (its caches cannot be cropped)."""
    from openhydra.runtime.shard import RECURRENT_LAYER_TYPES
    from openhydra.runtime.shard_layers import layer_types_of, load_text_config

    return any(t in RECURRENT_LAYER_TYPES for t in layer_types_of(load_text_config(model_dir)))


def speculator_for_node(config: dict, model, model_dir, pipeline, load_draft, *, onion: bool = False,
                        audited: bool = False) -> Speculator | None:
    """The node's Speculator, or None (mode off, or a pipeline where speculation cannot stay exact/private).

    ``model`` is the node's ModelConfig (``model.draft``); ``load_draft(path)`` loads a full draft runtime.
    """
    spec = SpeculativeConfig.model_validate(config or {})
    if spec.mode == "off":
        return None
    reason = None
    if model_is_recurrent(model_dir):
        reason = "the model has recurrent layers, whose caches cannot be cropped"
    elif onion:
        reason = "privacy.onion is on and truncation would contact every hop directly"
    elif audited:
        reason = "verification audits replay every step of a session"
    if reason is not None:
        log.warning("speculative decoding (%s) is off: %s; decoding one token per step", spec.mode, reason)
        pipeline.supports_truncate = False
        return None
    draft_runtime = None
    if spec.mode == "draft":
        draft_runtime = load_draft(_draft_path(model))
    drafter = build_drafter(spec, draft_runtime, _vocab_size(model_dir))
    log.info("speculative decoding: %s, k=%d%s", spec.mode, spec.k, " (adaptive)" if spec.adaptive else "")
    return Speculator(spec, drafter)


def _vocab_size(model_dir) -> int:
    from openhydra.runtime.shard_layers import load_text_config

    return int(load_text_config(model_dir).vocab_size)


def _draft_path(model):
    from pathlib import Path

    from openhydra.catalog import load_catalog
    from openhydra.config.schema import ModelConfig

    name = getattr(model, "draft", None)
    if not name:
        raise ValueError("speculative=draft needs model.draft=<catalog option or transformers folder>")
    catalog = load_catalog()
    if name in catalog:
        return catalog[name]
    folder = Path(name).expanduser()
    if not (folder / "config.json").exists():
        raise ValueError(f"model.draft={name} is neither a catalog option ({', '.join(catalog)}) nor a model folder")
    return ModelConfig(path=str(folder), tier="local")
