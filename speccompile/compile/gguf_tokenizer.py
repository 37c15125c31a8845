"""A GGUF's tokenizer (tokenizer.ggml.* metadata) as tokenizer.json + tokenizer_config.json, built with the
`tokenizers` library the way transformers' GGUF tokenizer conversion builds it (integrations/gguf/
gguf_tokenizer_mapping.py and the tokenizer classes it hands the vocabulary to), but encoding as llama.cpp does
where the two differ: byte-level text is split as llama.cpp splits it for the file's tokenizer.ggml.pre, where
transformers falls back to GPT-2's split for values it does not know (SmolLM2's "smollm" among them), byte-level
added tokens keep their text, and sentencepiece text is prefixed with a space after each special token too.

Two kinds: "gpt2" (byte-level BPE with merges: SmolLM2, Llama 3, Qwen2) and "llama" (sentencepiece BPE with
byte fallback: Llama 2, Mistral, TinyLlama).
"""
from __future__ import annotations

import json

from tokenizers import AddedToken, Regex, Tokenizer, decoders, models, normalizers, pre_tokenizers, processors

from speccompile.errors import UnsupportedModelError

# llama.cpp's pre-tokenizer per tokenizer.ggml.pre (src/llama-vocab.cpp), so a file splits text as llama.cpp
# splits it: regexes applied in turn, each splitting the pieces the one before left (matches and the text between
# them), and whether a piece that is a whole token skips the merges (its ignore_merges). Values missing here are
# refused: any regex but the vocabulary's own tokenizes text differently from the model's training.
_GPT2 = r"'s|'t|'re|'ve|'m|'ll|'d| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)"
_CONTRACTIONS = r"'[sS]|'[tT]|'[rR][eE]|'[vV][eE]|'[mM]|'[lL][lL]|'[dD]"
_TAIL = r" ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"
_LLAMA3 = rf"(?:{_CONTRACTIONS})|[^\r\n\p{{L}}\p{{N}}]?\p{{L}}+|\p{{N}}{{1,3}}|{_TAIL}"
_QWEN2 = rf"(?:{_CONTRACTIONS})|[^\r\n\p{{L}}\p{{N}}]?\p{{L}}+|\p{{N}}|{_TAIL}"
# letters not a-z / not A-Z: llama.cpp's spelling of the original's cased-letter classes
_UPPER, _LOWER = r"((?=[\p{L}])([^a-z]))", r"((?=[\p{L}])([^A-Z]))"
_WORD = r"[^\r\n\p{L}\p{N}]?"
_SLASH_TAIL = r" ?[^\s\p{L}\p{N}]+[\r\n/]*|\s*[\r\n]+|\s+(?!\S)|\s+"
_TEKKEN = rf"{_WORD}{_UPPER}*{_LOWER}+|{_WORD}{_UPPER}+{_LOWER}*|\p{{N}}|{_SLASH_TAIL}"
_GPT4O = (rf"{_WORD}{_UPPER}*{_LOWER}+(?:{_CONTRACTIONS})?|{_WORD}{_UPPER}+{_LOWER}*(?:{_CONTRACTIONS})?"
          rf"|\p{{N}}{{1,3}}|{_SLASH_TAIL}")
_LLAMA3_NAMES = ("llama3", "llama-v3", "llama-bpe", "falcon3", "falcon-h1", "pixtral", "midm-2.0", "lfm2",
                 "jina-v5-nano")
_TEKKEN_NAMES = ("tekken",)
# (names, regexes, ignore_merges); regexes None: GPT-2's own (ByteLevel's regex), also for "default" (and no value)
# as transformers splits them, where llama.cpp falls back to regexes of its own
_FAMILIES = (
    (("gpt-2", "default", "phi-2", "jina-es", "jina-de", "gigachat", "jina-v2-es", "jina-v2-de", "a.x-4.0",
      "mellum", "modern-bert", "mpt", "olmo", "jais", "trillion", "granite-docling", "exaone4"), None, False),
    (_LLAMA3_NAMES, (_LLAMA3,), True),
    (("dbrx", "smaug-bpe"), (_LLAMA3,), False),
    (("qwen2", "deepseek-r1-qwen", "kormo", "f2llmv2", "megrez", "stablelm2", "hunyuan", "solar-open"),
     (_QWEN2,), False),
    (_TEKKEN_NAMES, (_TEKKEN,), True),
    (("smollm", "starcoder", "refact", "command-r", "codeshell", "exaone", "minerva-7b", "mellum2"),
     (r"\p{N}", _GPT2), False),
    (("gpt-4o", "llama4", "kanana2", "talkie", "minimax-m2"), (_GPT4O,), False),
    (("falcon",), (r"[\p{P}\$\+<=>\^~\|`]+", _GPT2, "[0-9][0-9][0-9]"), False),
)
PRE_TOKENIZERS = {name: (regexes, ignore) for names, regexes, ignore in _FAMILIES for name in names}
# Where a file has no tokenizer.ggml.add_bos_token (early Llama 3 files), llama.cpp adds BOS for these
# pre-tokenizers and to sentencepiece vocabularies
BOS_BY_DEFAULT = frozenset(_LLAMA3_NAMES + _TEKKEN_NAMES)
CONTROL, USER_DEFINED = 3, 4  # tokenizer.ggml.token_type values
# tokens that end a chat turn, by their text: llama.cpp ends generation at each and takes each as a control token
# (a file that marks one a plain token, as some Gemma GGUFs mark <end_of_turn>, would otherwise have it spelled out
# piece by piece in a rendered chat, and generation run on past the turn)
END_OF_TURN = frozenset({"<|eot_id|>", "<|eom_id|>", "<|im_end|>", "<|end|>", "<|return|>", "<|call|>",
                         "<end_of_turn>", "<|endoftext|>", "<|end_of_text|>", "<EOT>", "_<EOT>",
                         "<end_of_utterance>", "<｜end▁of▁sentence｜>"})
SPECIAL_IDS = (("bos_token", "bos_token_id"), ("eos_token", "eos_token_id"), ("unk_token", "unknown_token_id"),
               ("pad_token", "padding_token_id"))


def bytes_to_unicode() -> dict[int, str]:
    """GPT-2's byte -> printable character map, in which byte-level vocabularies are spelled."""
    printable = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + \
        list(range(ord("®"), ord("ÿ") + 1))
    extra = [b for b in range(256) if b not in printable]
    return {b: chr(b) for b in printable} | {b: chr(256 + i) for i, b in enumerate(extra)}


def byte_level_vocab(tokens: list[str], types: list[int], merges: list[tuple[str, ...]]) -> dict[str, int]:
    """Each token as the BPE model spells it. convert_hf_to_gguf.py writes a byte-level vocabulary's added tokens
    (control, user-defined: DeepSeek's "<｜begin▁of▁sentence｜>", runs of spaces beside the plain "ĠĠ") as their
    text, which is how they are matched whole in text and how they decode, and the others in GPT-2's byte spelling.
    A token outside that spelling is spelled in it, unless it is such an added token and no merge needs it so."""
    spelling = bytes_to_unicode()
    alphabet = set(spelling.values())
    spelled = [t if set(t) <= alphabet else "".join(spelling[b] for b in t.encode("utf-8")) for t in tokens]
    added = [k in (CONTROL, USER_DEFINED) for k in types]
    needed = {left + right for left, right in merges} - {s for s, a in zip(spelled, added) if not a}
    return {t if a and s not in needed else s: i for i, (t, s, a) in enumerate(zip(tokens, spelled, added))}


def token_types(meta: dict) -> list[int]:
    """tokenizer.ggml.token_type, one per token (a missing one is a plain token); a token of END_OF_TURN is a
    control token whatever the file says, as llama.cpp takes it."""
    tokens = meta["tokenizer.ggml.tokens"]
    types = list(meta.get("tokenizer.ggml.token_type") or [])[:len(tokens)]
    types += [0] * (len(tokens) - len(types))
    return [CONTROL if t in END_OF_TURN else k for t, k in zip(tokens, types)]


def end_of_turn_ids(meta: dict) -> list[int]:
    """The ids of the file's END_OF_TURN tokens: llama.cpp ends generation at each, besides the ids the metadata
    names."""
    return [i for i, t in enumerate(meta.get("tokenizer.ggml.tokens") or []) if t in END_OF_TURN]


def bpe_model(**options) -> models.BPE:
    """tokenizers' BPE model, its refusal of the file's merges (a merge of a token outside the vocabulary) a
    ValueError: tokenizers raises a plain Exception."""
    try:
        return models.BPE(**options)
    except Exception as e:  # noqa: BLE001 - tokenizers' own errors have no narrower type
        raise ValueError(str(e)) from None


def byte_level_tokenizer(meta: dict) -> Tokenizer:
    """tokenizer.ggml.model "gpt2": byte-level BPE with the file's merges."""
    pre = meta.get("tokenizer.ggml.pre", "default")  # absent: llama.cpp warns, transformers splits as GPT-2
    if not isinstance(pre, str) or pre not in PRE_TOKENIZERS:
        raise UnsupportedModelError(f"GGUF tokenizer.ggml.pre {pre!r:.40}: a pre-tokenizer speccompile does not "
                                    "reproduce; convert the model to a Hugging Face directory instead")
    regexes, ignore_merges = PRE_TOKENIZERS[pre]
    merges = [tuple(m.split(" ")) for m in meta.get("tokenizer.ggml.merges", [])]
    vocab = byte_level_vocab(meta["tokenizer.ggml.tokens"], token_types(meta), merges)
    tok = Tokenizer(bpe_model(vocab=vocab, merges=merges, continuing_subword_prefix="", end_of_word_suffix="",
                              fuse_unk=False, dropout=None, ignore_merges=ignore_merges))
    if regexes is None:
        # no space before the text, whatever tokenizer.ggml.add_space_prefix says: llama.cpp prefixes one to
        # sentencepiece text alone (transformers' GGUF conversion prefixes one here)
        tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    else:
        splits = [pre_tokenizers.Split(Regex(r), behavior="isolated") for r in regexes]
        tok.pre_tokenizer = pre_tokenizers.Sequence(
            splits + [pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)])
    tok.decoder = decoders.ByteLevel()
    return tok


# A token's text; real vocabularies stay far below it, and merges from scores cost its square per token
MAX_TOKEN_CHARS = 1024


def scored_merges(tokens: list[str], scores: list[float]) -> list[tuple[str, str]]:
    """Merges a sentencepiece vocabulary implies: every split of a token into two tokens, best score first
    (transformers' generate_merges, so ties break the same way)."""
    vocab = {t: i for i, t in enumerate(tokens)}
    merges = []
    for token, score in dict(zip(tokens, scores)).items():
        pairs = [(token[:i], token[i:], score) for i in range(1, len(token))
                 if token[:i] in vocab and token[i:] in vocab]
        merges += sorted(pairs, key=lambda p: (vocab[p[0]], vocab[p[1]]))
    merges.sort(key=lambda p: (p[2], len(p[0]), len(p[1])), reverse=True)
    return [(left, right) for left, right, _ in merges]


def sentencepiece_tokenizer(meta: dict) -> Tokenizer:
    """tokenizer.ggml.model "llama": BPE over "▁"-spelled pieces with byte fallback (transformers' LlamaTokenizer,
    but prefixing spaces as llama.cpp does)."""
    tokens = meta["tokenizer.ggml.tokens"]
    merges = ([tuple(m.split(" ")) for m in meta["tokenizer.ggml.merges"]] if "tokenizer.ggml.merges" in meta
              else scored_merges(tokens, meta["tokenizer.ggml.scores"]))
    tok = Tokenizer(bpe_model(vocab={t: i for i, t in enumerate(tokens)}, merges=merges, fuse_unk=True,
                              byte_fallback=True, dropout=None))
    # llama.cpp, as sentencepiece, prefixes a space to the text and to the text after each special or added token
    # (a normalizer runs on each piece between them), unless the file says add_space_prefix = false, and strips it
    # in decoding. transformers' Metaspace ("first") prefixes none after those tokens, nor to text that begins with
    # a space, and so splits a Llama 2 or Mistral prompt otherwise: "<s>[INST]", " hi".
    prefix = bool(meta.get("tokenizer.ggml.add_space_prefix", True))
    tok.normalizer = normalizers.Sequence(([normalizers.Prepend("▁")] if prefix else [])
                                          + [normalizers.Replace(" ", "▁")])
    tok.decoder = decoders.Sequence([decoders.Replace("▁", " "), decoders.ByteFallback(), decoders.Fuse()]
                                    + ([decoders.Strip(content=" ", left=1)] if prefix else []))
    return tok


BUILDERS = {"gpt2": byte_level_tokenizer, "llama": sentencepiece_tokenizer}


def add_special_tokens(tok: Tokenizer, meta: dict, special: dict[str, str]) -> None:
    """Control tokens and the named special tokens stay whole and are skipped in decoding; user-defined ones
    stay whole but are text."""
    tokens, types, vocab = meta["tokenizer.ggml.tokens"], token_types(meta), tok.get_vocab()
    # each as the model spells it: one that is not would be added past the vocabulary, with an id the model lacks
    control = [t for t, k in zip(tokens, types) if k == CONTROL and t in vocab]
    named = [t for t in special.values() if t not in control and t in vocab]
    tok.add_special_tokens([AddedToken(t, normalized=False, special=True) for t in control + named])
    tok.add_tokens([AddedToken(t, normalized=False, special=False) for t, k in zip(tokens, types)
                    if k == USER_DEFINED and t in vocab])


def set_post_processor(tok: Tokenizer, config: dict, special: dict[str, str]) -> None:
    """BOS/EOS added around a sequence as tokenizer_config says (transformers' update_post_processor)."""
    ends = [(name, special[name]) for name in ("bos_token", "eos_token")
            if config[f"add_{name[:3]}_token"] and tok.token_to_id(special.get(name, "")) is not None]
    bos = [t for name, t in ends if name == "bos_token"]
    eos = [t for name, t in ends if name == "eos_token"]
    single = " ".join([f"{t}:0" for t in bos] + ["$A:0"] + [f"{t}:0" for t in eos])
    pair = " ".join([single] + [f"{t}:1" for t in bos] + ["$B:1"] + [f"{t}:1" for t in eos])
    tok.post_processor = processors.TemplateProcessing(single=single, pair=pair,
                                                       special_tokens=[(t, tok.token_to_id(t)) for _, t in ends])


def tokenizer_files(meta: dict) -> dict[str, bytes]:
    """tokenizer.json and tokenizer_config.json (chat template, special tokens) built from tokenizer.ggml.*."""
    kind = meta.get("tokenizer.ggml.model")
    if kind not in BUILDERS:
        raise UnsupportedModelError(f"GGUF tokenizer {kind!r}: supported are {', '.join(BUILDERS)}; "
                                    "convert the model to a Hugging Face directory instead")
    tokens = meta["tokenizer.ggml.tokens"]
    if not isinstance(tokens, list) or not all(isinstance(t, str) and len(t) <= MAX_TOKEN_CHARS for t in tokens):
        raise ValueError(f"tokenizer.ggml.tokens is not a list of strings of at most {MAX_TOKEN_CHARS} characters")
    special = {name: tokens[meta[f"tokenizer.ggml.{key}"]] for name, key in SPECIAL_IDS
               if meta.get(f"tokenizer.ggml.{key}") is not None}
    tok = BUILDERS[kind](meta)  # first: it checks tokenizer.ggml.pre
    bos_by_default = kind == "llama" or meta.get("tokenizer.ggml.pre") in BOS_BY_DEFAULT
    config = {**special, "add_bos_token": bool(meta.get("tokenizer.ggml.add_bos_token", bos_by_default)),
              "add_eos_token": bool(meta.get("tokenizer.ggml.add_eos_token", False))}
    if "tokenizer.chat_template" in meta:
        config["chat_template"] = meta["tokenizer.chat_template"]
    add_special_tokens(tok, meta, special)
    set_post_processor(tok, config, special)
    return {"tokenizer.json": tok.to_str().encode(), "tokenizer_config.json": json.dumps(config, indent=2).encode()}
