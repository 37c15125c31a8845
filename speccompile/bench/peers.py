"""Peer decoders: the same target run by transformers (and onnxruntime-genai), to put speccompile's speed beside.

`transformers_methods` gives `speccompile bench --compare-transformers` its methods: the bundle's target (and, where
transformers has one, the same drafting) through transformers `generate`. The peers below it serve
tools/bench_decode.py: every peer takes prompt token ids (the chat template already applied by speccompile, so all
methods see the same ids), decodes greedily until EOS or max_new_tokens, and returns (new token ids, wall seconds),
the seconds covering everything from the prompt ids to the last token, prefill included.

torch, transformers and onnxruntime_genai are optional (the `train` and `bench` extras): they are imported only when
a peer is used, so that `speccompile bench` without --compare-transformers never needs them.
"""
from __future__ import annotations

import functools
import importlib.util
import json
import os
import shutil
import subprocess
import sys
import time

from speccompile.bench.methods import split_acceptance, split_method
from speccompile.bench.settings import AUTOREGRESSIVE, TRANSFORMERS, Method
from speccompile.compile.gguf import read_gguf
from speccompile.compile.sources import checkpoint_sha256, load_checkpoint, save_hf_dir
from speccompile.errors import SpeccompileError


# ---- transformers, for bench --compare-transformers -------------------------------------------------------------
def _hf_model_dir(source: dict, workdir: str) -> tuple[str, dict]:
    """Where transformers loads a bundle's model source from: (directory, from_pretrained extra kwargs)."""
    kind, path = source["kind"], source["path"]
    if kind == "gguf" and transformers_reads_alike(path):
        return os.path.dirname(path), {"gguf_file": os.path.basename(path)}
    if kind == "hf":
        return path, {}
    if kind in ("tiny", "gguf"):  # presets exist only in speccompile; a GGUF transformers would read otherwise
        out = os.path.join(workdir, os.path.basename(path).replace(":", "_") + ".hf")
        if not os.path.exists(os.path.join(out, "config.json")):  # written at the check, read at the load
            save_hf_dir(load_checkpoint(path, progress=lambda msg: None), out)
        return out, {}
    raise SpeccompileError(f"--compare-transformers: cannot load a model source of kind {kind!r}")


def transformers_reads_alike(gguf_path: str) -> bool:
    """Whether transformers' GGUF loader reads the model we compile: it drops a llama file's attention biases and
    its per-frequency RoPE factors (rope_freqs.weight), which llama.cpp and speccompile apply."""
    config = read_gguf(gguf_path)[0]
    dropped_bias = config.o_bias or (config.qkv_bias and config.model_type != "qwen2")  # Qwen2's q/k/v are read
    return not (dropped_bias or config.rope["rope_type"] == "freq_factors")


def check_hf_model(source: dict, workdir: str) -> tuple[str, dict]:
    """Where transformers will load `source` from, refused now if torch, transformers or the source is missing
    (found without importing them: an import would count in the memory of bench's speccompile phase)."""
    for module in ("torch", "transformers"):
        if importlib.util.find_spec(module) is None:
            raise SpeccompileError(f"--compare-transformers needs {module}, which is not installed: pip install "
                                   '"speccompile[train]"')
    missing = SpeccompileError(f"--compare-transformers: the bundle's source {source['path']} is not on this machine")
    if source["kind"] in ("hf", "gguf") and not os.path.exists(source["path"]):
        raise missing
    check_source_unchanged(source)  # before a GGUF is read, or converted for transformers
    directory, extra = _hf_model_dir(source, workdir)
    if not os.path.exists(os.path.join(directory, extra.get("gguf_file", "config.json"))):
        raise missing
    return directory, extra


def check_source_unchanged(source: dict) -> None:
    """The checkpoint at the bundle's recorded source path is still the one it was built from (its sha256): else
    transformers would run another model than the bundle's, and the comparison would say nothing of either."""
    if source["kind"] in ("hf", "gguf") and "sha256" in source and _sha256(source["path"]) != source["sha256"]:
        raise SpeccompileError(f"--compare-transformers: the bundle's source {source['path']} has changed since the "
                               "bundle was built (its sha256 differs); rebuild the bundle from it, or restore it")


@functools.cache  # checked before the runs and again when the model loads: a large checkpoint is read once
def _sha256(path: str) -> str:
    return checkpoint_sha256(path)


def load_hf_model(source: dict, workdir: str):
    directory, extra = check_hf_model(source, workdir)
    try:
        import torch
        from transformers import AutoModelForCausalLM
    except ModuleNotFoundError as e:
        raise SpeccompileError(f"--compare-transformers needs {e.name}, which is not installed: pip install "
                               '"speccompile[train]"') from None
    return AutoModelForCausalLM.from_pretrained(directory, dtype=torch.float32, **extra).eval()


def _draft_the_same_way(model, num_draft: int) -> None:
    """transformers reads an assistant's draft length from the assistant's generation config; pin it to ours (a
    constant chain of num_draft tokens, no confidence cut-off) so both sides draft alike."""
    model.generation_config.num_assistant_tokens = num_draft
    model.generation_config.num_assistant_tokens_schedule = "constant"
    model.generation_config.assistant_confidence_threshold = 0.0


COUNTERPARTS = ("lookup", "layerskip", "model")  # drafter kinds transformers' generate() drafts alike


def transformers_drafting(gen, drafter: str, target, workdir: str) -> dict:
    """generate() kwargs that draft as the bundle's drafter (of a kind in COUNTERPARTS) does."""
    d = next(d for d in gen.manifest["drafters"] if d["name"] == drafter)
    if d["kind"] == "lookup":
        return {"prompt_lookup_num_tokens": d["num_draft"], "max_matching_ngram_size": d.get("max_ngram", 3)}
    if d["kind"] == "layerskip":  # transformers' early-exit assistant: the target's first L layers + its head
        _draft_the_same_way(target, d["num_draft"])
        return {"assistant_early_exit": gen.manifest["models"][d["model"]]["num_layers"]}
    assistant = load_hf_model(gen.manifest["models"][d["model"]]["source"], workdir)
    _draft_the_same_way(assistant, d["num_draft"])
    return {"assistant_model": assistant}


def _counterpart(gen, drafter: str, workdir: str, tree: str | None = None) -> bool:
    """Whether transformers drafts as `drafter` does: a tree of our own choosing (the method's own, or --tree,
    which every method without one verifies) or a lossy acceptance has no counterpart. A draft model's source is
    checked now, as the target's is."""
    d = next((d for d in gen.manifest["drafters"] if d["name"] == split_method(drafter)[0]), None)
    if split_method(drafter)[1] or tree or split_acceptance(drafter)[1] or d is None or \
            d["kind"] not in COUNTERPARTS:
        return False
    if d["kind"] == "model":
        check_hf_model(gen.manifest["models"][d["model"]]["source"], workdir)
    return True


def transformers_methods(gen, drafters: list[str], threads: int | None, workdir: str, log,
                         temperature: float = 0.0, top_k: int = 0, tree: str | None = None) -> list[Method]:
    """The methods now, their models on their first run (bench's untimed warm-up of the transformers phase, after
    speccompile's: that phase's peak memory stays speccompile's own); what is missing is refused now."""
    check_hf_model(gen.manifest["source"], workdir)
    eos = list(gen.tokenizer.eos_token_ids)
    # the same decoding as ours: greedy, or sampled at the temperature (top-k 0 is off in transformers too)
    sampling = {"do_sample": True, "temperature": temperature, "top_k": top_k} if temperature else {"do_sample": False}

    @functools.cache
    def target():
        import torch
        import transformers
        transformers.logging.set_verbosity_error()  # its chatter and loading bars would garble bench's progress bar
        transformers.logging.disable_progress_bar()
        if threads:
            torch.set_num_threads(threads)  # process-wide; the same core count as ours
        return load_hf_model(gen.manifest["source"], workdir)

    def runner(drafter: str | None):
        drafting = functools.cache(lambda: transformers_drafting(gen, drafter, target(), workdir) if drafter else {})

        def run(ids, max_new_tokens):
            import torch
            model, kwargs = target(), drafting()
            with torch.inference_mode():
                x = torch.tensor([ids], dtype=torch.long)
                out = model.generate(x, attention_mask=torch.ones_like(x), max_new_tokens=max_new_tokens,
                                     eos_token_id=eos, pad_token_id=eos[0], **sampling, **kwargs)
            return {"token_ids": out[0, len(ids):].tolist()}
        return run

    base = f"{TRANSFORMERS}:{AUTOREGRESSIVE}"
    methods = [Method(base, TRANSFORMERS, None, base, AUTOREGRESSIVE, runner(None))]
    for d in drafters:
        if not _counterpart(gen, d, workdir, tree):
            log(f"transformers has no counterpart of drafter {d}; not compared")
            continue
        methods.append(Method(f"{TRANSFORMERS}:{d}", TRANSFORMERS, d, base, d, runner(d)))
    return methods


# ---- peers for tools/bench_decode.py ------------------------------------------------------------------------------
def export_hf_dir(source: str | None, out_dir: str) -> str:
    """Write the target as a plain fp32 HF directory; both peers load it, so every method runs the same weights
    (for the default model: the GGUF dequantized once, exactly as speccompile's build does)."""
    if not os.path.isfile(os.path.join(out_dir, "config.json")):
        save_hf_dir(load_checkpoint(source, progress=lambda m: print(m, file=sys.stderr)), out_dir)
    return out_dir


def _eos_ids(value) -> list[int]:
    return [value] if isinstance(value, int) else list(value or [])


class TransformersPeer:
    """transformers `generate`, greedy, fp32 on CPU; prompt_lookup_num_tokens > 0 turns on its prompt lookup."""

    def __init__(self, hf_dir: str, threads: int = 2, prompt_lookup_num_tokens: int = 0):
        import torch
        from transformers import AutoModelForCausalLM
        torch.set_num_threads(threads)  # process-wide; the fair setting is the same core count as the others
        self.torch = torch
        self.model = AutoModelForCausalLM.from_pretrained(hf_dir, dtype=torch.float32).eval()
        self.eos = _eos_ids(self.model.config.eos_token_id)
        self.prompt_lookup_num_tokens = prompt_lookup_num_tokens

    def generate(self, prompt_ids: list[int], max_new_tokens: int,
                 prompt_lookup_num_tokens: int | None = None) -> tuple[list[int], float]:
        """prompt_lookup_num_tokens overrides the constructor's, so one loaded model serves both variants."""
        torch = self.torch
        pld = self.prompt_lookup_num_tokens if prompt_lookup_num_tokens is None else prompt_lookup_num_tokens
        extra = {"prompt_lookup_num_tokens": pld} if pld else {}
        t0 = time.perf_counter()
        with torch.inference_mode():
            ids = torch.tensor([prompt_ids], dtype=torch.long)
            out = self.model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=max_new_tokens,
                                      do_sample=False, eos_token_id=self.eos, pad_token_id=self.eos[0], **extra)
        seconds = time.perf_counter() - t0
        return out[0, len(prompt_ids):].tolist(), seconds


class GenAIPeer:
    """onnxruntime-genai on its own model builder's fp32 CPU export; optionally its n-gram speculative decoding.

    N-gram decoding in 0.18 is enabled per request with GeneratorParams.set_speculative_options(ngram_size=N,
    max_draft_tokens=K) (found by probing get_speculative_options(): keys max_draft_tokens, ngram_size,
    ngram_chained_lookup, min_adaptive_k, cooldown; ngram_size 0 = off, >= 2 = on). `ngram_error` says why it
    is unavailable when it is.
    """

    def __init__(self, hf_dir: str, build_dir: str, threads: int = 2, ngram_size: int = 2, max_draft_tokens: int = 4):
        if not os.path.isfile(os.path.join(build_dir, "genai_config.json")):
            self.build(hf_dir, build_dir)
        import numpy as np
        import onnxruntime_genai as og
        self.np, self.og = np, og
        config = og.Config(build_dir)
        # Thread count through a config overlay, so the cached build stays untouched when --threads changes.
        config.overlay(json.dumps({"model": {"decoder": {"session_options": {
            "intra_op_num_threads": threads, "inter_op_num_threads": 1}}}}))
        self.model = og.Model(config)
        with open(os.path.join(build_dir, "genai_config.json")) as f:
            self.eos = _eos_ids(json.load(f)["model"]["eos_token_id"])
        self.ngram_size, self.max_draft_tokens = ngram_size, max_draft_tokens
        self.ngram_error = None
        try:
            self._params(0, ngram=True)
        except Exception as e:  # an older genai without n-gram decoding: report it, never fake it
            self.ngram_error = f"{type(e).__name__}: {e}"
        self.last_stats: dict = {}

    @staticmethod
    def build(hf_dir: str, build_dir: str) -> None:
        """Run genai's model builder on the local HF directory (never the hub): fp32 weights, CPU EP."""
        env = dict(os.environ, HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1")
        cmd = [sys.executable, "-m", "onnxruntime_genai.models.builder", "-i", os.path.abspath(hf_dir),
               "-o", os.path.abspath(build_dir), "-p", "fp32", "-e", "cpu",
               "-c", os.path.abspath(build_dir) + ".tmp"]  # its scratch dir, default ./cache_dir in the cwd
        print("building the genai model: " + " ".join(cmd), file=sys.stderr)
        r = subprocess.run(cmd, env=env, capture_output=True, text=True)  # its log is long; show it on failure only
        shutil.rmtree(os.path.abspath(build_dir) + ".tmp", ignore_errors=True)
        if r.returncode != 0:
            raise RuntimeError(f"genai model builder failed ({r.returncode}):\n{r.stdout[-3000:]}\n{r.stderr[-3000:]}")

    def _params(self, length: int, ngram: bool):
        params = self.og.GeneratorParams(self.model)
        params.set_search_options(do_sample=False, max_length=max(length, 1))  # max_length counts the prompt too
        if ngram:
            params.set_speculative_options(ngram_size=self.ngram_size, max_draft_tokens=self.max_draft_tokens)
        return params

    def generate(self, prompt_ids: list[int], max_new_tokens: int, ngram: bool = False) -> tuple[list[int], float]:
        if ngram and self.ngram_error:
            raise RuntimeError(f"onnxruntime-genai n-gram decoding is unavailable: {self.ngram_error}")
        t0 = time.perf_counter()
        gen = self.og.Generator(self.model, self._params(len(prompt_ids) + max_new_tokens, ngram))
        gen.append_tokens(self.np.asarray(prompt_ids, dtype=self.np.int32))
        while not gen.is_done():
            gen.generate_next_token()
        new = gen.get_sequence(0)[len(prompt_ids):].tolist()
        seconds = time.perf_counter() - t0
        self.last_stats = gen.get_speculative_stats() if ngram else {}
        return new, seconds


class LlamaCppPeer:
    """llama.cpp (llama-cpp-python) on the GGUF file itself: its own quantized kernels, greedy (temperature 0),
    optionally with its prompt-lookup drafting (LlamaPromptLookupDecoding). The prompt ids are speccompile's
    chat template applied, which is the ChatML template the default GGUF carries. Each call starts from an empty
    KV cache (llama-cpp-python would otherwise reuse a prefix shared with the previous prompt): prefill included.
    Its lookup path computes logits for every position (logits_all), so the batch is the whole context: a prompt
    longer than its default batch would not run. eos: the ids the other methods stop at, beside the GGUF's EOS
    (llama-cpp-python names one; ours may stop at more, e.g. an end-of-text beside the end-of-turn)."""

    def __init__(self, gguf_path: str, threads: int = 2, n_ctx: int = 2048, prompt_lookup: int = 0, eos=()):
        from llama_cpp import Llama
        from llama_cpp.llama_speculative import LlamaPromptLookupDecoding
        draft = LlamaPromptLookupDecoding(num_pred_tokens=prompt_lookup) if prompt_lookup else None
        self.llm = Llama(model_path=gguf_path, n_threads=threads, n_threads_batch=threads, n_ctx=n_ctx,
                         n_batch=n_ctx, n_ubatch=n_ctx if draft else 512, logits_all=draft is not None,
                         draft_model=draft, verbose=False)
        self.eos = {self.llm.token_eos(), *eos}

    def generate(self, prompt_ids: list[int], max_new_tokens: int) -> tuple[list[int], float]:
        t0 = time.perf_counter()
        self.llm.reset()
        new = []
        for token in self.llm.generate(prompt_ids, temp=0.0, top_k=1, top_p=1.0, min_p=0.0, repeat_penalty=1.0,
                                       reset=True):
            new.append(int(token))
            if token in self.eos or len(new) >= max_new_tokens:
                break
        return new, time.perf_counter() - t0
