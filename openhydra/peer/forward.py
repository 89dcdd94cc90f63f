"""The peer's forward stream (:class:`PeerService`, served by peer/server.py's PeerServer): runs its span for each
step and pushes the result on (see peer.proto).

Per step: validate the header and tensor (INVALID_ARGUMENT on the stream if malformed, before the
runtime is touched), run the span in a worker thread, then either push the hidden states to
``route[1]`` on this session's stream to it, or, on the last span, sample and deliver the Result to
the coordinator's ``reply_to``. Failures after validation are delivered to the coordinator as a
``Failure`` naming the hop at fault (this peer, or its successor when that one is unreachable).

Privacy (peer/privacy.py): sealed steps are opened before anything else; a tampered, replayed or
malformed one is counted in ``crypto_rejections`` by reason, nothing is forwarded, and the inbound
stream is aborted with DATA_LOSS naming this hop, so the predecessor (or the coordinator) fails over
as for a dead peer. Under onion routing a hop does not know the coordinator's address, so every
failure travels back up the chain the same way.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections import Counter, OrderedDict
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import grpc
import numpy as np
import torch

from openhydra.crypto.dp import DPParams
from openhydra.crypto.dp_wire import seal_received, seal_record
from openhydra.crypto.errors import CryptoError, StaleSession
from openhydra.crypto.keys import StaticKeyPair
from openhydra.metrics import METRICS
from openhydra.peer import onion_control
from openhydra.peer.control_rpcs import ControlRPCs
from openhydra.peer.errors import status_code
from openhydra.peer.messages import StepHeader, parse_step
from openhydra.peer.outbound import (
    STREAM_LIFETIME_S,
    ChannelPool,
    OutboundStream,
    StreamBroken,
)
from openhydra.peer.privacy import (
    HopState,
    Inbound,
    PeerPrivacy,
    hop_failure,
    parse_hop_failure,
    step_prefix_key,
    with_onion_route,
)
from openhydra.peer.proto import peer_pb2 as pb
from openhydra.peer.proto import peer_pb2_grpc as pb_grpc
from openhydra.peer.rebuild import DEFAULT_RETAIN_BYTES, Retained
from openhydra.peer.rebuild_service import RebuildHandlers
from openhydra.peer.session_auth import hop_settlement_key, sign_failure
from openhydra.peer.wire import FLOAT_DTYPES, WireError, decode_tensor, encode_tensor
from openhydra.runtime import compute_lane
from openhydra.runtime.prefix_cache import PrefixKey
from openhydra.runtime.sampling import sample
from openhydra.runtime.shard import PositionMismatchError, ShardRuntime, is_verify

log = logging.getLogger(__name__)

MAX_OUTBOUND_STREAMS = 1024
INLINE_MAX_POSITIONS = 16
"""Steps this small (decode, short verify batches) run on the event-loop thread: handing them to a
worker thread costs ~0.1-0.3 ms per hop (measured by bench/bench_hop.py), more than a tiny step's
compute. Larger steps (prefill chunks) go to the worker pool so the loop keeps moving messages.
A span whose small steps keep taking longer than INLINE_MAX_S (a big model on a slow CPU) stops running them inline:
the loop must stay free to answer liveness probes (Info) within the coordinator's probe timeout.
Where the node computes with several threads, every step runs on the compute lane instead
(runtime/compute_lane.py): a second thread starting OpenMP regions would slow all of them."""
INLINE_MAX_S = 0.05


def _finite(tensor: torch.Tensor) -> bool:
    """No NaN or Inf in ``tensor``. numpy's check where numpy has the dtype: fewer calls than torch's, and a hop's
    Python runs cold (docs/benchmarks.md, "A hop's Python runs cold")."""
    if tensor.dtype is torch.float32 or tensor.dtype is torch.float16:
        return bool(np.isfinite(tensor.numpy()).all())
    return bool(torch.isfinite(tensor).all())


class PeerService(ControlRPCs, RebuildHandlers, pb_grpc.PeerServicer):
    def __init__(
        self,
        runtime: ShardRuntime,
        address: str,
        model_id: str = "",
        workers: int = 1,
        inline_max_positions: int = INLINE_MAX_POSITIONS,
        static_key: StaticKeyPair | None = None,
        require_encryption: bool = False,
        swarm_token: str | None = None,
        settlement: Any = None,
        retain_bytes: int = DEFAULT_RETAIN_BYTES,
    ) -> None:
        self.runtime = runtime
        self.retained = Retained(retain_bytes if not runtime.is_last else 0)  # pushed activations (peer/rebuild.py)
        self._busy: Counter[str] = Counter()  # steps in flight per session (an adopted session must be idle)
        self._drained: dict[str, asyncio.Event] = {}  # sessions an adoption waits on, set when idle
        self.settlement = settlement  # economy.peer_settlement.PeerSettlement: records and signs what it served
        self.privacy = PeerPrivacy(static_key or StaticKeyPair.generate(), require_encryption)
        self.privacy.admission.is_live = lambda sid: runtime.session_length(sid) > 0  # never evicted for newcomers
        self._upstream: dict[str, Inbound] = {}  # onion sessions -> their inbound stream, for failures
        self.inline_max_positions = inline_max_positions
        self._inline_ok = True  # False once small steps took longer than INLINE_MAX_S three times in a row
        self._slow_inline = 0
        self.address = address
        self.model_id = model_id or runtime.model_dir.name
        self._executor = ThreadPoolExecutor(max_workers=workers, thread_name_prefix="shard")
        self._pool = ChannelPool(swarm_token)
        self._streams: OrderedDict[tuple[str, str, str], OutboundStream] = OrderedDict()
        self._closing: set[asyncio.Future] = set()
        self._in_flight = 0
        self._served = 0
        self.weights: Any = None  # weights/serve.py WeightsServer: FetchWeights (None: not sharing)

    # ---- RPCs -----------------------------------------------------------------------------------

    @property
    def crypto_rejections(self) -> dict[str, int]:
        """Rejected sealed messages and onion layers by reason (for /metrics)."""
        return self.privacy.counts()

    async def Forward(self, request_iterator, context: grpc.aio.ServicerContext) -> pb.ForwardSummary:
        inbound = Inbound(request_iterator)
        try:
            return await self._forward(inbound, context)
        finally:
            await inbound.close()
            for sid in [sid for sid, watched in self._upstream.items() if watched is inbound]:
                del self._upstream[sid]

    async def _forward(self, inbound: Inbound, context: grpc.aio.ServicerContext) -> pb.ForwardSummary:
        steps = 0
        while True:
            step = await inbound.next()
            if isinstance(step, str):  # a failure downstream (onion: cannot reach the coordinator)
                await context.abort(grpc.StatusCode.DATA_LOSS, step)
            if step is None:
                break
            state = None
            try:
                if step.sealed or step.onion:
                    step, state = self.privacy.open_step(step, source=context.peer())
                elif self.privacy.require_encryption:
                    self.privacy.rejections["plaintext"] += 1
                    raise CryptoError("this peer requires encrypted steps")
            except CryptoError as exc:
                log.log(logging.INFO if isinstance(exc, StaleSession) else logging.WARNING,  # a straggler, expected
                        "%s: rejected a step of %s: %s (%s)", self.address, step.session_id, exc.reason, exc)
                index = state.index if state is not None else -1
                why = f"{self.address}: {exc.reason}: {exc}"
                await context.abort(grpc.StatusCode.DATA_LOSS, hop_failure(index, grpc.StatusCode.DATA_LOSS, why))
            if state is not None and not step.reply_to and step.session_id not in self._upstream:
                inbound.watch()  # onion: failures downstream must come back up this stream
                self._upstream[step.session_id] = inbound
            if state is not None and step.control:  # close/truncate along the onion (peer/onion_control.py)
                await onion_control.handle(self, step, state)
                continue
            try:
                header = parse_step(with_onion_route(step, state, self.address, self.runtime.num_layers))
                header.check_for(self.runtime.start, self.runtime.end, self.runtime.num_layers)
                if not header.reply_to and state is None:
                    raise ValueError("invalid step: reply_to is empty")
                marker = step.rebuild_end > 0 and step.tensor.dtype == pb.DTYPE_UNSPECIFIED  # peer/rebuild.py
                tensor = None if marker else self._decode_input(header, step.tensor)
                step_prefix_key(step, state)  # malformed prefix hashes are refused here too, before the runtime
            except ValueError as exc:
                await context.abort(grpc.StatusCode.INVALID_ARGUMENT, f"{self.address}: {exc}")
            if state is not None and step.dp_sigma > 0 and tensor is not None and state.index > 0:
                step.dp_received.append(seal_received(state.session.layer.keys.audit_key, step.session_id,
                                                      state.index, step.seq, tensor))  # crypto/dp_wire.py
            steps += 1
            if step.adopt_session and not await self._adopt(header, step, state):
                continue
            if step.rebuild_end:
                await self._rebuild_step(header, step, tensor, state)
            else:
                await self._process(header, step, tensor, state)
        return pb.ForwardSummary(steps=steps)

    # ---- one step -------------------------------------------------------------------------------

    def _decode_input(self, header: StepHeader, message: pb.Tensor) -> torch.Tensor:
        n = header.num_positions
        if self.runtime.is_first and message.dtype == pb.DTYPE_INT64:
            ids = decode_tensor(message, shape=(n,), dtypes=frozenset({pb.DTYPE_INT64}))
            if int(ids.min()) < 0 or int(ids.max()) >= self.runtime.vocab_size:
                raise ValueError(f"token ids must lie in [0, {self.runtime.vocab_size})")
            return ids
        try:
            hidden = decode_tensor(message, shape=(n, self.runtime.hidden_size), dtypes=FLOAT_DTYPES)
        except WireError as exc:
            raise ValueError(f"hidden states: {exc}") from None
        if not _finite(hidden):
            raise ValueError("hidden states contain NaN or Inf")  # would poison this session's cache
        return hidden

    async def _process(self, header: StepHeader, step: pb.Step, tensor: torch.Tensor, state: HopState | None) -> None:
        if header.deadline_unix_ms and time.time() * 1000 > header.deadline_unix_ms:
            await self._fail(header, self.address, grpc.StatusCode.DEADLINE_EXCEEDED, "step arrived after its deadline")
            return
        loop = asyncio.get_running_loop()
        self._in_flight += 1
        self._busy[header.session_id] += 1
        METRICS.peer_in_flight.inc()
        began = time.perf_counter()
        try:
            prefix = step_prefix_key(step, state)  # a malformed one is INVALID_ARGUMENT
            batcher = getattr(self.runtime, "batcher", None)
            batchable = (batcher is not None and prefix is None  # runtime/batching.py
                         and not (header.return_hidden and self.runtime.is_last))
            if batchable and header.num_positions == 1:
                out = self._compute(header, tensor, await asyncio.wrap_future(self._submit(batcher, header, tensor)))
            elif (batchable and not header.one_pass_verify
                  and is_verify(header.all_logits, header.num_positions, header.start_position)):
                # A speculative verify: its positions are rows of batched forwards, each with the bits of the
                # batched decode step plain decoding runs there (runtime/batching.py; the same greedy tokens).
                out = self._compute(header, tensor,
                                    await asyncio.wrap_future(self._submit(batcher, header, tensor, verify=True)))
            elif (lane := compute_lane.current()) is not None:  # every step on the process's one compute thread
                out = await asyncio.wrap_future(lane.submit(self._compute, header, tensor, None, prefix))
            elif header.num_positions <= self.inline_max_positions and self._inline_ok:
                out = self._compute(header, tensor, prefix=prefix)
                self._slow_inline = self._slow_inline + 1 if time.perf_counter() - began > INLINE_MAX_S else 0
                if self._slow_inline >= 3:  # three in a row: the span is slow, not a scheduling hiccup
                    self._inline_ok = False
                    log.info("%s: small steps take %.0f ms; running them off the event loop from now on",
                             self.address, (time.perf_counter() - began) * 1e3)
            else:
                out = await loop.run_in_executor(self._executor, self._compute, header, tensor, None, prefix)
        except PositionMismatchError as exc:
            await self._fail(header, self.address, grpc.StatusCode.FAILED_PRECONDITION, str(exc), exc.expected)
            return
        except ValueError as exc:
            await self._fail(header, self.address, grpc.StatusCode.INVALID_ARGUMENT, str(exc))
            return
        except Exception as exc:
            log.exception("step %s/%d failed", header.session_id, header.seq)
            await self._fail(header, self.address, grpc.StatusCode.INTERNAL, f"{type(exc).__name__}: {exc}")
            return
        finally:
            self._in_flight -= 1
            self._settled(header.session_id)
            METRICS.peer_in_flight.dec()
        self._served += 1
        METRICS.peer_step(header.num_positions, time.perf_counter() - began)
        if self.settlement is not None:
            # the positions it computed (not the position reached: a session seeded from the prefix cache did not
            # compute the seed); its settlement calls are authenticated with the session's key
            self.settlement.served(header.session_id, header.start_position, header.num_positions,
                                   hop_settlement_key(state))
        if isinstance(out, pb.Result):
            if state is not None and step.dp_records:  # upstream hops' DP audit records go to the coordinator
                out.dp_records.extend(step.dp_records)
                out.dp_received.extend(step.dp_received)
            await self._deliver(header, out if state is None else self.privacy.seal_result(state, out))
        else:
            await self._push(header, step, out, state)

    def _submit(self, batcher, header: StepHeader, tensor: torch.Tensor, verify: bool = False):
        """Queue a one-position step (or a whole verify) with the decode batcher; a future of what
        ``runtime.forward`` returns for it."""
        ids = tensor if self.runtime.is_first and tensor.dtype == torch.int64 else None
        inputs = {"input_ids": ids, "hidden_states": tensor if ids is None else None}
        if verify:
            return batcher.submit_verify(header.session_id, header.start_position, **inputs)
        return batcher.submit(header.session_id, header.start_position, all_logits=header.all_logits, **inputs)

    def _compute(
        self, header: StepHeader, tensor: torch.Tensor, computed: torch.Tensor | None = None,
        prefix: PrefixKey | None = None,
    ) -> torch.Tensor | pb.Result:
        """Runs in a worker thread: the span (unless the batcher ``computed`` it), and on the last span the sampling."""
        positions = torch.arange(header.start_position, header.start_position + header.num_positions)
        rt = self.runtime
        if computed is not None:
            out = computed
        elif rt.is_first and tensor.dtype == torch.int64:  # token ids (privacy off)
            out = rt.forward(header.session_id, positions, input_ids=tensor, all_logits=header.all_logits,
                             **({"prefix": prefix} if prefix is not None else {}),
                             **({"one_pass_verify": True} if header.one_pass_verify else {}))
        else:  # hidden states, or on the first span embeddings computed by the coordinator (privacy on)
            out = rt.forward(header.session_id, positions, hidden_states=tensor, all_logits=header.all_logits,
                             **({"prefix": prefix} if prefix is not None else {}),
                             **({"return_hidden": True} if header.return_hidden and rt.is_last else {}),
                             **({"one_pass_verify": True} if header.one_pass_verify else {}))
        if not rt.is_last:
            return out  # hidden [S, D]
        if header.return_hidden:  # the coordinator applies norm + head and samples (peer/head.py)
            hidden = out if header.all_logits else out[-1:]  # [S, D] or [1, D]
            return pb.Result(session_id=header.session_id, seq=header.seq, token=-1, last_hop=self.address,
                             hidden=encode_tensor(hidden))
        logits = out  # float32 [1, V] or [S, V]
        result = pb.Result(
            session_id=header.session_id,
            seq=header.seq,
            token=sample(logits[-1], header.sampling, header.sampling_step),
            last_hop=self.address,
        )
        if header.return_logits:
            result.logits.CopyFrom(encode_tensor(logits))
        if header.return_top_k:
            logprobs = torch.log_softmax(logits[-1], dim=-1)
            top = torch.topk(logprobs, min(header.return_top_k, logprobs.numel()))
            result.top_ids.extend(top.indices.tolist())
            result.top_logprobs.extend(top.values.tolist())
            result.token_logprob = float(logprobs[result.token])
        return result

    def _dp_noise(self, state: HopState, hidden: torch.Tensor, step: pb.Step) -> tuple[torch.Tensor, bytes]:
        """privacy=onion_dp: clip + seeded Gaussian noise on this hop's output, and its sealed audit record."""
        if not (0 < step.dp_sigma <= 10 and 0 < step.dp_clip < 1e6):
            raise ValueError(f"invalid DP parameters sigma={step.dp_sigma}, clip={step.dp_clip}")
        noisy, record = state.session.noise(hidden, DPParams(step.dp_sigma, step.dp_clip), step.seq)
        return noisy, seal_record(state.session.layer.keys.audit_key, record)

    async def _push(self, header: StepHeader, step: pb.Step, hidden: torch.Tensor | None, state: HopState | None,
                    wire: pb.Tensor | None = None) -> None:
        """Send this hop's output on: ``hidden`` (noised if asked, encoded and retained for a failover rebuild),
        or an already encoded ``wire`` tensor (a rebuild's re-push or empty marker, peer/rebuild.py)."""
        nxt = header.route[1]
        records = list(step.dp_records)
        if step.rebuild_end and self.runtime.end >= step.rebuild_end:
            wire = pb.Tensor()  # rebuilt up to here: the hops after this one hold these positions already
        if wire is None:
            if state is not None and step.dp_sigma > 0:
                try:
                    hidden, record = self._dp_noise(state, hidden, step)
                except ValueError as exc:
                    await self._fail(header, self.address, grpc.StatusCode.INVALID_ARGUMENT, str(exc))
                    return
                records.append(record)
            wire = encode_tensor(hidden, header.forward_codec)  # [S, D]
            self.retained.keep(step.session_id, step.start_position, step.num_positions, wire)
            if not step.dp_sigma:  # noised outputs are the session's own: a later session could not reuse them
                self.retained.keep_blocks(step.session_id, step.start_position, hidden, step_prefix_key(step, state))
        message = pb.Step(
            session_id=step.session_id,
            seq=step.seq,
            start_position=step.start_position,
            num_positions=step.num_positions,
            tensor=wire,
            route=list(step.route)[1:],
            onion=step.onion,
            sampling=step.sampling,
            reply_to=step.reply_to,
            deadline_unix_ms=step.deadline_unix_ms,
            forward_codec=step.forward_codec,
            dp_sigma=step.dp_sigma,
            dp_clip=step.dp_clip,
            dp_records=records,
            dp_received=step.dp_received,
            adopt_session=step.adopt_session,
            adopt_length=step.adopt_length,
            adopt_tags=step.adopt_tags,
            rebuild_start=step.rebuild_start,
            rebuild_end=step.rebuild_end,
        )
        if step.prefix_hashes:  # prefix cache: every hop seeds and stores the same prompt blocks
            message.prefix_hashes.extend(step.prefix_hashes)
            message.prefix_block = step.prefix_block
        if state is not None:
            message = self.privacy.seal_step(state, message)
        stream = self._stream("forward", header.session_id, nxt.address)
        try:
            await stream.send(message, context=header)
        except StreamBroken as exc:
            await self._on_forward_broken(nxt.address, exc.code, exc.details, header)

    async def _deliver(self, header: StepHeader, result: pb.Result) -> None:
        stream = self._stream("deliver", header.session_id, header.reply_to)
        try:
            await stream.send(result, context=None)
        except StreamBroken as exc:
            log.warning("cannot deliver %s/%d to %s: %s", header.session_id, header.seq, header.reply_to, exc)

    async def _fail(
        self, header: StepHeader, hop: str, code: grpc.StatusCode, message: str, expected: int = -1,
        index: int | None = None,
    ) -> None:
        METRICS.peer_failures.labels(code.name).inc()
        if not header.reply_to:  # onion, not the last hop: report up the chain (see Forward)
            inbound = self._upstream.get(header.session_id)
            state = self.privacy.state(header.session_id)
            if index is None and state is not None:
                index = state.index if hop == self.address else state.index + 1
            if inbound is not None:
                inbound.report(hop_failure(-1 if index is None else index, code, message, expected))
            return
        if index is not None:  # relayed from downstream by index: name that hop's address
            state = self.privacy.state(header.session_id)
            offset = index - state.index if state is not None else -1
            if 0 <= offset < len(header.route):
                hop = header.route[offset].address
        failure = pb.Failure(hop_address=hop, code=code.value[0], message=message, expected_position=expected)
        result = pb.Result(session_id=header.session_id, seq=header.seq, failure=failure)
        if (keyed := self.privacy.state(header.session_id)) is not None:  # believed only if tagged (session_auth.py)
            sign_failure(keyed.session.layer.keys, keyed.index, result)
        await self._deliver(header, result)

    async def _on_forward_broken(self, address: str, code: grpc.StatusCode, details: str, header: Any) -> None:
        if isinstance(header, StepHeader):
            relayed = parse_hop_failure(details)
            if relayed is None:
                await self._fail(header, address, code, details or "stream to the next hop broke")
                return
            index, code_value, expected, message = relayed
            state = self.privacy.state(header.session_id)
            if index < 0 and state is not None:
                index = state.index + 1  # the successor rejected before it knew its index
            await self._fail(header, address, status_code(code_value), message, expected, index if index >= 0 else None)

    def _stream(self, kind: str, session_id: str, address: str) -> OutboundStream:
        key = (kind, session_id, address)
        stream = self._streams.get(key)
        if stream is None:
            if kind == "forward":
                stub = pb_grpc.PeerStub
                stream = OutboundStream(
                    self._pool, address, lambda ch: stub(ch).Forward(timeout=STREAM_LIFETIME_S), self._on_forward_broken
                )
            else:
                stream = OutboundStream(
                    self._pool,
                    address,
                    lambda ch: pb_grpc.CoordinatorStub(ch).Deliver(timeout=STREAM_LIFETIME_S),
                    _ignore_broken,
                )
            self._streams[key] = stream
            while len(self._streams) > MAX_OUTBOUND_STREAMS:
                _, old = self._streams.popitem(last=False)
                task = asyncio.ensure_future(old.close())
                self._closing.add(task)
                task.add_done_callback(self._closing.discard)
        self._streams.move_to_end(key)
        return stream

    async def aclose(self) -> None:
        for stream in list(self._streams.values()):
            await stream.close()
        self._streams.clear()
        await self._pool.close()
        self._executor.shutdown(wait=False, cancel_futures=True)


async def _ignore_broken(address: str, code: grpc.StatusCode, details: str, context: Any) -> None:
    # Normal when a coordinator shuts down or restarts; its pending steps fail over on its side.
    log.info("result stream to coordinator %s ended: %s %s", address, code.name, details)
