"""`speccompile build`: the compiler driver. Passes, each with one job:

  load      source -> Checkpoint                      (sources.load_checkpoint)
  lower     Checkpoint -> graph weights               (weights/decoder.py lower_weights)
  quantize  layer matrices -> --weights' format       (target_weights.quantize_target: a GGUF's own blocks, int8,
                                                      int4 or float32; what stays float32 is named, with why)
            output head -> its int8 screen            (head_screen.quantize_head: exact greedy argmax)
  graph     weights -> the target's decoder graph     (graph/decoder.py build_decoder), then each drafter's part
            from its kind's build half (compile/drafters/, found through format.drafter_kinds.KINDS), which lowers and
            quantizes its own weights (int8.quantize_matrices: drafts need not be exact) and emits its graphs
  precision graphs + weights -> --dtype                (precision.apply_precision: float16 / bfloat16)
  write     graphs + weights + tokenizer -> bundle    (format/bundle.py), atomically (format/output_dir.py)
"""
from __future__ import annotations

import dataclasses
import os
import time

import onnx

from speccompile import __version__
from speccompile.compile import trt_backend
from speccompile.compile.checkpoint import Checkpoint, tokenizer_fingerprint
from speccompile.compile.config import ModelConfig
from speccompile.compile.drafters import build_half
from speccompile.compile.drafters.base import DEFAULT_MAX_SEQ_LEN, BuildOptions, DrafterBuild, Graph, TargetBuild
from speccompile.compile.graph.attention import lowering_for
from speccompile.compile.graph.decoder import build_decoder
from speccompile.compile.graph.head_screen import screenable
from speccompile.compile.graph.kv_compact import build_kv_compact
from speccompile.compile.kv_dtype import apply_kv_dtype, check_kv_dtype
from speccompile.compile.quantize.head_screen import quantize_head
from speccompile.compile.quantize.kernel_form import head_rows, int8_records, kernels_pay, use_kernel
from speccompile.compile.quantize.target_weights import (HEAD_ON_ROWS, HEAD_READ_WHOLE, WeightReport, check_mode,
                                                         quantize_target)
from speccompile.compile.weights.decoder import lower_weights
from speccompile.compile.model_entries import batched_entry, batched_form, decoder_entry
from speccompile.compile.precision import apply_precision, check_dtype
from speccompile.compile.sources import load_checkpoint, shipped_head
from speccompile.errors import SpeccompileError, given, option
from speccompile.format.bundle import finalize_manifest, write_weights
from speccompile.format.output_dir import atomic_bundle_dir, guard_output
from speccompile.format.drafter_kinds import BATCHED_DECODER_KIND, KINDS, DraftSpec, asked_drafter
from speccompile.format.trees import TreeSpec
from speccompile.format.memory import memory_line
from speccompile.graphs import cache_slots, trees_exact
from speccompile.plugins import tree_attention


@dataclasses.dataclass
class BundleParts:
    """What the graph pass gathers for the write pass: the target's graph, then each drafter's part merged in."""
    weights: dict[str, dict]  # weight file -> tensors
    graphs: dict[str, Graph]  # model name -> graph
    models: dict[str, dict]  # model name -> manifest entry
    drafters: list[dict] = dataclasses.field(default_factory=list)  # the manifest's drafter entries

    def add(self, entry: dict, built: DrafterBuild) -> None:
        entry |= built.entry
        deepest = built.max_num_draft
        if deepest is not None:
            entry["num_draft"] = min(entry["num_draft"], deepest)
            tree = entry["tree"]
            if tree and tree["kind"] in ("chain", "static") and tree["depth"] > deepest:
                raise SpeccompileError(f"{option('tree')}: this {tree['kind']} tree is {tree['depth']} deep, and "
                                       f"drafter {entry['name']!r} drafts at most {deepest} deep (one position per "
                                       "head)")
        self.weights |= built.weights
        self.graphs |= built.graphs
        self.models |= built.models
        self.drafters.append(entry)


@guard_output("out", "overwrite")  # --out locked and checked (never a user's files) before any work
def build_bundle(source: str | None, out: str, drafts: list[str] | None = None, progress=print,
                 overwrite: bool = False, **options) -> dict:
    """Compile `source` and its drafters into the bundle `out`. drafts=None: the MTP head shipped for the target
    if there is one, and prompt lookup. options: the fields of BuildOptions (backend="tensorrt" adds a TensorRT
    engine per model, see trt_backend)."""
    t0 = time.perf_counter()
    _check_sources(source, drafts)
    asked = BuildOptions(overwrite=overwrite, **options)
    opts, toolchain = _backend(asked)
    if opts.draft_precision != asked.draft_precision:
        progress(f"      --backend {opts.backend}: draft heads in {opts.draft_precision} (no int8 form in TensorRT)")
    tree_spec, specs = _check_request(opts, drafts)
    target, opts = _load(source, opts, progress)
    target_w = _lower(target, opts, progress)
    target_w, screen, report = _quantize(target, target_w, opts, progress)
    layers_on_kernels = any(k != "head_screen.codes" for k in report.kernel_matrices)
    opts = dataclasses.replace(opts, attention=lowering_for(target.config, opts.attention, report.kernel_library,
                                                            layers_on_kernels))
    if opts.attention == "kernel":
        progress("      attention: speccompile's TreeAttention kernel")
    if drafts is None:
        specs = _default_drafters(target, bool(report.kernel_matrices), progress)
    parts = _graph(target, target_w, screen, specs, tree_spec, opts, progress,
                   chains=not trees_exact(report.manifest()), int8_kernel=report.int8_kernel)
    apply_kv_dtype(parts, opts.kv_dtype, opts.attention, progress)
    apply_precision(parts, opts.dtype, progress)
    manifest = _write(out, target, parts, opts, toolchain, progress, report)
    progress(f"done in {time.perf_counter() - t0:.1f}s: {len(parts.models)} graph(s), drafters: "
             f"{', '.join(d['name'] for d in parts.drafters) or 'none'}")
    progress(f"      memory: {memory_line(manifest)}")  # what a load may take, before anyone loads it
    return manifest


def _backend(opts: BuildOptions) -> tuple[BuildOptions, object]:
    """The backend's toolchain (None for onnxruntime). Checked first: a build refused for want of TensorRT has
    done and written nothing."""
    check_dtype(opts.dtype)
    check_kv_dtype(opts.kv_dtype, opts.dtype, opts.backend)
    if opts.backend == "tensorrt":
        if opts.dtype != "float32":  # the plugin's kernels read and write float32
            raise SpeccompileError(f"{given('backend', 'tensorrt')} builds float32 engines; "
                                   f"{given('dtype', opts.dtype)} is for {given('backend', 'onnxruntime')}")
        toolchain = trt_backend.require_toolchain()
        # TreeAttention as the plugin's node; the CPU graphs get its expansion. Draft heads in float32: their int8
        # form is onnxruntime's MatMulNBits, which TensorRT does not take (the target's matrices fall back alike,
        # in the quantize pass)
        return dataclasses.replace(opts, attention="plugin", fused=False, draft_precision="float32"), toolchain
    if opts.backend != "onnxruntime":
        raise SpeccompileError(f"{given('backend', opts.backend)}: choose onnxruntime or tensorrt")
    return opts, None


def _default_drafters(target: Checkpoint, kernels: bool, progress) -> list[DraftSpec]:
    """The shipped head (its default tree joins lookup's drafts) and prompt lookup alone, the one first that decodes
    faster on this build: over onnxruntime's products they draw level, over speccompile's kernels' cheaper plain
    step the head's pass no longer pays for itself (docs/results.md, "An int8 kernel for the head's screen")."""
    if not shipped_head(target):
        return [DraftSpec("lookup")]
    if kernels:
        progress("      drafters: prompt lookup first (the default), then the shipped MTP head (--drafter mtp)")
        return [DraftSpec("lookup"), DraftSpec("mtp")]
    return [DraftSpec("mtp"), DraftSpec("lookup")]


def _check_sources(source, drafts) -> None:
    """build_bundle's source and drafts by type (the CLI's arguments are strings): a string of drafts would be read
    one character a drafter."""
    if source is not None and not isinstance(source, (str, os.PathLike)):
        raise SpeccompileError(f"{given('source', source, flag='MODEL')}: expected a checkpoint's path or name")
    if drafts is not None and (not isinstance(drafts, (list, tuple)) or not all(isinstance(d, str) for d in drafts)):
        raise SpeccompileError(f"{asked_drafter(drafts)}: expected a list of drafter specs, such as "
                               "['mtp', 'lookup']")


def _check_request(opts: BuildOptions, drafts: list[str] | None) -> tuple[TreeSpec | None, list[DraftSpec]]:
    """The options that need no checkpoint, checked before it is read: the tree, the drafts, their sizes."""
    tree_spec = TreeSpec.parse(opts.tree) if opts.tree else None
    check_mode(opts.weights)
    if opts.draft_precision not in ("int8", "float32"):
        raise SpeccompileError(f"{given('draft_precision', opts.draft_precision)}: choose int8 or float32")
    parsed = [DraftSpec.parse(d) for d in drafts or ()]
    specs = [s for s in parsed if s is not None]
    if specs and len(specs) < len(parsed):  # "none" would be dropped, the others built: the one or the others
        raise SpeccompileError(f"{asked_drafter('none')} builds no drafter, and "
                               f"{asked_drafter(specs[0].name)} one: give either")
    names = [s.name for s in specs]
    twice = next((n for n in names if names.count(n) > 1), None)
    if twice is not None:  # one bundle drafter per name: its graph, weights and manifest entry go by it
        raise SpeccompileError(f"{option('drafts', flag='--draft')}: two drafters named {twice!r}; a bundle holds "
                               "one drafter of each kind (layerskip:L one per L): build another bundle for the other")
    if opts.num_draft is not None and not 1 <= opts.num_draft <= 16:
        raise SpeccompileError(f"{given('num_draft', opts.num_draft)}: must be between 1 and 16")
    if drafts is not None and not specs and (opts.num_draft is not None or tree_spec is not None):
        # a bundle without drafters verifies nothing: the option would be dropped without a word
        raise SpeccompileError(f"{option('num_draft' if opts.num_draft is not None else 'tree')} sizes the drafts, "
                               f"and {asked_drafter('none')} builds no drafter: give a drafter, or "
                               "neither")
    if opts.num_draft is not None and tree_spec is not None:  # every drafter would verify the tree alone
        raise SpeccompileError(f"{option('num_draft')} asks for a chain of that many drafts, {option('tree')} for a "
                               f"tree: give one (a chain of K is the tree 'chain:K')")
    if not 1 <= opts.max_batch <= 64:
        raise SpeccompileError(f"{given('max_batch', opts.max_batch)}: must be between 1 and 64")
    if opts.attention not in (*tree_attention.LOWERINGS, "auto"):
        raise SpeccompileError(f"{given('attention', opts.attention)}: choose auto, "
                               f"{', '.join(tree_attention.LOWERINGS)}")
    if opts.mla_cache not in ("latent", "expanded"):  # build_bundle's keyword alone: the CLI has no such option
        raise SpeccompileError(f"mla_cache={opts.mla_cache!r}: choose latent or expanded")
    _check_cpu_only_graphs(opts.dtype, specs)
    return tree_spec, specs


# drafters with a graph the runtime opens on onnxruntime's CPU provider whatever the device (their runtime modules)
CPU_ONLY_GRAPHS = {"medusa": "its heads", "eagle3": "its fc graph"}


def _check_cpu_only_graphs(dtype: str, specs: list[DraftSpec]) -> None:
    """bfloat16 has no CPU kernels (no bfloat16 MatMul): such a drafter's graph would make the bundle load nowhere."""
    kind = next((s.kind for s in specs if s.kind in CPU_ONLY_GRAPHS), None)
    if dtype == "bfloat16" and kind is not None:
        raise SpeccompileError(f"{given('dtype', 'bfloat16')} with {asked_drafter(kind)}: "
                               f"{CPU_ONLY_GRAPHS[kind]} run on onnxruntime's CPU provider on every device, which "
                               f"has no bfloat16 kernels; build with {given('dtype', 'float16')}")


def _load(source: str | None, opts: BuildOptions, progress) -> tuple[Checkpoint, BuildOptions]:
    """Load pass: the target checkpoint, checked against the options that depend on it (an unset --max-seq-len
    becomes min(DEFAULT_MAX_SEQ_LEN, the model's context))."""
    progress("[1/4] load: reading the target checkpoint")
    target = load_checkpoint(source, progress)
    if opts.max_seq_len is None:
        opts = dataclasses.replace(opts, max_seq_len=min(DEFAULT_MAX_SEQ_LEN, target.config.max_position_embeddings))
    if target.config.is_mla:
        target.config = dataclasses.replace(target.config, mla_cache=opts.mla_cache)
    cfg = target.config
    cfg.check_lowerable(opts.max_seq_len)
    if not 16 <= opts.max_seq_len <= cfg.max_position_embeddings:
        raise SpeccompileError(f"{given('max_seq_len', opts.max_seq_len)}: must be between 16 and the model's "
                               f"max_position_embeddings ({cfg.max_position_embeddings})")
    progress(f"      {cfg.model_type}: {cfg.num_hidden_layers} layers, hidden {cfg.hidden_size}, "
             f"{cfg.num_attention_heads}/{cfg.num_key_value_heads} heads, vocab {cfg.vocab_size}")
    return target, opts


def _lower(target: Checkpoint, opts: BuildOptions, progress) -> dict:
    """Lower pass: the target's weights as its graphs read them (target.bin)."""
    progress("[2/4] lower: packing weights")
    return lower_weights(target.config, target.tensors, opts.max_seq_len)


def _quantize(target: Checkpoint, target_w: dict, opts: BuildOptions, progress) -> tuple[dict, bool, WeightReport]:
    """Quantize pass: the layer matrices in --weights' format, and the output head's int8 screen when the build
    asks for it; both only where the graphs can run MatMulNBits (fused graphs: it is onnxruntime's; TensorRT
    builds are unfused; float32 builds only: the screen's exactness bound is for float32 products).
    Returns (target.bin, screened, what each matrix became)."""
    cfg = target.config
    native = ("the graphs of this build have no MatMulNBits (TensorRT, or unfused)" if not opts.fused else
              f"--dtype {opts.dtype}: the precision pass converts float weights only" if opts.dtype != "float32"
              else None)
    screen = (opts.head_screen and opts.fused and opts.dtype == "float32"
              and screenable(cfg.hidden_size, cfg.vocab_size))
    kernel, why_not = use_kernel(opts.kernels, native)
    target_w, report = quantize_target(target_w, target.stored, opts.weights, native, head_screened=screen,
                                       kernel=kernel)
    report.kernel_library = kernel
    progress(f"      quantize: --weights {opts.weights}: {report.summary()}")
    if report.kernel_matrices:
        progress(f"      quantize: {len(report.kernel_matrices)} 4-bit products by speccompile's MatMulQ4 kernel")
    elif opts.kernels == "auto" and any(f.startswith(("q4_0", "q4_1")) for f in report.formats.values()):
        progress(f"      quantize: 4-bit products by onnxruntime's MatMulNBits ({why_not})")
    if screen:
        progress("      quantize: int8 screen of the output head (greedy argmax stays exact)")
        target_w = target_w | quantize_head(target_w.get("lm_head", target_w["embed"]))
    if kernel and kernels_pay():
        target_w = target_w | head_rows(target_w)
        target_w, int8 = int8_records(target_w)
        report.kernel_matrices += int8
        report.int8_kernel = True
        if int8:
            progress(f"      quantize: {', '.join(int8)} by speccompile's MatMulQ8 kernel")
        if "head_screen.rows" in target_w:  # the graphs gather the head's rows (a tied embedding's too) from them
            head = "lm_head" if "lm_head" in target_w else "embed"  # and _write checks that none reads it whole
            report.fallbacks[head] = HEAD_ON_ROWS
    for name, why in report.fallbacks.items():
        progress(f"        {name} stays {opts.dtype}: {why}")  # float: the precision pass's dtype
    return target_w, screen, report


def _graph(target: Checkpoint, target_w: dict, screen: bool, specs: list[DraftSpec], tree_spec: TreeSpec | None,
           opts: BuildOptions, progress, chains: bool = False, int8_kernel: bool = False) -> BundleParts:
    """Graph pass: the target's graph (with in-graph acceptance, and the features drafters read), then each
    drafter's part from its kind's build half. chains: the target verifies one path a pass (graphs.trees_exact)."""
    progress("[3/4] graph: emitting static decoder graphs")
    cfg, max_seq_len = target.config, opts.max_seq_len
    features = target_features(specs, cfg)
    # TensorRT has no float64 (the verify extension's probabilities): its engines leave acceptance to the host
    verify = opts.backend != "tensorrt"
    graph = build_decoder(cfg, target_w, max_seq_len, attention=opts.attention, fused=opts.fused, name="target",
                          verify=verify, aux_layers=features)
    model = decoder_entry("target", cfg, cfg.num_hidden_layers, max_seq_len, ["target.bin"], opts.attention,
                          verify=verify, aux_layers=features, screen=screen)
    if features:
        model["aux_hidden_layers"] = features
    parts = BundleParts({"target.bin": target_w}, {"target": (graph, ["target.bin"])}, {"target": model})
    _batched_target(parts, cfg, target_w, screen, features, opts, progress)
    view = TargetBuild(target, target_w, opts, features, progress, int8_kernel)
    for spec in specs:
        parts.add(_drafter_entry(spec, tree_spec, opts, chains), build_half(spec.kind).build(spec, view))
        if opts.num_draft and parts.drafters[-1]["num_draft"] < opts.num_draft:
            progress(f"      {spec.name}: drafts at most {parts.drafters[-1]['num_draft']} tokens a pass (one per "
                     f"head): --num-draft {opts.num_draft} is cut to that for it")
    for g, _ in parts.graphs.values():  # each keeps the weights its nodes read; the write pass stores only those
        g.drop_unread_weights()
    return parts


def _batched_target(parts: BundleParts, cfg: ModelConfig, target_w: dict, screen: bool, features: list,
                    opts: BuildOptions, progress) -> None:
    """The batched form of the target's graph (speccompile.graphs), which concurrent requests share passes through:
    the same weights (target.bin), so it costs the bundle only its graph. Dense GQA models with the fused kernel."""
    if opts.max_batch == 1:  # (its range was checked with the other options, _check_request)
        return
    if not batched_form(cfg, opts.attention, opts.dtype):
        progress("      batched graph skipped: MLA, mixture-of-experts, sliding windows, float16 and non-ort attention "
                 "run one sequence per pass")
        return
    graph = build_decoder(cfg, target_w, opts.max_seq_len, attention=opts.attention, fused=opts.fused,
                          name="target_batch", aux_layers=features, batched=True)
    model = batched_entry(decoder_entry("target_batch", cfg, cfg.num_hidden_layers, opts.max_seq_len, ["target.bin"],
                                        opts.attention, aux_layers=features, screen=screen, batched=True),
                          "target_batch", opts.max_batch, BATCHED_DECODER_KIND)
    if features:
        model["aux_hidden_layers"] = features
    parts.graphs["target_batch"] = (graph, ["target.bin"])
    parts.models["target_batch"] = model


def target_features(specs: list[DraftSpec], cfg: ModelConfig) -> list:
    """What the target graph outputs as aux_hidden_states: the union of the features the drafters' kinds ask for
    (their build half's optional `target_features`), layer ids ascending, then named ones ("norm")."""
    taps = set()
    for spec in specs:
        ask = getattr(build_half(spec.kind), "target_features", None)
        if ask is not None:
            taps.update(ask(spec, cfg))
    return sorted(taps, key=lambda tap: (isinstance(tap, str), tap))


def _drafter_entry(spec: DraftSpec, tree_spec: TreeSpec | None, opts: BuildOptions, chains: bool) -> dict:
    """A drafter's manifest entry as every kind has it: its name, tokens per pass and tree. chains: the target
    verifies one path a pass (speccompile.graphs.trees_exact)."""
    kind = KINDS[spec.kind]
    default = kind.chain_tree if chains and kind.chain_tree else kind.default_tree
    tree = tree_spec or (TreeSpec.parse(default) if opts.num_draft is None and default else None)
    return {"name": spec.name, "kind": spec.kind, "num_draft": opts.num_draft or kind.default_num_draft,
            "tree": tree.to_dict() if tree else None}


def _write(out: str, target: Checkpoint, parts: BundleParts, opts: BuildOptions, toolchain, progress,
           report: WeightReport) -> dict:
    """Write pass: weights, graphs, engines, tokenizer and manifest into `out`, all or nothing."""
    if toolchain:  # before anything is written: every graph needs a TensorRT form
        for name, (g, _) in parts.graphs.items():
            trt_backend.check_lowerable(g.nodes, name)
    progress(f"[4/4] write: {out}")
    read = {n for g, _ in parts.graphs.values() for n in g.weights}
    for head in ("embed", "lm_head"):
        if report.fallbacks.get(head) == HEAD_ON_ROWS and head in read:  # a drafter's graph reads the float32 head
            report.fallbacks[head] = HEAD_READ_WHOLE
            progress(f"        {head} stays float32: {HEAD_READ_WHOLE}")
    with atomic_bundle_dir(out, opts.overwrite) as tmp:
        refs = {}
        for fname, w in parts.weights.items():
            w = {n: a for n, a in w.items() if n in read}  # what no graph reads is not written
            mb = sum(a.nbytes for a in w.values()) / 2**20
            progress(f"      {fname}: {len(w)} tensors, {mb:.1f} MiB")
            refs[fname] = write_weights(os.path.join(tmp, fname), w, fname)
        _write_graphs(tmp, parts, refs, toolchain)
        _write_kv_compact(tmp, parts.models)
        verify_rows = max((d["tree"]["size"] if d["tree"] else d["num_draft"] for d in parts.drafters),
                          default=1) + 1
        trt_info = (trt_backend.write_engines(toolchain, tmp, parts.graphs, refs, parts.models, verify_rows, progress)
                    if toolchain else None)
        os.makedirs(os.path.join(tmp, "tokenizer"))
        for fname, data in target.tokenizer_files.items():
            with open(os.path.join(tmp, "tokenizer", fname), "wb") as f:
                f.write(data)
        return finalize_manifest(tmp, {
            "created_by": f"speccompile {__version__}",
            "source": target.source,
            "max_seq_len": opts.max_seq_len,
            "models": parts.models,
            "weights": {fname: {n: {k: r[k] for k in ("offset", "length", "dtype", "shape")} for n, r in rs.items()}
                        for fname, rs in refs.items()},
            "drafters": parts.drafters,
            "quantization": {"file": "target.bin", **report.manifest()},
            "tokenizer": {"dir": "tokenizer", "fingerprint": tokenizer_fingerprint(target.tokenizer_files)},
            "backend": opts.backend,
            "dtype": opts.dtype,
            **({"tensorrt": trt_info} if toolchain else {}),
        })


def _write_graphs(tmp: str, parts: BundleParts, refs: dict, toolchain) -> None:
    """Each graph as ONNX, its initializers pointing into the weight files already written."""
    for name, (g, wfiles) in parts.graphs.items():
        model = g.to_model({n: r for f in wfiles for n, r in refs[f].items()})
        if toolchain:  # the CPU runtime's copy of a plugin-lowered graph: the node's reference ops instead
            model = tree_attention.expand_plugin_nodes(model)
            if "attention" in parts.models[name]:
                parts.models[name]["attention"] = "reference"
        onnx.save_model(model, os.path.join(tmp, f"{name}.onnx"))
        parts.models[name]["initializers"] = sorted(g.weights)


def _write_kv_compact(tmp: str, models: dict) -> None:
    """Each cached model's KV compaction graph (compile/graph/kv_compact.py), which a device-resident cache runs."""
    for name, entry in models.items():
        kv = entry.get("kv_cache")
        if kv is None:
            continue
        model = build_kv_compact(kv["num_layers"], kv["num_kv_heads"], cache_slots(kv), kv["head_dim"],
                                 kv.get("dtype", "float32"))
        entry["kv_compact"] = f"{name}.kv_compact.onnx"
        onnx.save_model(model, os.path.join(tmp, entry["kv_compact"]))
