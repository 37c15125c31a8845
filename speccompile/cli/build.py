"""`speccompile build`: compile a model and its drafters into a bundle."""
from __future__ import annotations

import signal
import sys

import click

from speccompile.cli.common import progress
from speccompile.cli.errors import errors_to_exit
from speccompile.errors import SpeccompileError
from speccompile.graphs import DEFAULT_MAX_BATCH

BUILD_DEPENDENCIES = {"onnx", "gguf", "safetensors", "tqdm"}  # the build extra: the runtime does without them


@click.command()
@click.argument("model", required=False, default=None)
@click.option("--out", "-o", required=True, type=click.Path(), help="Bundle directory to write.")
@click.option("--draft", "drafts", multiple=True,
              help="Drafter: mtp[:PATH] | model:PATH | lookup[:N] | layerskip:L | eagle:PATH | eagle3:PATH | "
                   "medusa:PATH | none. Repeat for several. "
                   "Default: the MTP head shipped for the target, if any, then lookup.")
@click.option("--max-seq-len", type=int, default=None,
              help="Static KV cache length (prompt + output) [default: 2048, or the model's context if shorter].")
@click.option("--num-draft", type=int, default=None,
              help="Tokens each drafter proposes per verify pass, 1-16, as a chain [default: 4; MTP heads: the "
                   "tree dynamic:2+lookup:6 over a float32 target, adaptive+lookup:6 over a 4-bit one, unless "
                   "--num-draft or --tree is given].")
@click.option("--attention", type=click.Choice(["auto", "ort", "kernel", "reference"]), default="auto",
              show_default=True,
              help="TreeAttention lowering: onnxruntime's fused kernel; speccompile's own CPU kernel (with "
                   "speccompile's kernels: a plain step faster, a verify row a larger share of it); standard ONNX ops "
                   "only; auto: speccompile's where the target's products run on speccompile's kernels and its "
                   "heads fit, else onnxruntime's.")
@click.option("--tree", default=None, help="Verify a token tree per pass: chain:K | static:FILE.json | dynamic:N | "
              "adaptive[:D], each optionally joined by up to L prompt-lookup nodes with +lookup:L (default: a chain "
              "of --num-draft tokens).")
@click.option("--force", is_flag=True, help="Replace an existing bundle.")
@click.option("--backend", type=click.Choice(["onnxruntime", "tensorrt"]), default="onnxruntime", show_default=True,
              help="tensorrt: also a TensorRT engine per model, TreeAttention as a plugin (needs TensorRT >= 10, a "
                   "CUDA GPU and the plugin library: plugins/tree_attention/README.md); the bundle's onnxruntime "
                   "graphs then use the reference attention ops.")
@click.option("--head-screen/--no-head-screen", default=True, show_default=True,
              help="Greedy passes find the argmax of the output head through an int8 screen and float32 rescoring "
                   "of its best candidates, certified exact (falling back to the full product when not); so do "
                   "passes sampled at a temperature (with or without top-k), as the argmax of logits plus Gumbel "
                   "noise; ort attention only.")
@click.option("--draft-precision", type=click.Choice(["int8", "float32"]), default="int8", show_default=True,
              help="Weights of draft heads (MTP, EAGLE, Medusa; not DeepSeek-V3's own MTP module): int8 reads a "
                   "quarter of the bytes per drafting pass (drafts need not be exact: the target verifies them).")
@click.option("--dtype", type=click.Choice(["float32", "float16", "bfloat16"]), default="float32", show_default=True,
              help="Graphs, weights and KV caches (norms and softmax accumulate in float32): float16 for GPUs, "
                   "bfloat16 for the CUDA provider only.")
@click.option("--weights", type=click.Choice(["source", "float32", "int8", "int4"]), default="source",
              show_default=True, help="The target's layer matrices: source keeps a quantized GGUF's blocks (its "
              "weights exactly; products round activations to 8 bits, as llama.cpp does; a float checkpoint stays "
              "float32); float32 dequantizes them; int8/int4 quantize float weights block-wise (lossy; a quantized "
              "GGUF's blocks are rounded again). build lists each matrix that stays float32 and why.")
@click.option("--max-batch", type=int, default=DEFAULT_MAX_BATCH, show_default=True,
              help="Sequence slots of the batched target graph that concurrent requests share passes through "
                   "(1: none; built for float32 dense models without sliding windows, ort attention: other bundles "
                   "serialize calls as with 1).")
@click.option("--kernels", type=click.Choice(["onnxruntime", "speccompile", "auto"]), default="auto",
              show_default=True, help="4-bit products (a GGUF's Q4_0 / Q4_1 blocks) and int8 ones (the output head's "
              "screen, draft heads): onnxruntime's MatMulNBits (any machine, GPUs), or speccompile's own CPU kernels "
              "(x86-64 with AVX2 and a C compiler; the same rounding, faster at every row count with AVX-512 VNNI, but "
              "the bundle runs only where the kernels do); auto: speccompile's where they pay on this machine "
              "(AVX-512 VNNI), else onnxruntime's.")
@click.option("--kv-dtype", type=click.Choice(["float32", "float16"]), default=None,
              help="KV caches alone (default: --dtype's): float16 halves what a long context or a shared pass streams "
              "per token, under float32 graphs with speccompile's attention kernel; lossy against float32 caches "
              "(docs/results.md).")
@errors_to_exit
def build(model, out, drafts, max_seq_len, num_draft, attention, tree, force, backend, head_screen, draft_precision,
          dtype, weights, max_batch, kernels, kv_dtype):
    """Compile MODEL (a Hugging Face directory, a hub id org/name in the local Hugging Face cache, a .gguf file;
    default: the embedded SmolLM2-135M-Instruct)."""
    # SIGTERM (a kill, a CI timeout) as an exit: the build's cleanup then removes its lock and temporary folder and
    # leaves an earlier bundle as it was, as Ctrl-C does
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(128 + signal.SIGTERM))
    try:
        from speccompile.compile.driver import build_bundle
        build_bundle(model, out, list(drafts) or None, max_seq_len=max_seq_len, num_draft=num_draft,
                     attention=attention, fused=attention in ("auto", "ort", "kernel"), overwrite=force, tree=tree,
                     backend=backend,
                     head_screen=head_screen, draft_precision=draft_precision, dtype=dtype, weights=weights,
                     max_batch=max_batch, kernels=kernels, kv_dtype=kv_dtype, progress=progress)
    except ModuleNotFoundError as e:  # a runtime-only install (pip install speccompile, without [build])
        if e.name not in BUILD_DEPENDENCIES:
            raise
        raise SpeccompileError(f'build needs {e.name}, which is not installed: pip install "speccompile[build]"') \
            from None
