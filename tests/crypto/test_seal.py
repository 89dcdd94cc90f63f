"""AES-256-GCM activation sealing: round trips, tamper detection, replay and reordering."""

from __future__ import annotations

import os
import random

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from openhydra.crypto.errors import MalformedMessage, ReplayedMessage, TamperedMessage
from openhydra.crypto.seal import Direction, Opener, Sealer, channel, parse_header

KEY = bytes(range(32))


@settings(max_examples=200, deadline=None)
@given(
    steps=st.lists(st.integers(0, 2**20), min_size=1, max_size=8),
    payload=st.binary(max_size=4096),
    session=st.text(min_size=1, max_size=40).filter(lambda s: 1 <= len(s.encode()) <= 255),
    hop=st.integers(0, 255),
    direction=st.sampled_from(list(Direction)),
)
def test_round_trip_property(steps: list[int], payload: bytes, session: str, hop: int, direction: Direction) -> None:
    sealer, opener = channel(KEY, session, hop, direction)
    for i, step in enumerate(sorted(steps)):
        msg = sealer.seal(step, payload + bytes([i % 256]))
        assert payload not in msg or len(payload) < 8  # ciphertext does not carry the plaintext
        opened = opener.open(msg)
        assert (opened.step, opened.seq, opened.plaintext) == (step, i + 1, payload + bytes([i % 256]))


@settings(max_examples=300, deadline=None)
@given(payload=st.binary(min_size=1, max_size=512), data=st.data())
def test_any_bit_flip_rejected_property(payload: bytes, data: st.DataObject) -> None:
    sealer, opener = channel(KEY, "s", 1)
    msg = bytearray(sealer.seal(3, payload))
    bit = data.draw(st.integers(0, len(msg) * 8 - 1))
    msg[bit // 8] ^= 1 << (bit % 8)
    with pytest.raises((TamperedMessage, MalformedMessage)):
        opener.open(bytes(msg))
    assert opener.last_seq == 0  # a rejected message never moves the replay window


def test_every_bit_of_a_bf16_activation_is_authenticated() -> None:
    sealer, _ = channel(KEY, "sess", 0)
    msg = sealer.seal(7, os.urandom(1792))
    rng = random.Random(0)
    for bit in rng.sample(range(len(msg) * 8), 3000):
        bad = bytearray(msg)
        bad[bit // 8] ^= 1 << (bit % 8)
        opener = Opener(KEY, "sess", 0, Direction.FORWARD)
        with pytest.raises((TamperedMessage, MalformedMessage)):
            opener.open(bytes(bad))


def test_truncated_and_extended_rejected() -> None:
    sealer, opener = channel(KEY, "s", 0)
    msg = sealer.seal(0, b"activation" * 10)
    for cut in (0, 5, 20, len(msg) - 17, len(msg) - 1):
        with pytest.raises((TamperedMessage, MalformedMessage)):
            opener.open(msg[:cut])
    with pytest.raises(TamperedMessage):
        opener.open(msg + b"\0")
    assert opener.open(msg).plaintext == b"activation" * 10


def test_replayed_message_rejected() -> None:
    sealer, opener = channel(KEY, "s", 2)
    first = sealer.seal(0, b"a")
    assert opener.open(first).plaintext == b"a"
    with pytest.raises(ReplayedMessage):
        opener.open(first)
    second = sealer.seal(1, b"b")
    assert opener.open(second).seq == 2
    with pytest.raises(ReplayedMessage):
        opener.open(first)


def test_reordered_messages_rejected() -> None:
    sealer, opener = channel(KEY, "s", 2)
    m1, m2, m3 = sealer.seal(1, b"1"), sealer.seal(2, b"2"), sealer.seal(3, b"3")
    assert opener.open(m2).step == 2
    with pytest.raises(ReplayedMessage):
        opener.open(m1)  # arrived late: older seq
    assert opener.open(m3).step == 3


def test_step_going_backwards_rejected_even_with_fresh_seq() -> None:
    sealer, opener = channel(KEY, "s", 0)
    opener.open(sealer.seal(5, b"x"))
    with pytest.raises(ReplayedMessage, match="step 4"):
        opener.open(sealer.seal(4, b"y"))
    assert opener.open(sealer.seal(5, b"z")).plaintext == b"z"  # several messages in one step are fine


@pytest.mark.parametrize(
    ("session", "hop", "direction"),
    [("other", 0, Direction.FORWARD), ("s", 1, Direction.FORWARD), ("s", 0, Direction.RETURN)],
)
def test_cross_channel_message_rejected(session: str, hop: int, direction: Direction) -> None:
    msg = Sealer(KEY, session, hop, direction).seal(0, b"x")
    with pytest.raises(TamperedMessage):
        Opener(KEY, "s", 0, Direction.FORWARD).open(msg)


def test_header_rewrite_to_other_channel_rejected() -> None:
    msg = bytearray(Sealer(KEY, "s", 0, Direction.FORWARD).seal(9, b"x"))
    msg[5] = 1  # claim hop 1
    with pytest.raises(TamperedMessage):
        Opener(KEY, "s", 1, Direction.FORWARD).open(bytes(msg))


def test_wrong_key_rejected_and_nonces_unique() -> None:
    sealer = Sealer(KEY, "s", 0, Direction.FORWARD)
    msgs = [sealer.seal(i, b"same plaintext") for i in range(2000)]
    nonces = {m[parse_header(m).header_len - 12 : parse_header(m).header_len] for m in msgs}
    assert len(nonces) == 2000
    assert len({m[-30:] for m in msgs}) == 2000  # same plaintext, different ciphertexts
    with pytest.raises(TamperedMessage):
        Opener(os.urandom(32), "s", 0, Direction.FORWARD).open(msgs[0])


def test_header_is_readable_without_key() -> None:
    msg = Sealer(KEY, "sess-9", 3, Direction.RETURN).seal(42, b"x")
    h = parse_header(msg)
    assert (h.session_id, h.hop_index, h.direction, h.step, h.seq) == ("sess-9", 3, Direction.RETURN, 42, 1)
    with pytest.raises(MalformedMessage):
        parse_header(b"XXXX" + msg[4:])
