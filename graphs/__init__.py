"""Graph signatures shared by the exporter and the runtime (installed as `speccompile.graphs`).

The decoder graph is the one contract every model in a bundle follows (target, draft model, early-exit draft),
so the runtime drives any of them with the same code:

inputs
  input_ids        int64   [1, S]             tokens of this step (prefill chunk, one decode token, or tree nodes)
  position_ids     int64   [1, S]             rotary position of each token (tree nodes: committed length + depth)
  seqlens_k        int32   [1]                committed length + S - 1 (the fused kernel's convention)
  attention_bias   float32 [1, 1, S, LMAX]    0 where a token may attend a cache slot, -inf elsewhere
  logits_index     int64   [R]                rows of the step whose logits are wanted (last row, or all nodes)
  past_key.{i}     float32 [1, Hkv, LMAX, D]  static KV cache; bound to the same buffer as present_key.{i}
  past_value.{i}   float32 [1, Hkv, LMAX, D]
  hidden_in        float32 [1, S, H]          (MTP draft heads only) the target's hidden state before each token
outputs
  logits           float32 [R, V]
  next_token       int64   [R]                argmax of logits, computed in the graph (greedy needs no logits copy)
  hidden_states    float32 [S, H]             the residual stream before the final norm (what draft heads read)
  present_key.{i}, present_value.{i}          the caches, written in place at slots [seqlens_k+1-S, seqlens_k]
"""
from __future__ import annotations

DECODER_GRAPH_VERSION = 2


def decoder_signature(num_layers: int, num_kv_heads: int, head_dim: int, max_seq_len: int, vocab_size: int,
                      hidden_size: int, mtp: bool = False):
    """(inputs, outputs): lists of (name, dtype, shape); symbolic dims are strings. An MTP draft head has the
    same signature plus the input `hidden_in` (the target's hidden state, one row per token)."""
    cache = [1, num_kv_heads, max_seq_len, head_dim]
    inputs = [("hidden_in", "float32", [1, "S", hidden_size])] if mtp else []
    inputs += [
        ("input_ids", "int64", [1, "S"]),
        ("position_ids", "int64", [1, "S"]),
        ("seqlens_k", "int32", [1]),
        ("attention_bias", "float32", [1, 1, "S", max_seq_len]),
        ("logits_index", "int64", ["R"]),
    ]
    outputs = [("logits", "float32", ["R", vocab_size]), ("next_token", "int64", ["R"]),
               ("hidden_states", "float32", ["S", hidden_size])]
    for i in range(num_layers):
        inputs += [(f"past_key.{i}", "float32", cache), (f"past_value.{i}", "float32", cache)]
        outputs += [(f"present_key.{i}", "float32", cache), (f"present_value.{i}", "float32", cache)]
    return inputs, outputs


def cache_bindings(num_layers: int):
    """Pairs (input, output) that must be bound to one buffer so the cache is updated in place."""
    pairs = []
    for i in range(num_layers):
        pairs += [(f"past_key.{i}", f"present_key.{i}"), (f"past_value.{i}", f"present_value.{i}")]
    return pairs
