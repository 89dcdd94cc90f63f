"""The in-place K/V cache layer (runtime/kv_layer.py ``AppendLayer``): the same bits as transformers'
``DynamicLayer`` through a real runtime (prefill, long decodes across buffer growth, truncation, speculative
verifies), fp32 and bf16, tiny Llama and Qwen3 and real SmolLM2 weights; and appends that do not copy the cache."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from transformers import DynamicCache
from transformers.cache_utils import DynamicLayer

from openhydra.runtime.kv_layer import AppendLayer, session_cache
from openhydra.runtime.shard import ShardRuntime


def _run(rt: ShardRuntime, session: str, prompt: torch.Tensor, plan: list[tuple[str, int]]) -> list[torch.Tensor]:
    """Prefill, then the plan: ("decode", n) greedy steps, ("truncate", n) positions dropped, ("verify", s) an
    s-position verify of the next s greedy-ish drafts (all logits). Every output in order."""
    outs = [rt.forward(session, torch.arange(prompt.numel()), input_ids=prompt)]
    length = prompt.numel()
    for action, n in plan:
        if action == "decode":
            for _ in range(n):
                token = torch.tensor([int(outs[-1][-1].argmax())])
                outs.append(rt.forward(session, torch.tensor([length]), input_ids=token))
                length += 1
        elif action == "truncate":
            length -= n
            rt.truncate_session(session, length)
        else:
            drafts = (torch.arange(n) * 37 + int(outs[-1][-1].argmax())) % 4000
            outs.append(rt.forward(session, torch.arange(length, length + n), input_ids=drafts, all_logits=True))
            length += n
    return outs


PLAN = [("decode", 40), ("truncate", 5), ("decode", 3), ("verify", 4), ("truncate", 2), ("verify", 3),
        ("decode", 150)]  # 19 + ~210 positions: the buffer (64 positions at first) grows several times


def _assert_same_as_dynamic_layer(model_dir: Path, dtype: torch.dtype, plan: list[tuple[str, int]] = PLAN) -> None:
    rt = ShardRuntime(model_dir, dtype=dtype)
    prompt = torch.randint(3, 4000, (19,), generator=torch.Generator().manual_seed(5))
    appended = _run(rt, "append", prompt, plan)
    cache = rt._sessions.get("append").cache
    assert any(type(layer) is AppendLayer for layer in cache.layers)
    rt._sessions._new_cache = lambda: DynamicCache(config=rt.shard_config)  # transformers' concatenating layer
    plain = _run(rt, "plain", prompt, plan)
    assert all(type(layer) is not AppendLayer for layer in rt._sessions.get("plain").cache.layers)
    assert len(appended) == len(plain)
    for i, (a, b) in enumerate(zip(appended, plain, strict=True)):
        assert torch.equal(a, b), f"output {i}: max |diff| {(a.float() - b.float()).abs().max().item()}"
    for a, b in zip(cache.layers, rt._sessions.get("plain").cache.layers, strict=True):
        if type(a) is AppendLayer:
            assert torch.equal(a.keys, b.keys) and torch.equal(a.values, b.values)


@pytest.mark.parametrize("family", ["llama", "qwen3"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_append_layer_is_bit_identical_to_dynamic_layer_on_tiny_models(tiny_model_dirs, family, dtype):
    _assert_same_as_dynamic_layer(tiny_model_dirs[family], dtype)


@pytest.mark.slow
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_append_layer_is_bit_identical_to_dynamic_layer_on_smollm2(smollm2_dir, dtype):
    _assert_same_as_dynamic_layer(smollm2_dir, dtype, plan=[*PLAN[:-1], ("decode", 140)])


def _kv(n: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return torch.randn(1, 2, n, 8, generator=g), torch.randn(1, 2, n, 8, generator=g)


def test_appends_write_in_place_and_grow_rarely():
    layer, plain = AppendLayer(), DynamicLayer()
    buffers = set()
    for step in range(1200):
        k, v = _kv(7 if step == 0 else 1, step)
        keys, values = layer.update(k, v)
        expected_keys, expected_values = plain.update(k, v)
        assert torch.equal(keys, expected_keys) and torch.equal(values, expected_values)
        buffers.add(keys.untyped_storage().data_ptr())
    assert layer.get_seq_length() == 1206
    assert len(buffers) <= 24  # amortised: a copy every >= 32 appends, then every ~1/8 of the length


def test_crop_then_append_reuses_the_buffer_and_replaced_tensors_are_adopted():
    layer = AppendLayer()
    layer.update(*_kv(10, 0))
    storage = layer.keys.untyped_storage().data_ptr()
    layer.crop(-4)  # what truncation after rejected drafts does
    k, v = _kv(2, 1)
    keys, values = layer.update(k, v)
    assert keys.shape[-2] == 8 and keys.untyped_storage().data_ptr() == storage
    assert torch.equal(keys[:, :, 6:], k) and torch.equal(values[:, :, 6:], v)
    # Someone else replaces the tensors (prefix-cache seeding, batch selection, compaction): the next update moves
    # them into a fresh buffer, and the tensors handed over are not written to.
    replaced_k, replaced_v = _kv(5, 2)
    before = replaced_k.clone()
    layer.keys, layer.values = replaced_k, replaced_v
    k, v = _kv(1, 3)
    keys, _ = layer.update(k, v)
    assert torch.equal(keys, torch.cat([before, k], dim=-2)) and torch.equal(replaced_k, before)
    assert keys.untyped_storage().data_ptr() not in (storage, replaced_k.untyped_storage().data_ptr())


def _appended_in_place(layer: AppendLayer, k: torch.Tensor, v: torch.Tensor) -> None:
    """An append as a batched step's library call makes it: reserve, write the buffers, expose lazily."""
    held = layer.reserve(k, v)
    count = k.shape[-2]
    layer._key_buffer[:, :, held : held + count] = k
    layer._value_buffer[:, :, held : held + count] = v
    assert layer.expose(held + count, lazily=True) is None


def test_lazily_exposed_positions_are_what_update_gives_wherever_they_are_read():
    """After a lazy expose the views are made on first read: the length, a crop, a replacement, a reset and later
    appends (either way) see what ``update`` would have left, bit for bit, over many steps and a buffer growth."""
    ours, plain = AppendLayer(), DynamicLayer()
    ours.update(*_kv(5, 0))
    plain.update(*_kv(5, 0))
    for step in range(80):  # past the first buffer's 48 positions: reserve moves pending positions to a new one
        k, v = _kv(1, 100 + step)
        plain.update(k, v)
        if step % 3 == 2:
            keys, values = ours.update(k, v)
            assert torch.equal(keys, plain.keys) and torch.equal(values, plain.values)
        else:
            _appended_in_place(ours, k, v)
            assert ours._end is not None and ours.get_seq_length() == plain.get_seq_length()
            assert ours._end is not None  # the length did not make the views
        if step % 10 == 4:  # read now and then: the views made on demand
            assert torch.equal(ours.keys, plain.keys) and torch.equal(ours.values, plain.values)
    _appended_in_place(ours, *_kv(1, 999))
    plain.update(*_kv(1, 999))
    ours.crop(-3)  # a crop of pending positions reads, then assigns, through the properties
    plain.crop(-3)
    assert ours.get_seq_length() == plain.get_seq_length() and torch.equal(ours.keys, plain.keys)
    _appended_in_place(ours, *_kv(2, 1000))
    plain.update(*_kv(2, 1000))
    replaced_k, replaced_v = _kv(4, 7)  # someone replaces pending positions: the replacement wins
    ours.values = replaced_v
    ours.keys = replaced_k
    assert torch.equal(ours.keys, replaced_k) and torch.equal(ours.values, replaced_v)
    keys, _ = ours.update(*_kv(1, 8))
    assert torch.equal(keys, torch.cat([replaced_k, _kv(1, 8)[0]], dim=-2))
    _appended_in_place(ours, *_kv(1, 9))
    ours.reset()
    assert ours.keys is None and ours.get_seq_length() == 0
    keys, _ = ours.update(*_kv(3, 10))
    assert torch.equal(keys, _kv(3, 10)[0])


def test_session_cache_replaces_only_plain_full_attention_layers(tiny_model_dirs):
    for family in ("llama", "qwen3_5"):  # Qwen3.5 mixes linear-attention (recurrent) layers in
        rt = ShardRuntime(tiny_model_dirs[family], 0, 4, dtype=torch.float32)
        cache, reference = session_cache(rt.shard_config), DynamicCache(config=rt.shard_config)
        for ours, theirs in zip(cache.layers, reference.layers, strict=True):
            assert type(ours) is (AppendLayer if type(theirs) is DynamicLayer else type(theirs))
