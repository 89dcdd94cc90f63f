"""Validation of a step's header at the peer boundary (pydantic), before any tensor or runtime work.

The peer protocol is strict: a step either describes exactly what this peer can do (its own span at
``route[0]``, a contiguous route that ends at the model's last layer, sane sizes and sampling values)
or it is refused with INVALID_ARGUMENT. Catching a broken route here is what prevents garbage text
from pipelines chained in the wrong order (DESIGN §6).
"""

from __future__ import annotations

import functools
import itertools
import re
from dataclasses import dataclass
from typing import TYPE_CHECKING

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from openhydra.peer.codec import CODECS
from openhydra.peer.proto import peer_pb2 as pb
from openhydra.runtime.sampling import SamplingParams

if TYPE_CHECKING:
    import torch

MAX_STEP_POSITIONS = 16384
MAX_POSITION = 1 << 24
MAX_RETURN_TOP_K = 100
_ADDRESS = re.compile(r"^[A-Za-z0-9.\-_:\[\]]+:\d{1,5}$")


class HopSpec(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)

    address: str = Field(min_length=3, max_length=256)
    start: int = Field(ge=0)
    end: int = Field(gt=0)
    peer_id: str = Field(default="", max_length=128)
    """Coordinator side only (never on the wire): whose static key encrypts to this hop."""
    static_key: str | None = Field(default=None, max_length=4096)
    """Coordinator side only: the hop's signed X25519 key as announced (crypto/records.py)."""

    @field_validator("address")
    @classmethod
    def _host_port(cls, value: str) -> str:
        if not _ADDRESS.match(value):
            raise ValueError(f"address {value!r} is not host:port")
        return value

    @model_validator(mode="after")
    def _non_empty(self) -> HopSpec:
        if self.end <= self.start:
            raise ValueError(f"span [{self.start},{self.end}) is empty")
        return self


class StepHeader(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)

    session_id: str = Field(min_length=1, max_length=128)
    seq: int = Field(ge=0)
    start_position: int = Field(ge=0, le=MAX_POSITION)
    num_positions: int = Field(ge=1, le=MAX_STEP_POSITIONS)
    route: tuple[HopSpec, ...] = Field(min_length=1, max_length=64)
    reply_to: str = Field(max_length=256)
    """Empty only under onion routing on a hop that is not last (checked by the server)."""
    deadline_unix_ms: int = Field(ge=0)
    forward_codec: int
    sampling: SamplingParams
    sampling_step: int = Field(ge=0)
    return_logits: bool
    return_top_k: int = Field(ge=0, le=MAX_RETURN_TOP_K)
    all_logits: bool
    return_hidden: bool = False
    one_pass_verify: bool = False

    @field_validator("forward_codec")
    @classmethod
    def _known_codec(cls, value: int) -> int:
        if value not in CODECS.values():
            raise ValueError(f"unknown codec {value}")
        return value

    @field_validator("reply_to")
    @classmethod
    def _reply_host_port(cls, value: str) -> str:
        if value and not _ADDRESS.match(value):
            raise ValueError(f"reply_to {value!r} is not host:port")
        return value

    @model_validator(mode="after")
    def _contiguous(self) -> StepHeader:
        for prev, nxt in itertools.pairwise(self.route):
            if prev.end != nxt.start:
                raise ValueError(f"route is not contiguous: [{prev.start},{prev.end}) then [{nxt.start},{nxt.end})")
        return self

    def check_for(self, start: int, end: int, num_layers: int) -> None:
        """This peer must be ``route[0]`` and the route must finish the model."""
        head = self.route[0]
        if (head.start, head.end) != (start, end):
            raise ValueError(f"route[0] expects layers [{head.start},{head.end}), this peer holds [{start},{end})")
        if self.route[-1].end != num_layers:
            raise ValueError(f"route ends at layer {self.route[-1].end}, the model has {num_layers}")


@functools.lru_cache(maxsize=1024)
def _route(hops: tuple[tuple[str, int, int], ...]) -> tuple[HopSpec, ...]:
    """A route's hops, validated once per distinct route: every step of a session carries the same one, and a hop's
    Python runs cold (docs/benchmarks.md, "A hop's Python runs cold")."""
    return tuple(HopSpec(address=address, start=start, end=end) for address, start, end in hops)


@functools.lru_cache(maxsize=256)
def _sampling(temperature: float, top_p: float, top_k: int, seed: int) -> SamplingParams:
    return SamplingParams(temperature=temperature, top_p=top_p, top_k=top_k, seed=seed)


def parse_step(step: pb.Step) -> StepHeader:
    """The validated header of ``step``; raises ValueError with a readable reason."""
    s = step.sampling
    try:
        route = _route(tuple((h.address, h.start, h.end) for h in step.route))  # a failure is not cached
        sampling = _sampling(s.temperature, s.top_p or 1.0, s.top_k, s.seed)
        return StepHeader(
            session_id=step.session_id,
            seq=step.seq,
            start_position=step.start_position,
            num_positions=step.num_positions,
            route=route,
            reply_to=step.reply_to,
            deadline_unix_ms=step.deadline_unix_ms,
            forward_codec=step.forward_codec,
            sampling=sampling,
            sampling_step=s.sampling_step,
            return_logits=s.return_logits,
            return_top_k=s.return_top_k,
            all_logits=s.all_logits,
            return_hidden=s.return_hidden,
            one_pass_verify=s.one_pass_verify,
        )
    except ValidationError as exc:
        first = exc.errors()[0]
        where = ".".join(str(p) for p in first["loc"])
        raise ValueError(f"invalid step: {where + ': ' if where else ''}{first['msg']}") from None


@dataclass(frozen=True)
class StepResult:
    """What one step gave the coordinator (peer/client.py): the sampled token and what the request asked for."""

    token: int
    last_hop: str
    logits: torch.Tensor | None = None  # float32 [1, V] or [S, V]
    hidden: torch.Tensor | None = None  # final hidden states from the last hop (coordinator-side sampling)
    top_ids: tuple[int, ...] = ()
    top_logprobs: tuple[float, ...] = ()
    token_logprob: float | None = None  # the sampled token's logprob (sent with return_top_k)
