"""The coordinator's privacy side of :class:`~openhydra.peer.client.PeerChainClient` (a mixin): what it sends
instead of token ids (embeddings, noised under ``onion_dp``), the per-session sealed route to its hops, which
results and failures it believes (sealed by the last hop, or tagged by a hop of the route), the DP audit of every
hop's noise, and under onion the head it applies itself so that no token id reaches the last hop.
"""

from __future__ import annotations

import logging
import os

import grpc
import torch

from openhydra.crypto.dp import DPParams, noised
from openhydra.crypto.dp_wire import audit_delivery, audit_records
from openhydra.crypto.errors import CryptoError
from openhydra.peer.errors import HopError
from openhydra.peer.messages import HopSpec, StepResult
from openhydra.peer.privacy import CoordinatorRoute
from openhydra.peer.proto import peer_pb2 as pb
from openhydra.peer.session_auth import FORGED_FAILURE, FORGED_RESULT, failure_is_authentic
from openhydra.peer.wire import encode_tensor
from openhydra.runtime.sampling import SamplingParams, sample

log = logging.getLogger(__name__)


class ClientPrivacy:
    """Uses the client's ``privacy``, ``embedder``, ``head``, ``key_lookup``, ``crypto_rejections``, ``dp_audits``
    and its per-session routes ``_crypto``."""

    @property
    def _samples_here(self) -> bool:
        """Under onion routing with a head, the coordinator samples: the last hop never sees token ids."""
        return self.head is not None and self.privacy.onion

    def _sample_here(self, result: StepResult, sampling: SamplingParams, step: int, extras: dict) -> StepResult:
        logits = self.head(result.hidden)  # float32 [1, V] or [S, V]
        top_ids: tuple[int, ...] = ()
        top_logprobs: tuple[float, ...] = ()
        token = sample(logits[-1], sampling, step)
        token_logprob = None
        if extras.get("return_top_k"):
            logprobs = torch.log_softmax(logits[-1], dim=-1)
            top = torch.topk(logprobs, min(int(extras["return_top_k"]), logprobs.numel()))
            top_ids, top_logprobs = tuple(top.indices.tolist()), tuple(top.values.tolist())
            token_logprob = float(logprobs[token])
        wants_logits = extras.get("return_logits") or extras.get("all_logits")
        return StepResult(token=token, last_hop=result.last_hop, logits=logits if wants_logits else None,
                          top_ids=top_ids, top_logprobs=top_logprobs, token_logprob=token_logprob)

    def _input_tensor(self, ids: list[int], private: bool) -> pb.Tensor:
        tokens = torch.tensor(ids, dtype=torch.int64)
        if private and self.embedder is not None:
            embeddings = self.embedder(tokens)  # [S, D]: token ids never leave the coordinator
            if self.privacy.dp:  # the first peer sees only clipped, noised embeddings
                params = DPParams(self.privacy.dp_sigma, self.privacy.dp_clip_embeddings)
                embeddings = noised(embeddings, params, int.from_bytes(os.urandom(8), "big"))
            return encode_tensor(embeddings)
        return encode_tensor(tokens)

    def _crypto_route(self, session_id: str, route: tuple[HopSpec, ...]) -> CoordinatorRoute:
        current = self._crypto.get(session_id)
        if current is not None and current.route == route:
            return current
        keyed = []
        for hop in route:
            found = self.key_lookup(hop.address, hop.peer_id) if self.key_lookup and not hop.static_key else None
            if found is not None:
                hop = hop.model_copy(update={"peer_id": found[0], "static_key": found[1]})
            keyed.append(hop)
        try:
            current = CoordinatorRoute.build(session_id, keyed, self.privacy, self._reply_address)
        except CryptoError as exc:  # a hop without a valid static key: never send it plaintext
            bad = next((h.address for h in keyed if not h.static_key), route[0].address)
            raise HopError(bad, grpc.StatusCode.FAILED_PRECONDITION, f"cannot encrypt to this hop: {exc}") from None
        current.route = route
        self._crypto[session_id] = current
        return current

    def _authentic(self, crypto: CoordinatorRoute, result: pb.Result) -> bool:
        """A failure tagged by a hop of the route, or a result sealed by the last hop (opened in place).

        Anything else is counted and ignored: it may come from anyone who learned (session id, seq)."""
        if result.WhichOneof("outcome") == "failure":
            if failure_is_authentic(crypto.crypto.route.hop_keys, result):
                return True
            reason = FORGED_FAILURE
        else:
            try:
                if not result.sealed:
                    raise CryptoError("unsealed result on an encrypted session")
                result.CopyFrom(crypto.open_result(result))
                return True
            except CryptoError:
                reason = FORGED_RESULT
        self.crypto_rejections[reason] += 1
        log.warning("ignored a result for %s/%d that its route did not authenticate (%s)", result.session_id,
                    result.seq, reason)
        return False

    def _audit_dp(self, crypto: CoordinatorRoute, result: pb.Result) -> None:
        """Every hop that pushed hidden states noised them as configured (crypto/dp_wire.py)."""
        keys = [crypto.crypto.audit_key(i) for i in range(len(crypto.route) - 1)]
        params = DPParams(self.privacy.dp_sigma, self.privacy.dp_clip)
        self.dp_audits += audit_records(list(result.dp_records), keys, params, result.session_id, result.seq)
        every = [*keys, crypto.crypto.audit_key(len(crypto.route) - 1)]  # each receiver's digest of what it got
        audit_delivery(list(result.dp_records), list(result.dp_received), every, result.session_id, result.seq)
