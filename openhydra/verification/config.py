"""The ``verification/`` config group's schema: rates of the three tiers, tolerances, reputation.

Every option file (off, default, paranoid) validates here. ``fault`` turns this node's own peer into
a dishonest one for tests and demos (see :mod:`openhydra.verification.faults`); it is off by default.
"""

from __future__ import annotations

from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, model_validator

DEFAULT_TARGET = "openhydra.verification.factory.build_verifier"


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", populate_by_name=True)


class FaultConfig(_Strict):
    """A dishonest peer, on purpose: what its runtime does wrong (none: honest)."""

    mode: Literal["none", "perturb", "wrong_token", "stale_cache", "informant", "curious"] = "none"
    magnitude: float = Field(0.05, ge=0.0, le=100.0, description="perturb: noise RMS relative to the output RMS")
    seed: int = Field(0, description="perturb: peers with the same seed add the same noise (collusion)")
    rate: float = Field(1.0, ge=0.0, le=1.0, description="fraction of steps the peer lies on")
    from_position: int = Field(0, ge=0, description="lie only on steps at or past this position (a late liar)")
    dodge_audits: bool = Field(False, description="answer honestly on any session it takes for an audit "
                                                  "(an 'audit' name, or inputs that repeat another session's)")
    tip_off: str | None = Field(None, max_length=4096,
                                description="colluders' shared folder: an 'informant' (honest answers) marks there "
                                            "each session it takes for an audit; a dodging liar also dodges "
                                            "the sessions marked there (the session id travels in the clear)")
    spy_dir: str | None = Field(None, max_length=4096,
                                description="curious (last span, honest answers): where it writes the tokens it reads "
                                            "off the final hidden states it returns under onion, one file per session")


class ToleranceConfig(_Strict):
    """Largest |difference| of a top-k log-probability between two honest executions, by dtype.

    Measured here (tests/verification/test_no_false_positives.py, docs/verification.md): fp32 chains
    on 1 vs 2 threads differ by <= 1.4e-5; with a bf16 peer involved by <= 0.02 on the tiny models and
    <= 0.35 on SmolLM2-135M (1.0 leaves ~3x margin).
    """

    float32: float = Field(1e-3, gt=0.0)
    bfloat16: float = Field(1.0, gt=0.0)
    float16: float = Field(1.0, gt=0.0)


class ReputationConfig(_Strict):
    floor: float = Field(0.6, ge=0.0, le=1.0, description="below this score a peer is not routed to")
    verification_half_life_s: float = Field(3600.0, gt=0.0, description="decay of audit outcomes")
    uptime_half_life_s: float = Field(900.0, gt=0.0, description="decay of hop successes/failures")
    latency_half_life_s: float = Field(300.0, gt=0.0, description="decay of latency samples")
    failure_weight: float = Field(5.0, gt=0.0, description="one failed audit outweighs this many passes")
    prior_passes: float = Field(2.0, gt=0.0, description="a new peer starts as if it had passed this many")
    stake_ref_hydra: float = Field(100.0, gt=0.0, description="stake giving a stake factor of 0.5")
    db_name: str = Field("reputation.db", min_length=1, description="SQLite file in the node's data dir")


class VerificationConfig(_Strict):
    target: str = Field(DEFAULT_TARGET, alias="_target_")
    enabled: bool = False
    sample_rate: float = Field(0.10, ge=0.0, le=1.0, description="tier 1: P(a request's span is re-executed)")
    vote_peers: int = Field(3, ge=3, le=9, description="tier 2: peers voting when primary and secondary differ")
    audit_rate: float = Field(0.10, ge=0.0, le=1.0, description="tier 3: P(auditor check | primary == secondary)")
    max_steps_per_audit: int | None = Field(
        None, ge=1, description="cap on the steps of a sampled request compared; null (default): the whole "
                                "generation. A cap N lets a peer lie freely after step N: keep it null")
    top_k: int = Field(8, ge=1, le=100, description="log-probabilities compared per step")
    queue_size: int = Field(4096, ge=1, description="steps waiting for the worker; past it audits are dropped")
    slash_hydra: float = Field(1.0, ge=0.0, description="stake slashed per failed audit, whole HYDRA")
    seed: int | None = Field(None, description="seed of the sampling RNG (tests); null: from the OS")
    eliminate_after: int = Field(
        5, ge=2, description="a peer in every one of at least this many user chains whose answers audits could not "
                             "reproduce is failed once every other peer of those chains was in as many reproduced "
                             "chains without it (verification/elimination.py)")
    probe_suspects: bool = Field(True, description="while such suspects remain, new user chains leave one out in "
                                                   "turn where another peer serves its span")
    referee: bool = Field(True, description="when a vote ties (a span with only two peers) or an auditor stands alone, "
                                            "this coordinator loads the span from its model folder and votes too "
                                            "(verification/referee.py)")
    referee_keep_s: float = Field(300.0, gt=0.0, description="the referee's span is unloaded after this long unused")
    tolerance: ToleranceConfig = ToleranceConfig()
    reputation: ReputationConfig = ReputationConfig()
    fault: FaultConfig = FaultConfig()

    @model_validator(mode="after")
    def _odd_vote(self) -> VerificationConfig:
        if self.vote_peers % 2 == 0:
            raise ValueError(f"vote_peers must be odd so a two-way split has a majority, got {self.vote_peers}")
        return self
