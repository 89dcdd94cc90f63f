"""A tiny random Llama GGUF with the embedded SmolLM2's real tokenizer, for tests of GGUF conversion.

Converting the real SmolLM2 GGUF takes from under a minute to several minutes on a shared CPU; this file
converts through the very same code path (``transformers`` reads the GGUF, dequantizes, builds the
tokenizer from the GGUF's vocabulary and merges) in a few seconds. Tensor layout and names follow
llama.cpp's ``llama`` architecture as the SmolLM2 GGUF has them; the weights are random F32.
"""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np

HIDDEN = 64
FFN = 128
HEADS = 4
KV_HEADS = 2

# Tokenizer keys copied as they are from the source GGUF (strings, ids, bools, arrays).
_TOKENIZER_KEYS = (
    "tokenizer.ggml.model", "tokenizer.ggml.pre", "tokenizer.ggml.tokens", "tokenizer.ggml.token_type",
    "tokenizer.ggml.merges", "tokenizer.ggml.bos_token_id", "tokenizer.ggml.eos_token_id",
    "tokenizer.ggml.unknown_token_id", "tokenizer.ggml.padding_token_id", "tokenizer.ggml.add_bos_token",
    "tokenizer.ggml.add_space_prefix", "tokenizer.chat_template",
)
# Cut to the first ``vocab_size`` tokens (specials and bytes come first) with the merges that stay valid.
_VOCAB_KEYS = ("tokenizer.ggml.tokens", "tokenizer.ggml.token_type", "tokenizer.ggml.merges")


def build_tiny_gguf(out_path: Path, source_gguf: Path, num_layers: int = 2, vocab_size: int = 2048,
                    seed: int = 0) -> Path:
    """Write a ``num_layers``-layer random Llama GGUF whose tokenizer is ``source_gguf``'s; returns the path."""
    import gguf

    out_path = Path(out_path)
    if out_path.exists():
        return out_path
    reader = gguf.GGUFReader(source_gguf)
    tokens = reader.fields["tokenizer.ggml.tokens"].contents()[:vocab_size]
    kept = set(tokens)
    # BPE stays consistent when a merge is kept only if its parts and its result are all in the vocabulary.
    merges = [m for m in reader.fields["tokenizer.ggml.merges"].contents()
              if m.replace(" ", "", 1) in kept and all(part in kept for part in m.split(" ", 1))]
    vocab = len(tokens)
    rng = np.random.default_rng(seed)
    tmp = out_path.with_name(f"{out_path.name}.{os.getpid()}.tmp")  # two pytest workers may build it at once
    tmp.parent.mkdir(parents=True, exist_ok=True)
    writer = gguf.GGUFWriter(tmp, arch="llama")
    writer.add_name("tiny-random-llama")
    writer.add_block_count(num_layers)
    writer.add_context_length(2048)
    writer.add_embedding_length(HIDDEN)
    writer.add_feed_forward_length(FFN)
    writer.add_head_count(HEADS)
    writer.add_head_count_kv(KV_HEADS)
    writer.add_rope_freq_base(100000.0)
    writer.add_layer_norm_rms_eps(1e-5)
    writer.add_vocab_size(vocab)
    writer.add_rope_dimension_count(HIDDEN // HEADS)
    writer.add_file_type(gguf.LlamaFileType.ALL_F32)
    writer.add_token_list(tokens)
    writer.add_token_types(reader.fields["tokenizer.ggml.token_type"].contents()[:vocab_size])
    writer.add_token_merges(merges)
    for key in _TOKENIZER_KEYS:
        field = reader.fields.get(key)
        if field is None or key in _VOCAB_KEYS:
            continue
        value_type = field.types[0]
        if value_type == gguf.GGUFValueType.ARRAY:
            writer.add_key_value(key, field.contents(), value_type, sub_type=field.types[-1])
        else:
            writer.add_key_value(key, field.contents(), value_type)

    def weight(*shape: int) -> np.ndarray:
        return (rng.standard_normal(shape) * 0.02).astype(np.float32)

    # numpy shapes are [out, in] as in PyTorch; GGUF stores them reversed, which the writer does.
    writer.add_tensor("token_embd.weight", weight(vocab, HIDDEN))
    head_dim = HIDDEN // HEADS
    for i in range(num_layers):
        writer.add_tensor(f"blk.{i}.attn_norm.weight", np.ones(HIDDEN, dtype=np.float32))
        writer.add_tensor(f"blk.{i}.ffn_norm.weight", np.ones(HIDDEN, dtype=np.float32))
        writer.add_tensor(f"blk.{i}.attn_q.weight", weight(HIDDEN, HIDDEN))
        writer.add_tensor(f"blk.{i}.attn_k.weight", weight(KV_HEADS * head_dim, HIDDEN))
        writer.add_tensor(f"blk.{i}.attn_v.weight", weight(KV_HEADS * head_dim, HIDDEN))
        writer.add_tensor(f"blk.{i}.attn_output.weight", weight(HIDDEN, HIDDEN))
        writer.add_tensor(f"blk.{i}.ffn_gate.weight", weight(FFN, HIDDEN))
        writer.add_tensor(f"blk.{i}.ffn_up.weight", weight(FFN, HIDDEN))
        writer.add_tensor(f"blk.{i}.ffn_down.weight", weight(HIDDEN, FFN))
    writer.add_tensor("output_norm.weight", np.ones(HIDDEN, dtype=np.float32))
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    tmp.rename(out_path)
    return out_path
