"""The draft heads as torch modules, with their stored tensor names.

mtp (DeepSeek-V3's MTP module; at position t, predicts x_{t+2}):
    z = eh_proj([enorm(embed(x_{t+1})), hnorm(h_t)]);  o = decoder_layer(z, rope position t+1);
    logits = lm_head(norm(o))     (embed and lm_head are the target's, frozen, not stored)
  Recursive drafting feeds (o_t, drafted x_{t+2}) at position t+2, attending the head's keys from real positions
  <= t+1 and its own.
eagle (EAGLE-1, SafeAILab cnets1.py): f_t = final_norm(h_t); z = fc([embed(x_{t+1}), f_t]) + b; o = decoder layer
  without its input norm; logits = lm_head(o); o is the next depth's f.
eagle3 (EAGLE-3, cnets.py): f_t = fc([a_t; b_t; c_t]) over three target layers; attention over
  [input_layernorm(embed(x_{t+1})); hidden_norm(f_t)] added to f_t, the MLP block, logits = own lm_head(norm(o)) over
  a draft vocabulary; o is the next depth's f.
"""
from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F

MTP_NAMES = {"enorm": "mtp.enorm.weight", "hnorm": "mtp.hnorm.weight", "norm": "mtp.norm.weight",
             "eh_proj": "mtp.eh_proj.weight", "ln1": "mtp.layer.input_layernorm.weight",
             "ln2": "mtp.layer.post_attention_layernorm.weight", "q": "mtp.layer.self_attn.q_proj.weight",
             "k": "mtp.layer.self_attn.k_proj.weight", "v": "mtp.layer.self_attn.v_proj.weight",
             "o": "mtp.layer.self_attn.o_proj.weight", "gate": "mtp.layer.mlp.gate_proj.weight",
             "up": "mtp.layer.mlp.up_proj.weight", "down": "mtp.layer.mlp.down_proj.weight"}
HEAD_TENSORS = [
    "mtp.enorm.weight", "mtp.hnorm.weight", "mtp.eh_proj.weight",
    "mtp.layer.input_layernorm.weight",
    "mtp.layer.self_attn.q_proj.weight", "mtp.layer.self_attn.k_proj.weight",
    "mtp.layer.self_attn.v_proj.weight", "mtp.layer.self_attn.o_proj.weight",
    "mtp.layer.post_attention_layernorm.weight",
    "mtp.layer.mlp.gate_proj.weight", "mtp.layer.mlp.up_proj.weight", "mtp.layer.mlp.down_proj.weight",
    "mtp.norm.weight",
]
EAGLE_NAMES = {"fc": "fc.weight", "fc_bias": "fc.bias", "ln2": "layers.0.post_attention_layernorm.weight",
               "q": "layers.0.self_attn.q_proj.weight", "k": "layers.0.self_attn.k_proj.weight",
               "v": "layers.0.self_attn.v_proj.weight", "o": "layers.0.self_attn.o_proj.weight",
               "gate": "layers.0.mlp.gate_proj.weight", "up": "layers.0.mlp.up_proj.weight",
               "down": "layers.0.mlp.down_proj.weight"}
EAGLE3_NAMES = {"fc": "fc.weight", "ln_e": "midlayer.input_layernorm.weight", "hnorm": "midlayer.hidden_norm.weight",
                "ln2": "midlayer.post_attention_layernorm.weight", "q": "midlayer.self_attn.q_proj.weight",
                "k": "midlayer.self_attn.k_proj.weight", "v": "midlayer.self_attn.v_proj.weight",
                "o": "midlayer.self_attn.o_proj.weight", "gate": "midlayer.mlp.gate_proj.weight",
                "up": "midlayer.mlp.up_proj.weight", "down": "midlayer.mlp.down_proj.weight", "norm": "norm.weight",
                "lm_head": "lm_head.weight"}


def rmsnorm(x, w, eps: float):
    return x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + eps) * w


def _zeros(*shape) -> nn.Parameter:
    return nn.Parameter(torch.zeros(*shape))


class Head(nn.Module):
    """One draft head (arch mtp, eagle or eagle3; see the module's docstring) for a target of config `cfg` (eagle:
    wfinal, the target's final norm weight; eagle3: draft_ids, its draft vocabulary as target ids). Parameters start
    at zero (init.py fills them); `names` maps each to its stored tensor name."""

    def __init__(self, cfg: dict, eps: float, arch: str = "mtp", wfinal=None, draft_ids=None):
        super().__init__()
        H, I = cfg["hidden_size"], cfg["intermediate_size"]
        self.arch, self.eps = arch, eps
        self.nh, self.nkv, self.hd = cfg["num_attention_heads"], cfg["num_key_value_heads"], cfg["head_dim"]
        width = H  # what the attention reads
        if arch == "eagle":
            self.fc, self.fc_bias = _zeros(H, 2 * H), _zeros(H)
            self.register_buffer("wfinal", torch.as_tensor(wfinal).float(), persistent=False)
            self.names = EAGLE_NAMES
        elif arch == "eagle3":
            width = 2 * H
            self.fc, self.ln_e, self.hnorm, self.norm = _zeros(H, 3 * H), _zeros(H), _zeros(H), _zeros(H)
            self.lm_head = _zeros(len(draft_ids), H)
            self.register_buffer("draft_ids", torch.as_tensor(draft_ids), persistent=False)
            self.names = EAGLE3_NAMES
        else:
            self.enorm, self.hnorm, self.norm = _zeros(H), _zeros(H), _zeros(H)
            self.eh_proj = _zeros(H, 2 * H)
            self.ln1 = _zeros(H)
            self.names = MTP_NAMES
        self.ln2 = _zeros(H)
        nh, nkv, hd = self.nh, self.nkv, self.hd
        self.q, self.k, self.v, self.o = _zeros(nh * hd, width), _zeros(nkv * hd, width), _zeros(nkv * hd, width), \
            _zeros(H, nh * hd)
        self.gate, self.up, self.down = _zeros(I, H), _zeros(I, H), _zeros(H, I)
        inv = 1.0 / (cfg["rope_theta"] ** (torch.arange(0, hd, 2, dtype=torch.float64) / hd))
        self.register_buffer("inv_freq", inv.float(), persistent=False)

    def rope(self, x, pos):  # x [T, heads, hd], HF rotate_half convention
        ang = pos.float()[:, None] * self.inv_freq[None]
        cos, sin = torch.cat([ang, ang], -1).cos()[:, None], torch.cat([ang, ang], -1).sin()[:, None]
        x1, x2 = x[..., : self.hd // 2], x[..., self.hd // 2:]
        return x * cos + torch.cat([-x2, x1], -1) * sin

    def feature(self, h):
        """The head's depth-1 feature from the stored target features (h: the pre-final-norm residual stream;
        EAGLE-3: its three layers)."""
        if self.arch == "eagle3":
            return F.linear(h, self.fc)
        return rmsnorm(h, self.wfinal, self.eps) if self.arch == "eagle" else h

    def fuse(self, emb, f):
        """(x, z): the attention's input and the residual stream the block adds to."""
        if self.arch == "eagle":
            z = F.linear(torch.cat([emb, f], -1), self.fc, self.fc_bias)
            return z, z
        if self.arch == "eagle3":
            return torch.cat([rmsnorm(emb, self.ln_e, self.eps), rmsnorm(f, self.hnorm, self.eps)], -1), f
        z = F.linear(torch.cat([rmsnorm(emb, self.enorm, self.eps), rmsnorm(f, self.hnorm, self.eps)], -1),
                     self.eh_proj)
        return rmsnorm(z, self.ln1, self.eps), z

    def qkv(self, x, pos):
        T = x.shape[0]
        q = self.rope(F.linear(x, self.q).view(T, self.nh, self.hd), pos)
        k = self.rope(F.linear(x, self.k).view(T, self.nkv, self.hd), pos)
        v = F.linear(x, self.v).view(T, self.nkv, self.hd)
        return q, k, v

    def block(self, z, q, ks, vs, mask):
        """Rest of the decoder layer: attention of q over the keys ks/vs (mask [T, Tk], True = attend)."""
        T, group = z.shape[0], self.nh // self.nkv
        k = torch.cat(ks, 0).repeat_interleave(group, 1).transpose(0, 1)
        v = torch.cat(vs, 0).repeat_interleave(group, 1).transpose(0, 1)
        a = F.scaled_dot_product_attention(q.transpose(0, 1)[None], k[None], v[None], attn_mask=mask[None, None])
        z = z + F.linear(a[0].transpose(0, 1).reshape(T, self.nh * self.hd), self.o)
        x = rmsnorm(z, self.ln2, self.eps)
        return z + F.linear(F.silu(F.linear(x, self.gate)) * F.linear(x, self.up), self.down)

    def final(self, o):
        return o if self.arch == "eagle" else rmsnorm(o, self.norm, self.eps)

    def logits(self, o, W):
        """Training logits: over W's rows (the target's head, or a slice of it), EAGLE-3's own draft head."""
        return F.linear(self.final(o), self.lm_head if self.arch == "eagle3" else W)

    def draft(self, o, out_w):
        """The greedy draft, as target token ids (out_w: the target's output head; EAGLE-3 scores with its own)."""
        if self.arch == "eagle3":
            return self.draft_ids[F.linear(self.final(o), self.lm_head).argmax(-1)]
        return F.linear(self.final(o), out_w).argmax(-1)

