"""The decoder graph (speccompile.graphs.decoder_signature): the target, an early exit over its first layers, or a
separate draft model. An early exit references the target's weight names, so it costs no extra weights."""
from __future__ import annotations

import numpy as np

from speccompile.compile.config import ModelConfig
from speccompile.compile.graph.head_screen import embedding, emit_screened_head, float32_product
from speccompile.compile.graph.layers import Stack, close_graph, decoder_layers, open_graph, packed_ids
from speccompile.compile.graph.output import float_head, greedy_token, hidden_outputs
from speccompile.compile.graph.verify import emit_verify, sampling_flag
from speccompile.compile.weights.names import layer_of
from speccompile.graphs import decoder_signature
from speccompile.graphs.builder import GraphBuilder
from speccompile.plugins import tree_attention


def build_decoder(cfg: ModelConfig, weights: dict[str, np.ndarray], max_seq_len: int, num_layers: int | None = None,
                  attention: str = "ort", fused: bool = True, name: str = "decoder", verify: bool = False,
                  aux_layers: list | None = None, batched: bool = False, head_screen: bool = True) -> GraphBuilder:
    """embedding -> the first `num_layers` layers (all by default) -> final norm -> output head.

    attention: the TreeAttention lowering ("ort" fused kernel, "reference" standard ops, "plugin" one node).
    fused: onnxruntime's fused residual+RMSNorm kernels; False keeps to standard ONNX ops only.
    verify: the target's in-graph acceptance (graph/verify.py), and its exact greedy head (graph/head_screen.py)
          where the weights have the screen's tensors and the graph is fused (MatMulNBits is onnxruntime's).
    aux_layers: add the output aux_hidden_states, the features EAGLE heads read (graph/output.hidden_outputs).
    batched: the batched form of speccompile.graphs (several sequence slots per pass; acceptance on the host), with
          the exact greedy head where the weights have its tensors and the graph is fused.
    head_screen: False keeps the float32 head whatever the weights hold (a drafter's batched form, whose drafts read
          the logits: computed as its own graph computes them).
    """
    L = cfg.num_hidden_layers if num_layers is None else num_layers
    screen = (verify or batched) and fused and head_screen and "head_screen.codes" in weights
    signature = decoder_signature(L, cfg.cache_kv_heads, cfg.cache_head_dim, max_seq_len, cfg.vocab_size,
                                  cfg.hidden_size, False, verify, aux_width=len(aux_layers or ()) * cfg.hidden_size,
                                  screen=screen, batched=batched, scratch=tree_attention.scratch_slots(attention))

    # a head on the int8 grid (head_screen.rows: the kernels' build of a Q8_0 head) gives a graph without the screen
    # (an early exit) its rows and float32 product too (head_screen.head_rows, float32_product): no float32 head read
    rows_head = fused and "head_screen.rows" in weights

    def keep(k):  # the first L layers' weights; the screen's only where the graph has it
        if k.startswith("head_screen."):
            return screen or rows_head and k in ("head_screen.rows", "head_screen.codes")
        return layer_of(k) is None or layer_of(k) < L

    s = open_graph(name, cfg, signature, weights, keep, attention, fused)
    h = embedding(s.g, s.W, packed_ids(s.g) if batched else "input_ids")
    if cfg.embed_scale != 1:  # Gemma: embeddings times sqrt(hidden_size); the tied output head is unscaled
        h = s.g.op("Mul", [h, s.g.const(np.array(cfg.embed_scale, np.float32))])[0]
    x = s.norm(h, s.W["l0.attn_norm"]) if L else h
    x, h, taps = decoder_layers(s, "", L, x, h, s.W["final_norm"])
    if not L:
        x = s.norm(h, s.W["final_norm"])
    rows, batch = hidden_outputs(s.g, x, h, taps, aux_layers)
    if batched and screen:
        exact = s.g.op("Squeeze", ["full_logits", batch])[0]
        emit_screened_head(s.g, rows, s.W.get("lm_head", s.W["embed"]), s.W, s.g.op("Not", [exact])[0],
                           noise="sample_noise", top_k="noise_top_k")
    elif verify:
        _verified_head(s, rows, batch, screen)
    else:
        head = s.W.get("lm_head", s.W["embed"])
        greedy_token(s.g, float32_product(s.g, rows, head, s.W, "logits") if rows_head else
                     float_head(s.g, rows, head))
    return close_graph(s, signature)


def _verified_head(s: Stack, rows: str, batch: str, screen: bool) -> None:
    """The target's head and acceptance. With the screen, greedy passes that ask for no exact logits (input
    full_logits) take the int8 screen, passes sampled by noise (input sample_noise) included."""
    g, head = s.g, s.W.get("lm_head", s.W["embed"])
    sampling = sampling_flag(g)
    if screen:
        exact = g.op("Squeeze", ["full_logits", batch])[0]
        emit_screened_head(g, rows, head, s.W, g.op("Not", [g.op("Or", [exact, sampling])[0]])[0],
                           noise="sample_noise", top_k="noise_top_k")
    else:
        greedy_token(g, float_head(g, rows, head))
    emit_verify(g, "logits", "next_token", sampling, kernel=s.kernels)
