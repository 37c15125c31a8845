"""EAGLE draft heads from their public safetensors layouts: EAGLE-1/2 (`eagle:PATH`) and EAGLE-3 (`eagle3:PATH`).

Both are one Llama-style decoder block with its own KV cache that reads the target's features and, applied to its
own output, drafts several tokens ahead (like an MTP head; the drafter is drafters/eagle.py). A pair (f_t,
x_{t+1}) -- the feature of position t and the next token -- predicts x_{t+2}.

EAGLE-1/2 (SafeAILab/EAGLE `cnets1.py`, vLLM `llama_eagle.py`):
    f_t   = the target's last hidden state *after* its final norm (what its lm_head reads)
    z     = fc([embed(x_{t+1}); f_t])              fc.weight [H, 2H], fc.bias [H] optional
    out   = block(z)                               layers.0.*; layer 0 has no input_layernorm (the input is z)
    logits = target lm_head(out)                   no norm; out is fed back as the next feature
  Optional: embed_tokens.weight (else the target's); embedding_layernorm / hidden_states_layernorm (vLLM's HASS
  variant, `add_para_norm`) normalise the two halves before fc.

EAGLE-3 (SafeAILab/EAGLE `cnets.py`, vLLM `llama_eagle3.py`):
    f_t   = fc([h_a; h_b; h_c])                     fc.weight [H, 3H_target], no bias; h_i = the target's residual
                                                    stream entering layer i, for the three ids of
                                                    `eagle_aux_hidden_state_layer_ids` (default 2, L//2, L-3),
                                                    concatenated in ascending layer order
    a     = attn([input_layernorm(embed(x)); hidden_norm(f)])   q/k/v_proj [*, 2H]
    out   = mlp-block(f + a)                       midlayer.* (or layers.0.*); out is fed back as the next feature,
                                                   without fc (fc only fuses the target's layers)
    logits = lm_head(norm(out))                    own norm and lm_head over a draft vocabulary of Vd tokens;
                                                   d2t[d] = target id - d  (t2d is ignored)
  `norm_before_residual` (vLLM) makes the residual hidden_norm(f) instead of f.

The target graph gains the output `aux_hidden_states` with the features every EAGLE head of the bundle needs
(`speccompile.graphs`); EAGLE-3's fc runs as its own small graph when target rows are committed (as vLLM's
`combine_hidden_states`), so the head graph keeps the MTP head's signature and one feature width.
"""
from __future__ import annotations

import numpy as np

from speccompile.compile.checkpoint import EagleHead
from speccompile.compile.config import ModelConfig
from speccompile.errors import CheckpointError, SpeccompileError, UnsupportedModelError
from speccompile.compile.int8 import matmul
from speccompile.graphs.builder import GraphBuilder


def lower_eagle_head(head: EagleHead, target: ModelConfig, hcfg: ModelConfig, target_w: dict[str, np.ndarray],
                     max_seq_len: int) -> tuple[dict[str, np.ndarray], np.ndarray | None]:
    """Check and pack a head into graph weights (mtp.* names, as the MTP head graph reads them; EAGLE-3's fc as
    `eagle3.fc`). Returns (weights, draft-to-target token ids or None)."""
    label = "EAGLE-3" if head.version == "eagle3" else "EAGLE"
    t, e3 = head.tensors, head.version == "eagle3"
    H, I, q, kv, V = hcfg.hidden_size, hcfg.intermediate_size, hcfg.q_size, hcfg.kv_size, target.vocab_size
    Hin = 2 * H if e3 else H

    def get(name, shape, optional=False):
        if name not in t:
            if optional:
                return None
            hint = " (midlayer.* in EAGLE-3's own files)" if e3 and name.startswith("layers.0.") else ""
            raise CheckpointError(f"{label} head {head.path} is missing tensor {name!r}{hint}")
        a = np.ascontiguousarray(t[name], np.float32)
        if tuple(a.shape) != tuple(shape):
            raise CheckpointError(f"{label} head {head.path}: tensor {name!r} has shape {tuple(a.shape)}, "
                                  f"expected {tuple(shape)}")
        return a

    p = "layers.0."
    wq, wk, wv = (get(p + f"self_attn.{x}_proj.weight", (n, Hin)) for x, n in (("q", q), ("k", kv), ("v", kv)))
    w = {"mtp.l0.qkv": np.ascontiguousarray(np.concatenate([wq, wk, wv], 0).T),
         "mtp.l0.o": np.ascontiguousarray(get(p + "self_attn.o_proj.weight", (H, q)).T),
         "mtp.l0.mlp_norm": get(p + "post_attention_layernorm.weight", (H,)),
         "mtp.l0.gate": np.ascontiguousarray(get(p + "mlp.gate_proj.weight", (I, H)).T),
         "mtp.l0.up": np.ascontiguousarray(get(p + "mlp.up_proj.weight", (I, H)).T),
         "mtp.l0.down": np.ascontiguousarray(get(p + "mlp.down_proj.weight", (H, I)).T)}
    if hcfg.qkv_bias:
        w["mtp.l0.qkv_bias"] = np.concatenate([get(p + f"self_attn.{x}_proj.bias", (n,))
                                               for x, n in (("q", q), ("k", kv), ("v", kv))])
    embed = get("embed_tokens.weight", (V, H), optional=True)
    target_embed = target_w["embed"]
    if embed is not None and not (embed.shape == target_embed.shape and np.array_equal(embed, target_embed)):
        w["mtp.embed"] = embed
    elif embed is None and H != target.hidden_size:
        raise CheckpointError(f"{label} head {head.path}: hidden size {H} differs from the target's "
                              f"({target.hidden_size}), so it needs its own 'embed_tokens.weight'")
    d2t = None
    if e3:
        w["mtp.eagle3.fc"] = np.ascontiguousarray(get("fc.weight", (H, 3 * target.hidden_size)).T)
        w["mtp.l0.attn_norm"] = get(p + "input_layernorm.weight", (H,))
        w["mtp.hidden_norm"] = get(p + "hidden_norm.weight", (H,))
        w["mtp.norm"] = get("norm.weight", (H,))
        if "lm_head.weight" not in t:
            raise CheckpointError(f"{label} head {head.path} is missing tensor 'lm_head.weight'")
        Vd = int(t["lm_head.weight"].shape[0])
        w["mtp.head"] = get("lm_head.weight", (Vd, H))
        if "d2t" in t:
            off = np.asarray(t["d2t"], np.int64)
            if off.shape != (Vd,):
                raise CheckpointError(f"{label} head {head.path}: tensor 'd2t' has shape {off.shape}, expected "
                                      f"({Vd},) (one offset per lm_head row)")
            d2t = np.arange(Vd, dtype=np.int64) + off
            if d2t.min() < 0 or d2t.max() >= V or len(np.unique(d2t)) != Vd:
                raise CheckpointError(f"{label} head {head.path}: d2t maps draft tokens outside the target's "
                                      f"vocabulary of {V} (or two to one target token)")
        elif Vd != V:
            raise CheckpointError(f"{label} head {head.path}: lm_head has {Vd} rows but the target's vocabulary "
                                  f"has {V}, and there is no 'd2t' tensor to map them")
        if d2t is not None and Vd == V and (d2t == np.arange(V)).all():
            d2t = None
        if d2t is not None:
            w["mtp.d2t"] = d2t
    else:
        if H != target.hidden_size:
            raise UnsupportedModelError(f"{label} head {head.path}: hidden size {H} differs from the target's")
        w["mtp.fc"] = np.ascontiguousarray(get("fc.weight", (H, 2 * H)).T)
        bias = get("fc.bias", (H,), optional=True)
        if bias is not None:
            w["mtp.fc_bias"] = bias
        en, hn = (get(n + ".weight", (H,), optional=True) for n in ("embedding_layernorm", "hidden_states_layernorm"))
        if (en is None) != (hn is None):
            raise CheckpointError(f"{label} head {head.path}: embedding_layernorm and hidden_states_layernorm come "
                                  "together (HASS)")
        if en is not None:
            w["mtp.enorm"], w["mtp.hnorm"] = en, hn
    if (hcfg.head_dim, hcfg.rope_theta) != (target.rope_dim, target.rope_theta):
        from speccompile.plugins import tree_attention
        w["mtp.rope.cos"], w["mtp.rope.sin"] = tree_attention.rope_tables(max_seq_len, hcfg.head_dim,
                                                                          hcfg.rope_theta)
    return w, d2t


def emit_head_input(g: GraphBuilder, W: dict, head: str, norm, h: str, norm_before_residual: bool = False):
    """The head's block input from the token embedding `h` and the feature `hidden_in`. Returns (x, residual):
    x the attention's input (None: normalise the residual as a Llama block does), residual the stream the block
    adds to."""
    if head == "eagle":
        e, f = (norm(h, W["mtp.enorm"]), norm("hidden_in", W["mtp.hnorm"])) if "mtp.enorm" in W else (h, "hidden_in")
        z = matmul(g, g.op("Concat", [e, f], axis=-1)[0], W, "mtp.fc")
        if "mtp.fc_bias" in W:
            z = g.op("Add", [z, W["mtp.fc_bias"]])[0]
        return z, z  # EAGLE-1's first layer has no input norm
    if head == "eagle3":
        f = norm("hidden_in", W["mtp.hidden_norm"])
        x = g.op("Concat", [norm(h, W["mtp.l0.attn_norm"]), f], axis=-1)[0]
        return x, (f if norm_before_residual else "hidden_in")
    raise SpeccompileError(f"unknown draft head kind {head!r}")


def build_fuse_graph(target: ModelConfig, hcfg: ModelConfig, fc: np.ndarray) -> GraphBuilder:
    """EAGLE-3's fc alone: aux_hidden_states [S, 3H_target] (the target's three layers) -> hidden [S, H]."""
    g = GraphBuilder("eagle3_fc")
    g.input("aux_hidden_states", "float32", ["S", 3 * target.hidden_size])
    g.op("MatMul", ["aux_hidden_states", g.weight("mtp.eagle3.fc", fc)], outputs=["hidden"])
    g.output("hidden", "float32", ["S", hcfg.hidden_size])
    return g
