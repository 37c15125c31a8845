"""Draft heads that run one decoder block with its own KV cache on the target's features (speccompile.graphs'
MTP head signature: input_ids and hidden_in in, logits, next_token and hidden_states out), each drafting several
tokens ahead by reading its own output back. They differ only in how the block's input is made and whether its
output is normalised:

    MTP (DeepSeek-V3)  z = eh_proj([enorm(embed(x)); hnorm(h)]);  block(z);  norm;  the target's head
    EAGLE-1/2          z = fc([embed(x); h]) (+ bias; HASS: both halves normalised);  block without input norm;
                       no norm;  the target's head
    EAGLE-3            attention on [input_layernorm(embed(x)); hidden_norm(f)], residual f;  norm;  own head over a
                       draft vocabulary mapped back by d2t.  Its fc over the target's three layers is its own graph.

Weights are named mtp.* (speccompile.compile.weights for MTP, speccompile.compile.drafters.eagle for EAGLE); the embedding,
RoPE tables and, without a head of its own, the output head are the target's.
"""
from __future__ import annotations

import numpy as np

from speccompile.compile.config import ModelConfig
from speccompile.compile.graph.head_screen import embedding
from speccompile.compile.graph.layers import Stack, close_graph, decoder_layers, open_graph, packed_ids
from speccompile.compile.graph.linear import matmul
from speccompile.compile.graph.output import draft_head, greedy_token, hidden_outputs
from speccompile.compile.weights.names import layer_of
from speccompile.graphs import decoder_signature
from speccompile.graphs.builder import GraphBuilder
from speccompile.plugins import tree_attention


def build_mtp_head(cfg: ModelConfig, weights: dict[str, np.ndarray], max_seq_len: int, attention: str = "ort",
                   fused: bool = True, name: str = "mtp_head", normed_hidden: bool = False,
                   batched: bool = False) -> GraphBuilder:
    """normed_hidden: the hidden states it outputs (what it reads at the next depth) after its final norm, not
    before (DeepSeek-V3's own layer, which reads the target's output after the final norm). batched: the batched
    form (speccompile.graphs), each head of this module the same."""
    s, signature = _open_head(name, cfg, weights, max_seq_len, attention, fused, batched)
    g, W = s.g, s.W
    e = _embedding(s)
    both = g.op("Concat", [s.norm(e, W["mtp.enorm"]), s.norm("hidden_in", W["mtp.hnorm"])], axis=-1)[0]
    z = matmul(g, both, W, "mtp.eh_proj")
    return _close_head(s, signature, s.norm(z, W["mtp.l0.attn_norm"]), z, W["mtp.norm"], normed_hidden)


def build_eagle_head(cfg: ModelConfig, weights: dict[str, np.ndarray], max_seq_len: int, attention: str = "ort",
                     fused: bool = True, name: str = "eagle_head", batched: bool = False) -> GraphBuilder:
    """EAGLE-1/2: the block's first layer has no input norm (its input is z) and its output is fed on as it is."""
    s, signature = _open_head(name, cfg, weights, max_seq_len, attention, fused, batched)
    g, W = s.g, s.W
    e = _embedding(s)
    e, f = (s.norm(e, W["mtp.enorm"]), s.norm("hidden_in", W["mtp.hnorm"])) if "mtp.enorm" in W else (e, "hidden_in")
    z = matmul(g, g.op("Concat", [e, f], axis=-1)[0], W, "mtp.fc")
    if "mtp.fc_bias" in W:
        z = g.op("Add", [z, W["mtp.fc_bias"]])[0]
    return _close_head(s, signature, z, z, None)


def build_eagle3_head(cfg: ModelConfig, weights: dict[str, np.ndarray], max_seq_len: int, attention: str = "ort",
                      fused: bool = True, name: str = "eagle3_head",
                      norm_before_residual: bool = False, batched: bool = False) -> GraphBuilder:
    """EAGLE-3: hidden_in is the fused feature f (build_eagle3_fc's output, or the head's own previous output).
    norm_before_residual (vLLM's variant): the residual is hidden_norm(f) instead of f."""
    s, signature = _open_head(name, cfg, weights, max_seq_len, attention, fused, batched)
    g, W = s.g, s.W
    e = _embedding(s)
    f = s.norm("hidden_in", W["mtp.hidden_norm"])
    x = g.op("Concat", [s.norm(e, W["mtp.l0.attn_norm"]), f], axis=-1)[0]
    return _close_head(s, signature, x, f if norm_before_residual else "hidden_in", W["mtp.norm"])


def build_eagle3_fc(target: ModelConfig, head: ModelConfig, fc: np.ndarray) -> GraphBuilder:
    """EAGLE-3's fc alone: aux_hidden_states [S, 3H_target] (the target's three layers) -> hidden [S, H]. Run when
    target rows are committed (as vLLM's combine_hidden_states), so the head graph keeps one feature width."""
    g = GraphBuilder("eagle3_fc")
    g.input("aux_hidden_states", "float32", ["S", 3 * target.hidden_size])
    g.op("MatMul", ["aux_hidden_states", g.weight("mtp.eagle3.fc", fc)], outputs=["hidden"])
    g.output("hidden", "float32", ["S", head.hidden_size])
    return g


def _open_head(name, cfg, weights, max_seq_len, attention, fused, batched) -> tuple[Stack, tuple]:
    """A head graph's inputs and weights. Of the target's screen it reads the int8 matrix (an int8 head over the
    full vocabulary scores with it) and the int8 rows (a tied embedding's, graph/head_screen.head_rows) only."""
    vocab = len(weights["mtp.d2t"]) if "mtp.d2t" in weights else cfg.vocab_size
    signature = decoder_signature(1, cfg.cache_kv_heads, cfg.cache_head_dim, max_seq_len, vocab, cfg.hidden_size,
                                  True, False, aux_width=0, screen=False, batched=batched,
                                  scratch=tree_attention.scratch_slots(attention))

    def keep(k):
        return ((layer_of(k) is None or layer_of(k) < 1)
                and (not k.startswith("head_screen.") or k in ("head_screen.codes", "head_screen.scales",
                                                               "head_screen.rows")))

    return open_graph(name, cfg, signature, weights, keep, attention, fused), signature


def _embedding(s: Stack) -> str:
    """The embedding of the step's tokens (a batched graph's real rows, packed)."""
    ids = packed_ids(s.g) if s.query_seqlens else "input_ids"
    if "mtp.embed" in s.W:
        return s.g.op("Gather", [s.W["mtp.embed"], ids], axis=0)[0]
    return embedding(s.g, s.W, ids)  # the target's


def _close_head(s: Stack, signature, x: str, h: str, final_norm: str | None,
                normed_hidden: bool = False) -> GraphBuilder:
    """The head's block on x (attention input) and h (residual), then its output head; final_norm None: none.
    normed_hidden: its hidden_states output after the final norm."""
    x, h, _ = decoder_layers(s, "mtp.", 1, x, h, final_norm)
    rows, _ = hidden_outputs(s.g, x, x if normed_hidden else h)
    greedy_token(s.g, draft_head(s.g, rows, s.W), s.W.get("mtp.d2t"))
    return close_graph(s, signature)
