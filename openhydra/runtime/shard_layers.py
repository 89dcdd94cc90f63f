"""Building the modules of one contiguous layer span ``[start, end)`` of a decoder-only model.

The recipe (DESIGN §4, measured to match the full model with max diff 0.0):
- a per-shard config: ``num_hidden_layers`` and ``layer_types`` sliced to the span, attention
  implementation set explicitly (left unset, the causal mask is silently dropped);
- the shard's own decoder layers, re-indexed from 0, so one ``DynamicCache(config=shard_config)`` per
  session holds exactly this shard's K/V (and Gated-DeltaNet conv/recurrent) states;
- modules built on the ``meta`` device, then only this span's tensors loaded and assigned;
- embeddings on the first shard, final norm + lm_head on the last (tied to the embeddings when the
  config says so), and a rotary embedding on every shard, built after the dtype cast so that
  ``inv_freq`` stays fp32.
"""

from __future__ import annotations

import copy
import re
import weakref
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn
from transformers import AutoConfig, AutoModelForCausalLM, PretrainedConfig

from openhydra.runtime.quant_cpu import use_bf16_head, use_bf16_kernel
from openhydra.runtime.quantize import method_for, module_bytes, quantize_head, quantize_linears
from openhydra.runtime.weights import CheckpointError, CheckpointIndex, split_layer_name

ATTN_IMPLEMENTATION = "sdpa"
# Per-layer config lists that must be sliced with the span (one entry per global layer).
PER_LAYER_LISTS = ("layer_types", "no_rope_layers")


def load_text_config(model_dir: str | Path) -> PretrainedConfig:
    """The decoder's config: the text config of a multimodal checkpoint (Qwen3.5), else the config."""
    config = AutoConfig.from_pretrained(model_dir)
    return config.get_text_config(decoder=True)


def make_shard_config(text_config: PretrainedConfig, start: int, end: int) -> PretrainedConfig:
    """A copy of ``text_config`` describing only layers ``[start, end)``, re-indexed from 0."""
    cfg = copy.deepcopy(text_config)
    total = text_config.num_hidden_layers
    for name in PER_LAYER_LISTS:
        values = getattr(text_config, name, None)
        if isinstance(values, list) and len(values) == total:
            setattr(cfg, name, list(values[start:end]))
    cfg.num_hidden_layers = end - start
    cfg._attn_implementation = ATTN_IMPLEMENTATION
    return cfg


def layer_types_of(shard_config: PretrainedConfig) -> list[str]:
    types = getattr(shard_config, "layer_types", None)
    return list(types) if types else ["full_attention"] * shard_config.num_hidden_layers


class ShardModules(nn.Module):
    """The span's modules; ``embed_tokens`` only on the first shard, ``norm``/``lm_head`` only on the last."""

    def __init__(
        self,
        layers: nn.ModuleList,
        rotary_emb: nn.Module,
        embed_tokens: nn.Module | None,
        norm: nn.Module | None,
        lm_head: nn.Module | None,
    ) -> None:
        super().__init__()
        self.layers = layers
        self.rotary_emb = rotary_emb
        self.embed_tokens = embed_tokens
        self.norm = norm
        self.lm_head = lm_head


@dataclass(frozen=True)
class ShardBuild:
    modules: ShardModules
    shard_config: PretrainedConfig
    loaded_bytes: int
    """Bytes of parameters materialized for this shard (tied weights counted once)."""


def build_shard(
    model_dir: str | Path,
    text_config: PretrainedConfig,
    start: int,
    end: int,
    dtype: torch.dtype,
    device: str,
    quantization: str = "none",
    matmul: str = "pytorch",
) -> ShardBuild:
    total = text_config.num_hidden_layers
    is_first, is_last = start == 0, end == total
    shard_config = make_shard_config(text_config, start, end)

    with torch.device("meta"):
        skeleton = AutoModelForCausalLM.from_config(shard_config, attn_implementation=ATTN_IMPLEMENTATION, dtype=dtype)
    decoder = skeleton.get_decoder()
    modules = ShardModules(
        layers=decoder.layers,
        # Placeholder; replaced below by one built on the real device after the cast.
        rotary_emb=nn.Identity(),
        embed_tokens=decoder.embed_tokens if is_first else None,
        norm=decoder.norm if is_last else None,
        lm_head=skeleton.get_output_embeddings() if is_last else None,
    )
    rotary_cls = type(decoder.rotary_emb)
    keep_fp32 = _keep_in_fp32_patterns(skeleton, dtype)
    del skeleton, decoder

    index = CheckpointIndex.open(model_dir)
    tied = index.head_is_tied(bool(getattr(text_config, "tie_word_embeddings", False)))
    names = _checkpoint_names(index, modules, start, tied)
    dtype_for = {target: torch.float32 if any(p.search(target) for p in keep_fp32) else dtype for target in names}
    if is_first and is_last and tied:
        del names["lm_head.weight"]  # same tensor as the embeddings: read it once
    method = method_for(quantization, device)
    # cast once into the model cache and mapped (runtime/cast_store.py) where the cast tensors are the weights served:
    # a quantized or library span replaces them with its own layout
    keep_casts = device == "cpu" and method == "none" and matmul != "library"
    views: set[str] = set()
    tensors = index.read(names, dtype_for, mapped=views, keep_casts=keep_casts)
    if device != "cpu":
        tensors = {k: v.to(device) for k, v in tensors.items()}
    if is_first and is_last and tied:
        tensors["lm_head.weight"] = tensors["embed_tokens.weight"]
    modules.load_state_dict(tensors, strict=True, assign=True)
    if is_first and is_last and tied:
        modules.lm_head.weight = modules.embed_tokens.weight  # one Parameter, as in the full model

    still_meta = [n for n, t in [*modules.named_parameters(), *modules.named_buffers()] if t.is_meta]
    if still_meta:
        raise CheckpointError(f"tensors not materialized for layers [{start},{end}): {still_meta[:5]}")
    # inv_freq is computed in fp32 on the real device; never cast it with the weights.
    modules.rotary_emb = rotary_cls(config=shard_config).to(device)
    modules.eval()
    modules.requires_grad_(False)
    # Only the span's decoder layers are quantized; embeddings, norm and head keep ``dtype``. The loaded
    # full-precision tensors must be unreferenced first, or quantizing cannot free them.
    file_views = FileViews.of(modules, {tensors[name].data_ptr() for name in views})  # CPU tensors only (see .of)
    del tensors
    quantize_linears(modules.layers, method, device, dtype)
    quantize_head(modules, method, dtype)  # CPU int8/int4: head + embeddings int8
    # unquantized bf16 on the CPU: the layers' matmuls on the low-bit library (its bf16 layout, a copy)
    packed = method == "none" and matmul == "library" and bool(
        use_bf16_kernel(modules.layers, dtype, device) + use_bf16_head(modules, dtype, device))
    if method != "none" or packed:
        own_copies(modules, file_views)
    loaded = module_bytes(modules)  # tied tensors once, quantized weights and their scales included
    return ShardBuild(modules=modules, shard_config=shard_config, loaded_bytes=loaded)


@dataclass
class FileViews:
    """The span's tensors that are views of the checkpoint's mapping, before quantizing: held weakly (quantizing
    frees most of them) and known by identity, not by address (freed addresses are reused)."""

    refs: dict[int, weakref.ref]
    nbytes: int

    @classmethod
    def of(cls, root: nn.Module, pointers: set[int]) -> FileViews:
        refs: dict[int, weakref.ref] = {}
        nbytes = 0
        for tensor in (*root.parameters(), *root.buffers()):
            if tensor.device.type == "cpu" and tensor.data_ptr() in pointers and id(tensor) not in refs:
                refs[id(tensor)] = weakref.ref(tensor)
                nbytes += tensor.numel() * tensor.element_size()
        return cls(refs, nbytes)

    def holds(self, tensor: torch.Tensor) -> bool:
        ref = self.refs.get(id(tensor))
        return ref is not None and ref() is tensor


COPY_AT_MOST = 1 / 8
""":func:`own_copies` copies the views a quantized span still holds only if they are at most this share of the view
bytes quantizing freed."""


def own_copies(root: nn.Module, views: FileViews) -> int:
    """In a quantized span: give the tensors that are still views of the checkpoint's mapping (norms, biases) their
    own memory, so the mapping is released; returns how many were copied.

    In the checkpoint's dtype a read tensor is a view of the file's mapping, and any one view keeps the whole
    mapping alive: quantizing read every weight, so every page of the file stayed resident in the process (SmolLM2
    ``cpu_int4``: 513 MiB of file pages for a 92 MiB span, held by 121 norm vectors of 2 KiB). Copied only where
    the views left are small next to what quantizing freed (:data:`COPY_AT_MOST`): a large tensor left unquantized
    (an untied head under a method that keeps heads, a weight that is not an ``nn.Linear``) stays a view, pages the
    kernel can reclaim and other processes share, rather than becoming a private copy. An unquantized span keeps
    its views: there the mapping is the weights."""
    left: dict[int, tuple[dict, str, torch.Tensor]] = {}
    for module in root.modules():
        for store in (module._parameters, module._buffers):
            for name, tensor in store.items():
                if tensor is not None and views.holds(tensor):
                    left.setdefault(id(tensor), (store, name, tensor))  # a tied Parameter once
    kept = sum(t.numel() * t.element_size() for _, _, t in left.values())
    if kept > COPY_AT_MOST * (views.nbytes - kept):
        return 0
    for store, name, tensor in left.values():
        if isinstance(tensor, nn.Parameter):
            tensor.data = tensor.data.clone()  # the same Parameter object: a tied head keeps its tie
        else:
            store[name] = tensor.clone()
    return len(left)


def _checkpoint_names(index: CheckpointIndex, modules: ShardModules, start: int, tied: bool) -> dict[str, str]:
    """Target name in :class:`ShardModules` -> checkpoint tensor name, for every parameter/buffer it loads."""
    wanted = [name for name, _ in modules.named_parameters(remove_duplicate=False)]
    wanted += [name for name, _ in modules.named_buffers(remove_duplicate=False) if _is_persistent(modules, name)]
    out: dict[str, str] = {}
    for target in wanted:
        if target.startswith("rotary_emb."):
            continue
        layer = split_layer_name(target)
        if layer is not None:
            canonical = f"layers.{start + layer[0]}.{layer[1]}"
        elif target == "lm_head.weight" and tied:
            canonical = "embed_tokens.weight"
        else:
            canonical = target
        source = index.source_name(canonical)
        if source is None:
            raise CheckpointError(f"checkpoint at {index.root} has no tensor for {canonical!r} (needed as {target!r})")
        out[target] = source
    return out


def _is_persistent(root: nn.Module, buffer_name: str) -> bool:
    owner_name, _, leaf = buffer_name.rpartition(".")
    owner = root.get_submodule(owner_name) if owner_name else root
    return leaf not in owner._non_persistent_buffers_set


def _keep_in_fp32_patterns(model: nn.Module, dtype: torch.dtype) -> list[re.Pattern[str]]:
    """Mirror transformers' ``_keep_in_fp32_modules`` (fp16 only) and ``_strict`` (fp16 and bf16)."""
    names: set[str] = set()
    if dtype == torch.float16:
        names |= set(getattr(model, "_keep_in_fp32_modules", None) or [])
    if dtype in (torch.float16, torch.bfloat16):
        names |= set(getattr(model, "_keep_in_fp32_modules_strict", None) or [])
    return [re.compile(rf"(^|\.){re.escape(n)}(\.|$)") for n in sorted(names)]
