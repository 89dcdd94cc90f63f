"""The peer's side of a failover rebuild (peer/rebuild.py): adopt a surviving session, handle rebuild messages.

A mixin of :class:`openhydra.peer.forward.PeerService`; it uses the service's runtime, privacy state, retained
activations, streams and its ``_process``/``_push``/``_deliver``/``_fail`` step path.
"""

from __future__ import annotations

import asyncio
import contextlib
import hmac
from typing import TYPE_CHECKING

import grpc
import torch

from openhydra.peer.outbound import MAX_TENSOR_MESSAGE_BYTES
from openhydra.peer.privacy import step_prefix_key
from openhydra.peer.proto import peer_pb2 as pb
from openhydra.peer.rebuild import Role, adopt_tag, role

if TYPE_CHECKING:
    from openhydra.peer.messages import StepHeader
    from openhydra.peer.privacy import HopState


class RebuildHandlers:
    """Failover rebuild on the peer: adoption of a surviving session and the three roles of a rebuild message."""

    def _settled(self, session_id: str) -> None:
        self._busy[session_id] -= 1
        if self._busy[session_id] <= 0:
            del self._busy[session_id]
            drained = self._drained.pop(session_id, None)
            if drained is not None:
                drained.set()

    async def _adopt(self, header: StepHeader, step: pb.Step, state: HopState | None) -> bool:
        """Take over ``step.adopt_session``'s cache, cropped to ``adopt_length``, as this step's session (the
        coordinator's new id after a failover elsewhere in the chain). Only the coordinator that ran the old
        session can ask: it must prove its old per-hop audit key. False (and a Failure sent) if refused."""
        sid, old, length = header.session_id, step.adopt_session, int(step.adopt_length)
        rt = self.runtime
        if rt.session_length(sid) > 0:
            return True  # adopted with an earlier message of this session
        with contextlib.suppress(ValueError):  # a bad span is refused by _rebuild_step
            if step.rebuild_end and role(rt.start, rt.end, step.rebuild_start, step.rebuild_end) is Role.COMPUTE:
                return True  # the replacement itself starts empty
        old_state = self.privacy.state(old)
        if state is not None:
            tags = list(step.adopt_tags)
            expected = adopt_tag(old_state.session.layer.keys.audit_key, sid, old, length) if old_state else b""
            if not expected or state.index >= len(tags) or not hmac.compare_digest(tags[state.index], expected):
                self.privacy.rejections["adopt"] += 1
                await self._fail(header, self.address, grpc.StatusCode.PERMISSION_DENIED,
                                 "adopting a session needs the old session's key")
                return False
        elif old_state is not None or self.privacy.require_encryption:
            self.privacy.rejections["adopt"] += 1
            await self._fail(header, self.address, grpc.StatusCode.PERMISSION_DENIED,
                             "an encrypted session can only be adopted by an encrypted one")
            return False
        if self.settlement is not None and self.settlement.has_served(sid):
            # a session this hop already computed for (cut back to nothing by a truncate): taking another's cache
            # would add that session's positions to one that may be settled already (a red team had one
            # settled session signed for again and again this way)
            await self._fail(header, self.address, grpc.StatusCode.FAILED_PRECONDITION,
                             "cannot adopt into a session this peer already served")
            return False
        if self._busy.get(old):  # a step of the old session still running here: let it settle first
            drained = self._drained.setdefault(old, asyncio.Event())
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(drained.wait(), timeout=5.0)
        adopt = getattr(self.runtime, "adopt_session", None)
        try:
            if adopt is None or self._busy.get(old):
                raise ValueError("this backend cannot move sessions" if adopt is None else "the old session is busy")
            adopt(old, sid, length)
        except (KeyError, ValueError, NotImplementedError) as exc:
            await self._fail(header, self.address, grpc.StatusCode.FAILED_PRECONDITION, f"cannot adopt: {exc}")
            return False
        self.retained.rename(old, sid, length)
        if self.settlement is not None:  # what it computed for the old session is the new one's to settle
            self.settlement.adopt(old, sid)
        self.privacy.drop(old)
        self._upstream.pop(old, None)
        for key in [k for k in self._streams if k[1] == old]:  # in the background: the old successor may be hung
            task = asyncio.ensure_future(self._streams.pop(key).close())
            self._closing.add(task)
            task.add_done_callback(self._closing.discard)
        return True

    async def _rebuild_step(self, header: StepHeader, step: pb.Step, tensor: torch.Tensor | None,
                            state: HopState | None) -> None:
        """One rebuild message: compute if this hop is (part of) the replacement, else re-push what it retained
        (the hop just before it) or pass an empty marker on; the last hop answers every message."""
        rt = self.runtime
        try:
            part = role(rt.start, rt.end, step.rebuild_start, step.rebuild_end)
            if part is Role.COMPUTE and tensor is None:
                raise ValueError("a rebuild message reached the replacement span without activations")
        except ValueError as exc:
            await self._fail(header, self.address, grpc.StatusCode.INVALID_ARGUMENT, str(exc))
            return
        if part is Role.COMPUTE:
            await self._process(header, step, tensor, state)
            return
        end = header.start_position + header.num_positions
        held = rt.session_length(header.session_id)
        if held < end:
            await self._fail(header, self.address, grpc.StatusCode.FAILED_PRECONDITION,
                             f"rebuild: this hop holds {held} positions, the message ends at {end}")
            return
        if rt.is_last:
            result = pb.Result(session_id=header.session_id, seq=header.seq, token=-1, last_hop=self.address)
            await self._deliver(header, result if state is None else self.privacy.seal_result(state, result))
            return
        wire = pb.Tensor()
        if part is Role.FEED:
            wire = self.retained.get(header.session_id, header.start_position, header.num_positions)
            key = step_prefix_key(step, state) if wire is None and header.start_position == 0 else None
            if key is not None:  # prompt blocks it skipped, under this hop's names for them
                wire = self.retained.prefix_blocks(key, header.num_positions, header.forward_codec)
                if wire is not None and wire.ByteSize() > MAX_TENSOR_MESSAGE_BYTES:  # too long for one message:
                    wire = None  # refused below; the coordinator replays the session in full instead
            if wire is None:
                await self._fail(header, self.address, grpc.StatusCode.FAILED_PRECONDITION,
                                 f"rebuild: no retained activations for positions [{header.start_position},{end})")
                return
        await self._push(header, step, None, state, wire)
