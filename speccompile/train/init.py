"""A head's starting weights, from the target's last decoder layer (and how the record describes them)."""
from __future__ import annotations

import math
import os

import torch

from speccompile.train.checkpoints import load_final
from speccompile.train.heads import Head
from speccompile.train.target import output_head

LAYER_TENSORS = {"ln1": "input_layernorm.weight", "ln2": "post_attention_layernorm.weight",
                 "q": "self_attn.q_proj.weight", "k": "self_attn.k_proj.weight", "v": "self_attn.v_proj.weight",
                 "o": "self_attn.o_proj.weight", "gate": "mlp.gate_proj.weight", "up": "mlp.up_proj.weight",
                 "down": "mlp.down_proj.weight"}


def _init_eagle3(head: Head, tensors: dict, last: str, g: torch.Generator) -> None:
    """Attention's feature half = the target's last layer on its own normalized input (hidden_norm takes that
    layer's input norm), its embedding half small random; f = fc(...) starts as the highest tap's residual stream
    (the other taps at zero: they carry the target's massive activations)."""
    H = head.ln2.shape[0]
    for k in ("q", "k", "v"):
        w = torch.as_tensor(tensors[last + LAYER_TENSORS[k]]).float()
        getattr(head, k).copy_(torch.cat([torch.randn(w.shape, generator=g) * (0.5 * float(w.std())), w], 1))
    head.hnorm.copy_(torch.as_tensor(tensors[last + LAYER_TENSORS["ln1"]]))
    head.ln_e.fill_(1.0)
    fc = torch.zeros(H, 3 * H)
    fc[:, 2 * H:] = torch.eye(H)
    head.fc.copy_(fc)
    head.norm.copy_(torch.as_tensor(tensors["model.norm.weight"]))
    head.lm_head.copy_(output_head(tensors)[head.draft_ids])


def _init_eagle(head: Head, tensors: dict, last: str, g: torch.Generator, h_rms: float) -> None:
    """The head's stream is the post-norm feature (rms f_rms), not the residual stream (rms h_rms): q/k/v take the
    missing input norm's weights and 1/f_rms, o/down write at f_rms/h_rms of the target's scale; z ~= f."""
    H = head.ln2.shape[0]
    ln1 = torch.as_tensor(tensors[last + LAYER_TENSORS["ln1"]]).float()
    f_rms = float(torch.as_tensor(tensors["model.norm.weight"]).float().pow(2).mean().sqrt())
    for k in ("q", "k", "v"):
        getattr(head, k).mul_(ln1[None, :] / f_rms)
    for k in ("o", "down"):
        getattr(head, k).mul_(f_rms / h_rms)
    w = torch.zeros(H, 2 * H)
    w[:, :H] = torch.randn(H, H, generator=g) * (0.5 / math.sqrt(H))
    w[:, H:] = torch.eye(H)
    head.fc.copy_(w)


def _init_mtp(head: Head, tensors: dict, g: torch.Generator, h_rms: float) -> None:
    """z ~= h at the start (hnorm = 1, eh_proj = [small random | h_rms * I]) so the layer first sees an
    in-distribution residual."""
    H = head.ln2.shape[0]
    head.norm.copy_(torch.as_tensor(tensors["model.norm.weight"]))
    head.enorm.fill_(1.0)
    head.hnorm.fill_(1.0)
    w = torch.zeros(H, 2 * H)
    w[:, :H] = torch.randn(H, H, generator=g) * (0.5 * h_rms / math.sqrt(H))
    w[:, H:] = torch.eye(H) * h_rms
    head.eh_proj.copy_(w)


def init_head(head: Head, tensors: dict, n_layers: int, h_rms: float) -> None:
    """Decoder layer <- the target's last layer; norm <- the target's final norm; then each arch's own start
    (seeded: the same weights every run)."""
    last = f"model.layers.{n_layers - 1}."
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for k, v in LAYER_TENSORS.items():
            if hasattr(head, k) and not (head.arch == "eagle3" and k in ("q", "k", "v")):  # EAGLE-3's read 2H
                getattr(head, k).copy_(torch.as_tensor(tensors[last + v]))
        if head.arch == "eagle3":
            _init_eagle3(head, tensors, last, g)
        elif head.arch == "eagle":
            _init_eagle(head, tensors, last, g, h_rms)
        else:
            _init_mtp(head, tensors, g, h_rms)


def load_weights(head: Head, path: str, identity: dict | None = None) -> None:
    """Warm-start weights: an exported head (its .safetensors file, or an EAGLE directory holding
    model.safetensors; tensors outside the head's names, such as an MTP head's draft vocabulary, are left out) or
    a run's final checkpoint (--work/ckpt/final.safetensors, refused if `identity` differs from the one it records).
    Every name and shape is checked before any copy."""
    if os.path.isdir(path):
        path = os.path.join(path, "model.safetensors")
    load_final(path, head, identity, f"--init {path}")


def init_description(cfg: dict, h_rms: float, arch: str, init_from: str | None) -> str:
    """How init_head started the head, after any warm start's source."""
    layer = f"decoder layer from target model.layers.{cfg['num_hidden_layers'] - 1}"
    if arch == "eagle3":
        fresh = (f"{layer}: o/mlp/post-attention norm as they are; q/k/v = [N(0, (0.5*std)^2) for the embedding "
                 "half | the layer's own for the feature half], hidden_norm = the layer's input norm, "
                 "input_layernorm = 1; fc = [0 | 0 | I] (f starts as the highest tap); norm = target model.norm; "
                 "lm_head = the target's output head's rows of the draft vocabulary")
    elif arch == "eagle":
        fresh = (f"{layer} (its input norm's weights and 1/rms(final norm weight) folded into q/k/v; o_proj and "
                 f"down_proj scaled by rms(final norm weight)/{h_rms:.2f}, the median rms(h)); fc = [N(0, 0.25/H) | "
                 "I], bias 0 (z ~= f at the start)")
    else:
        fresh = (f"{layer}; norm from target model.norm; enorm = hnorm = 1; eh_proj = [N(0, (0.5*{h_rms:.2f})^2/"
                 f"{cfg['hidden_size']}) | {h_rms:.2f} * I] (z ~= h at the start; median rms(h) over the data)")
    return f"warm start from an earlier run's weights ({init_from}), itself initialized as: {fresh}" if init_from \
        else fresh
