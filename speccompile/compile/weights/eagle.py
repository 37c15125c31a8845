"""EAGLE heads' weights (speccompile.compile.drafters.eagle reads the files; graph/draft_heads.py runs them): checked and
packed into mtp.* names, as the head graphs read them, and EAGLE-3's fc as mtp.eagle3.fc."""
from __future__ import annotations

import numpy as np

from speccompile.compile.config import ModelConfig
from speccompile.errors import CheckpointError, UnsupportedModelError
from speccompile.compile.rope import rope_tables


class _HeadTensors:
    """A head's tensors (a checkpoint.EagleHead's), read as float32 with errors naming the head and the tensor."""
    def __init__(self, head):
        self.label = "EAGLE-3" if head.version == "eagle3" else "EAGLE"
        self.path, self.t, self.e3 = head.path, head.tensors, head.version == "eagle3"

    def error(self, message: str) -> CheckpointError:
        return CheckpointError(f"{self.label} head {self.path}{message}")

    def get(self, name: str, shape, optional: bool = False) -> np.ndarray | None:
        if name not in self.t:
            if optional:
                return None
            hint = " (midlayer.* in EAGLE-3's own files)" if self.e3 and name.startswith("layers.0.") else ""
            raise self.error(f" is missing tensor {name!r}{hint}")
        a = np.ascontiguousarray(self.t[name], np.float32)
        if tuple(a.shape) != tuple(shape):
            raise self.error(f": tensor {name!r} has shape {tuple(a.shape)}, expected {tuple(shape)}")
        return a


def lower_eagle_head(head, target: ModelConfig, hcfg: ModelConfig, target_w: dict[str, np.ndarray],
                     max_seq_len: int) -> tuple[dict[str, np.ndarray], np.ndarray | None]:
    """Check and pack a head (a checkpoint.EagleHead) into graph weights (mtp.* names, as the head graphs read them;
    EAGLE-3's fc as `mtp.eagle3.fc`). Returns (weights, draft-to-target token ids or None)."""
    t = _HeadTensors(head)
    w = _block(t, hcfg) | _embedding(t, hcfg, target, target_w)
    d2t = None
    if t.e3:
        w, d2t = _eagle3_parts(t, hcfg, target, w)
    else:
        w |= _eagle1_parts(t, hcfg, target)
    if (hcfg.rope_dim, hcfg.rope) != (target.rope_dim, target.rope):  # the head's own tables (rope.py)
        w["mtp.rope.cos"], w["mtp.rope.sin"] = rope_tables(hcfg.rope, hcfg.rope_dim, max_seq_len,
                                                           target.max_position_embeddings)
    return w, d2t


def _block(t: _HeadTensors, hcfg: ModelConfig) -> dict[str, np.ndarray]:
    """The decoder block (layers.0.*); EAGLE-3's q/k/v read [embedding; feature], 2H wide."""
    H, I, q, kv = hcfg.hidden_size, hcfg.intermediate_size, hcfg.q_size, hcfg.kv_size
    Hin, p = 2 * H if t.e3 else H, "layers.0."
    wq, wk, wv = (t.get(p + f"self_attn.{x}_proj.weight", (n, Hin)) for x, n in (("q", q), ("k", kv), ("v", kv)))
    w = {"mtp.l0.qkv": np.ascontiguousarray(np.concatenate([wq, wk, wv], 0).T),
         "mtp.l0.o": np.ascontiguousarray(t.get(p + "self_attn.o_proj.weight", (H, q)).T),
         "mtp.l0.mlp_norm": t.get(p + "post_attention_layernorm.weight", (H,)),
         "mtp.l0.gate": np.ascontiguousarray(t.get(p + "mlp.gate_proj.weight", (I, H)).T),
         "mtp.l0.up": np.ascontiguousarray(t.get(p + "mlp.up_proj.weight", (I, H)).T),
         "mtp.l0.down": np.ascontiguousarray(t.get(p + "mlp.down_proj.weight", (H, I)).T)}
    if hcfg.qkv_bias:
        w["mtp.l0.qkv_bias"] = np.concatenate([t.get(p + f"self_attn.{x}_proj.bias", (n,))
                                               for x, n in (("q", q), ("k", kv), ("v", kv))])
    return w


def _embedding(t: _HeadTensors, hcfg: ModelConfig, target: ModelConfig, target_w) -> dict[str, np.ndarray]:
    """The head's own embedding where it has one that differs from the target's (else the target's is shared)."""
    H = hcfg.hidden_size
    embed = t.get("embed_tokens.weight", (target.vocab_size, H), optional=True)
    target_embed = target_w["embed"]
    if embed is not None and not (embed.shape == target_embed.shape and np.array_equal(embed, target_embed)):
        return {"mtp.embed": embed}
    if embed is None and H != target.hidden_size:
        raise t.error(f": hidden size {H} differs from the target's ({target.hidden_size}), so it needs its own "
                      "'embed_tokens.weight'")
    return {}


def _eagle3_parts(t: _HeadTensors, hcfg: ModelConfig, target: ModelConfig, w: dict):
    """fc over the target's three layers, the input and feature norms, its own norm and output head, and d2t (the
    draft vocabulary's target ids, None when it is the target's whole vocabulary in order)."""
    H, V, p = hcfg.hidden_size, target.vocab_size, "layers.0."
    w = w | {"mtp.eagle3.fc": np.ascontiguousarray(t.get("fc.weight", (H, 3 * target.hidden_size)).T),
             "mtp.l0.attn_norm": t.get(p + "input_layernorm.weight", (H,)),
             "mtp.hidden_norm": t.get(p + "hidden_norm.weight", (H,)), "mtp.norm": t.get("norm.weight", (H,))}
    if "lm_head.weight" not in t.t:
        raise t.error(" is missing tensor 'lm_head.weight'")
    Vd = int(t.t["lm_head.weight"].shape[0])
    if Vd == 0:
        raise t.error(": tensor 'lm_head.weight' has no rows (a draft vocabulary of no tokens)")
    w["mtp.head"] = t.get("lm_head.weight", (Vd, H))
    d2t = None
    if "d2t" in t.t:
        off = np.asarray(t.t["d2t"], np.int64)
        if off.shape != (Vd,):
            raise t.error(f": tensor 'd2t' has shape {off.shape}, expected ({Vd},) (one offset per lm_head row)")
        d2t = np.arange(Vd, dtype=np.int64) + off
        if d2t.min() < 0 or d2t.max() >= V or len(np.unique(d2t)) != Vd:
            raise t.error(f": d2t maps draft tokens outside the target's vocabulary of {V} (or two to one target "
                          "token)")
    elif Vd != V:
        raise t.error(f": lm_head has {Vd} rows but the target's vocabulary has {V}, and there is no 'd2t' tensor "
                      "to map them")
    if d2t is not None and Vd == V and (d2t == np.arange(V)).all():
        d2t = None
    if d2t is not None:
        w["mtp.d2t"] = d2t
    return w, d2t


def _eagle1_parts(t: _HeadTensors, hcfg: ModelConfig, target: ModelConfig) -> dict[str, np.ndarray]:
    """fc [embedding; feature] -> H (+ bias), and HASS's two input norms when the head has them."""
    H = hcfg.hidden_size
    if H != target.hidden_size:
        raise UnsupportedModelError(f"{t.label} head {t.path}: hidden size {H} differs from the target's")
    w = {"mtp.fc": np.ascontiguousarray(t.get("fc.weight", (H, 2 * H)).T)}
    bias = t.get("fc.bias", (H,), optional=True)
    if bias is not None:
        w["mtp.fc_bias"] = bias
    en, hn = (t.get(n + ".weight", (H,), optional=True) for n in ("embedding_layernorm", "hidden_states_layernorm"))
    if (en is None) != (hn is None):
        raise t.error(": embedding_layernorm and hidden_states_layernorm come together (HASS)")
    if en is not None:
        w["mtp.enorm"], w["mtp.hnorm"] = en, hn
    return w
