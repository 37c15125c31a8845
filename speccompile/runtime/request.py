"""A request checked at the edge: prompt, sampling settings, drafter and limits, each refused with a clear
SpeccompileError before anything runs (a NaN temperature or a wrapped-around token id would decode garbage); and
speccompile.load's options."""
from __future__ import annotations

import dataclasses
import numbers
import os

import numpy as np

from speccompile.errors import ContextLengthError, SpeccompileError, given, option
from speccompile.format.trees import TreeSpec
from speccompile.graphs import MAX_VERIFY_TOKENS
from speccompile.runtime.acceptance import SpecDecodeStats
from speccompile.runtime.drafters.base import Drafter
from speccompile.runtime.logprobs import MAX_TOP_LOGPROBS, Logprobs
from speccompile.runtime.noise import NoiseSupport, by_noise
from speccompile.runtime.sampling import SamplingParams, UnknownOptionError, acceptance_option

ROLES = ("system", "user", "assistant", "tool")
_NOT_SUPPORTED = "not supported: sampling here is temperature, top_k, top_p, min_p and seed"
_EOS = ("use stop_token_ids (tokens that end the output besides the bundle's end-of-sequence tokens, which "
        "ignore_eos=True leaves going on)")
# vLLM's n and transformers' num_return_sequences draw several samples of one prompt; copies of a prompt in a list
# each draw from the seed alone, so with a seed they all answer alike
_SAMPLES = ("pass a list of prompts, one result each (with a seed, copies of one prompt get one answer: leave the "
            "seed out, or call once per seed)")
# keywords that transformers' generate or vLLM take, and what to give here instead
FAMILIAR_OPTIONS = {
    "max_tokens": "use max_new_tokens", "max_length": "use max_new_tokens (it counts the new tokens alone)",
    "do_sample": "use temperature: above 0 samples, 0 (the default) is greedy",
    "stop_sequences": "use stop", "stop_strings": "use stop", "eos_token_id": _EOS, "n": _SAMPLES,
    "num_return_sequences": _SAMPLES, "sampling_params": "use params", "top_logprobs": "use logprobs=K",
    "output_scores": "use logprobs=K", "repetition_penalty": _NOT_SUPPORTED, "presence_penalty": _NOT_SUPPORTED,
    "frequency_penalty": _NOT_SUPPORTED,
}


# speccompile.load's options (Generator.load's and the context cache's), and what transformers' and vLLM's mean here
LOAD_OPTIONS = ("threads", "device", "verify", "context_cache", "cache_bytes", "cache_dir")
_FIXED_AT_BUILD = "fixed when the bundle is built (speccompile build --dtype, --max-seq-len, --max-batch)"
FAMILIAR_LOAD_OPTIONS = {
    "device_map": "use device: 'cpu', 'cuda' or 'tensorrt'", "torch_dtype": _FIXED_AT_BUILD, "dtype": _FIXED_AT_BUILD,
    "max_model_len": _FIXED_AT_BUILD, "max_num_seqs": _FIXED_AT_BUILD,
    "trust_remote_code": "a bundle runs no code of its own: drop it", "num_threads": "use threads",
}


@dataclasses.dataclass(frozen=True)
class Request:
    ids: np.ndarray  # int64 prompt token ids
    max_new_tokens: int
    params: SamplingParams
    drafter: Drafter | None
    k: int  # chain length
    tree: TreeSpec | None
    stop: tuple[str, ...]
    end_ids: frozenset[int]  # the tokens that end the output: the end-of-sequence tokens, none with ignore_eos
    logprobs: int | None = None  # None: none; k: each token's log-probability and the k likeliest tokens'
    prompt_logprobs: int | None = None  # the same for each prompt token after the first (vLLM's prompt_logprobs)

    def new_stats(self) -> SpecDecodeStats:
        """The figures of a run of this request, none counted yet (and where asked for, its log-probabilities)."""
        stats = SpecDecodeStats(self.drafter.name if self.drafter else None,
                                self.tree.to_dict() if self.tree else None, len(self.ids))
        stats.logprobs = None if self.logprobs is None else Logprobs(self.logprobs)
        stats.prompt_logprobs = None if self.prompt_logprobs is None else Logprobs(self.prompt_logprobs)
        return stats


def check_options(unknown: dict, call: str = "generate, stream and chat", hints: dict = FAMILIAR_OPTIONS) -> None:
    """Keywords the call does not take, refused by name: with a hint where another library's name for an option
    was given, so that a familiar option is never taken for one that works."""
    if unknown:
        named = [f"{n!r} ({hints[n]})" if n in hints else repr(n) for n in unknown]
        raise UnknownOptionError(f"{call} take{'' if ' ' in call else 's'} no option {', '.join(named)}")


def check_load_options(bundle_dir, options: dict) -> None:
    """speccompile.load's arguments: a folder, known options, and True or False where an option is a switch (the
    string "no" would be true)."""
    # a path-like of bytes (a folder os.scandir listed in bytes) too: plain_paths' str() would make it "b'...'"
    if not isinstance(bundle_dir, (str, os.PathLike)) or not isinstance(os.fspath(bundle_dir), str):
        raise SpeccompileError(f"load: expected a bundle's folder, not {bundle_dir!r}")
    check_options({n: v for n, v in options.items() if n not in LOAD_OPTIONS}, "load", FAMILIAR_LOAD_OPTIONS)
    for name in ("verify", "context_cache"):
        if not isinstance(options.get(name, True), (bool, np.bool_)):
            raise SpeccompileError(f"{name}: expected True or False, not {options[name]!r}")
    if "cache_bytes" in options and not options.get("context_cache", True):  # as the CLI refuses the two together
        raise SpeccompileError("cache_bytes sizes the context cache, which context_cache=False turns off: drop one")


def plain_paths(bundle_dir, options: dict) -> tuple[str, dict]:
    """load's folders (checked already) as plain str: os.scandir lists a numpy string's folder (a str with a
    buffer of its own) in bytes, which no str path joins."""
    if options.get("cache_dir") is not None:
        options = {**options, "cache_dir": str(os.fspath(options["cache_dir"]))}
    return str(os.fspath(bundle_dir)), options


def sampling_params(params: SamplingParams | None, unknown: dict, temperature, top_k, top_p, seed,
                    acceptance, min_p=None) -> SamplingParams:
    """stream()'s sampling: params, or the SamplingParams the keywords give (None: the default). Refused first:
    keywords stream() does not take (unknown); then both at once, as params replaces the keywords, which would
    be silently ignored."""
    check_options(unknown)
    given = {name: value for name, value in (("temperature", temperature), ("top_k", top_k), ("top_p", top_p),
                                             ("min_p", min_p), ("seed", seed), ("acceptance", acceptance))
             if value is not None}
    if params is not None and given:
        raise SpeccompileError(f"params= replaces {', '.join(given)}: set {'it' if len(given) == 1 else 'them'} "
                               "in the SamplingParams instead")
    if params is not None:
        return params
    acceptance = acceptance_option(given.pop("acceptance", None))
    return SamplingParams(**given, **acceptance)


def own_loop(request: Request, noise: NoiseSupport) -> bool:
    """Requests the scheduler's shared passes do not serve: typical acceptance (lossy) where it is not sampled by the
    graphs' noise (top-p or min-p: its rule then reads float32 rows on the host), and prompt logprobs (the prompt's
    every row through the output head, which the shared prefill does not run)."""
    return (request.params.typical and not by_noise(request.params, noise)) or request.prompt_logprobs is not None


def build_request(gen, prompt, max_new_tokens, params: SamplingParams, drafter: str | None, speculate: bool,
                  stop, num_draft, tree, chat: bool, on_text=None, ignore_eos=False, stop_token_ids=(),
                  logprobs=None, prompt_logprobs=None) -> Request:
    """gen: the Generator (its tokenizer, target, drafters and their defaults). on_text: checked here only, so that
    a bad callback is refused before anything runs rather than at the first text."""
    if not isinstance(params, SamplingParams):
        raise SpeccompileError(f"params: expected a SamplingParams, not {type(params).__name__}")
    if on_text is not None and not callable(on_text):
        raise SpeccompileError(f"on_text: expected a function of the new text, not {on_text!r}")
    check_flags(speculate, chat, drafter, num_draft, tree, params, ignore_eos)
    ids = prompt_ids(gen, prompt, chat)
    check_length(ids, max_new_tokens, gen.max_seq_len)
    # a bundle without drafters decodes plainly, but a drafter, tree, size or acceptance rule asked of it is
    # refused, not ignored
    dr = pick_drafter(gen, drafter) if speculate and (gen.drafters or drafter is not None) else None
    if speculate and dr is None:
        check_nothing_drafted(num_draft, tree, params)
    if num_draft is not None and not (_whole(num_draft) and 1 <= num_draft < MAX_VERIFY_TOKENS):
        raise SpeccompileError(f"{given('num_draft', num_draft)}: must be a whole number between 1 and "
                               f"{MAX_VERIFY_TOKENS - 1}")
    if num_draft is not None and tree is not None:  # the tree would win and num_draft go unread
        raise SpeccompileError(f"{option('num_draft')} asks for a chain of that many drafts, {option('tree')} for a "
                               f"tree: give one (a chain of K is the tree 'chain:K')")
    # a plain int: a numpy unsigned one would turn the drafters' index sums into floats
    k = int(num_draft) if num_draft is not None else (gen.num_draft[dr.name] if dr else 0)
    if isinstance(tree, str):
        tree = TreeSpec.parse(tree)
    elif tree is not None and not isinstance(tree, TreeSpec):
        raise SpeccompileError(f"tree: expected a tree spec such as 'chain:4' or 'dynamic:16', not {tree!r}")
    elif tree is not None:
        tree = tree.checked()
    check_depth(dr, num_draft, tree)
    if tree is None and num_draft is None and dr is not None and gen.trees.get(dr.name):
        tree = gen.trees[dr.name]  # the default: the bundle's tree (num_draft asks for a chain of that many)
    ends = frozenset() if ignore_eos else gen.tokenizer.eos_token_ids
    ends |= stop_ids(stop_token_ids, gen.target.vocab_size)
    return Request(ids, int(max_new_tokens), params, dr, k, tree, stop_strings(stop), ends,
                   top_count("logprobs", logprobs), top_count("prompt_logprobs", prompt_logprobs))


def top_count(name: str, value) -> int | None:
    """logprobs or prompt_logprobs: None, or how many likeliest tokens to list beside each token's own."""
    if value is not None and (not _whole(value) or not 0 <= value <= MAX_TOP_LOGPROBS):
        raise SpeccompileError(f"{given(name, value, limit=40)}: the likeliest tokens to list beside each "
                               f"token's own, a whole number from 0 to {MAX_TOP_LOGPROBS} (None: none)")
    return None if value is None else int(value)


def check_flags(speculate, chat, drafter, num_draft, tree, params: SamplingParams, ignore_eos=False) -> None:
    """speculate, chat and ignore_eos are True or False (the string "no" would be true), and without speculation
    the options of drafting are refused, not ignored."""
    for name, flag in (("speculate", speculate), ("chat", chat), ("ignore_eos", ignore_eos)):
        if not isinstance(flag, (bool, np.bool_)):
            raise SpeccompileError(f"{name}: expected True or False, not {flag!r}")
    drafting = [option(name) for name, value in (("drafter", drafter), ("num_draft", num_draft), ("tree", tree))
                if value is not None] + ([given("acceptance", "typical")] if params.typical else [])
    if not speculate and drafting:  # the CLI refuses its --no-speculate beside them first, in its own words
        plain = given("speculate", False, flag="--no-speculate")
        raise SpeccompileError(f"{plain} drafts nothing: drop {', '.join(drafting)}")


def check_nothing_drafted(num_draft, tree, params: SamplingParams) -> None:
    """A bundle without drafters: the options that only shape or accept drafts would go unread."""
    asked = [o for o, asked in ((option("tree"), tree is not None), (option("num_draft"), num_draft is not None),
                                (given("acceptance", "typical"), params.typical)) if asked]
    if asked:
        raise SpeccompileError(f"this bundle has no drafter, so {', '.join(asked)} would change nothing (build "
                               "it with --draft)")


def check_depth(drafter: Drafter | None, num_draft: int | None, tree: TreeSpec | None) -> None:
    """A chain or static tree deeper than the drafter drafts (a Medusa head drafts one position each) is refused:
    it would draft fewer tokens than asked, silently. A dynamic or adaptive tree grows within the drafter's
    reach by its nature."""
    bound = drafter.max_depth if drafter is not None else None
    if bound is None:
        return
    if num_draft is not None and num_draft > bound:
        raise SpeccompileError(f"{given('num_draft', num_draft)}: drafter {drafter.name!r} drafts at most {bound} "
                               f"tokens a pass (one per head); ask for at most {bound}")
    if tree is not None and tree.kind in ("chain", "static") and tree.depth > bound:
        raise SpeccompileError(f"{option('tree')}: this {tree.kind} tree is {tree.depth} deep, and drafter "
                               f"{drafter.name!r} drafts at most {bound} deep (one position per head)")


def prompt_ids(gen, prompt, chat: bool) -> np.ndarray:
    """Text (through the chat template when chat; else with the special tokens the tokenizer adds to a text, such
    as BOS, as transformers' tokenizer(text) encodes it) or token ids, checked against the target's vocabulary."""
    if isinstance(prompt, np.ndarray) and prompt.ndim != 1:
        raise SpeccompileError(f"prompt token ids: expected one sequence, got shape {prompt.shape}")
    if isinstance(prompt, str):
        ids = gen.encode_chat(prompt) if chat else gen.tokenizer.encode(prompt, add_special_tokens=True)
    elif isinstance(prompt, (list, tuple, np.ndarray)):
        ids = prompt
    else:
        raise SpeccompileError(f"prompt: expected text or a list of token ids, not {type(prompt).__name__}")
    if len(ids) == 0:
        raise SpeccompileError("empty prompt")
    if not all(_whole(t) for t in ids) if not isinstance(ids, np.ndarray) else ids.dtype.kind not in "iu":
        if not isinstance(ids, np.ndarray) and all(isinstance(t, dict) for t in ids):
            raise SpeccompileError("prompt: a list of messages is a conversation: call chat(messages), or stream("
                                   "gen.tokenizer.encode_messages(messages)) for its text as it comes")
        if not isinstance(ids, np.ndarray) and all(isinstance(t, (str, list, tuple)) or np.ndim(t) for t in ids):
            raise SpeccompileError("prompt: a list of prompts is generate's (a list of results): stream takes one "
                                   "prompt, text or token ids (open one stream per prompt)")
        raise SpeccompileError("prompt token ids must be whole numbers")
    vocab = gen.target.vocab_size
    bad = (ids[(ids < 0) | (ids >= vocab)].tolist() if isinstance(ids, np.ndarray)
           else [t for t in ids if not 0 <= t < vocab])  # before int64 could overflow on them
    if bad:
        raise SpeccompileError(f"prompt token id {int(bad[0])} is out of range: ids must be 0 <= id < {vocab}")
    ids = np.asarray(ids, np.int64)
    if ids.ndim != 1:
        raise SpeccompileError(f"prompt token ids: expected one sequence, got shape {ids.shape}")
    return ids


def check_length(ids: np.ndarray, max_new_tokens, max_seq_len: int) -> None:
    if isinstance(max_new_tokens, SamplingParams):  # vLLM's generate(prompts, sampling_params)
        raise SpeccompileError(f"{option('max_new_tokens')}: got a SamplingParams; pass it as params=")
    if not _whole(max_new_tokens) or max_new_tokens < 1:
        raise SpeccompileError(f"{given('max_new_tokens', max_new_tokens)}: must be a whole number, at least 1")
    max_new_tokens = int(max_new_tokens)  # a numpy integer would wrap around in the sum below
    if len(ids) >= max_seq_len:
        raise ContextLengthError(f"prompt of {len(ids)} tokens does not fit the compiled context of "
                                 f"{max_seq_len} tokens (rebuild with a larger --max-seq-len)")
    if len(ids) + max_new_tokens > max_seq_len:
        room = max_seq_len - len(ids)
        raise ContextLengthError(f"prompt ({len(ids)} tokens) + {given('max_new_tokens', max_new_tokens)} exceeds "
                                 f"the compiled context of {max_seq_len} tokens; ask for at most {room} new "
                                 f"token{'s' if room != 1 else ''}")


def pick_drafter(gen, name: str | None) -> Drafter:
    if name is not None and not isinstance(name, str):
        raise SpeccompileError(f"drafter: expected a drafter's name (one of {', '.join(gen.drafters)}), not {name!r}")
    if name is None:  # the default; an empty name is a name no drafter has, not the default
        name = next(iter(gen.drafters), "")
    if name not in gen.drafters:
        have = ", ".join(gen.drafters) or "none"
        raise SpeccompileError(f"drafter {name!r} is not in this bundle (it has: {have})")
    return gen.drafters[name]


def stop_strings(stop) -> tuple[str, ...]:
    """One stop string or several; a bare string is one stop string, not its characters."""
    if stop is not None and not isinstance(stop, (str, list, tuple)):
        raise SpeccompileError(f"stop: expected a string or a list of strings, got {stop!r}")
    stop = (stop,) if isinstance(stop, str) else tuple(stop or ())
    if not all(isinstance(s, str) for s in stop):
        raise SpeccompileError(f"stop: expected strings, got {stop!r}")
    return tuple(s for s in stop if s)


def stop_ids(ids, vocab_size: int) -> frozenset[int]:
    """stop_token_ids (vLLM's): token ids that end the output as an end-of-sequence token does, it included."""
    if isinstance(ids, (str, bytes)) or not isinstance(ids, (list, tuple, np.ndarray)):
        raise SpeccompileError(f"{given('stop_token_ids', ids, limit=40)}: expected a list of token ids")
    bad = [t for t in list(ids) if not _whole(t) or not 0 <= t < vocab_size]
    if bad:
        raise SpeccompileError(f"{given('stop_token_ids', bad[0], limit=40)}: expected token ids from 0 to "
                               f"{vocab_size - 1}")
    return frozenset(int(t) for t in ids)


def check_messages(messages) -> list[dict]:
    """A conversation: a non-empty list of {"role": one of ROLES, "content": text}."""
    if not isinstance(messages, (list, tuple)) or not messages:
        raise SpeccompileError("chat: messages must be a non-empty list of {'role': ..., 'content': ...}")
    for i, m in enumerate(messages):
        if not isinstance(m, dict) or m.get("role") not in ROLES or not isinstance(m.get("content"), str):
            raise SpeccompileError(f"chat: message {i} must be {{'role': one of {', '.join(ROLES)}, "
                                   f"'content': text}}, got {m!r}")
    return list(messages)


def is_batch(prompt) -> bool:
    """A list of prompts (texts or token-id lists), as opposed to one prompt given as token ids. A list of lists
    of lists is neither: a prompt in a list of prompts must itself be one prompt."""
    if not (isinstance(prompt, (list, tuple)) and len(prompt) > 0 and
            all(isinstance(p, (str, list, tuple)) or np.ndim(p) > 0 and isinstance(p, np.ndarray) for p in prompt)):
        return False
    for i, p in enumerate(prompt):
        if not isinstance(p, str) and any(isinstance(t, (str, list, tuple, np.ndarray)) for t in p):
            raise SpeccompileError(f"prompt {i} of the list is not one prompt (text or token ids): {str(p)[:80]}")
    return True


def _whole(x) -> bool:
    return isinstance(x, numbers.Integral) and not isinstance(x, bool)
