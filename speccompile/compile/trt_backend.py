"""`speccompile build --backend tensorrt`: a TensorRT engine for each model of the bundle.

Written for a machine with TensorRT >= 10 and a CUDA GPU, and untested until run on one with TensorRT (what is
and is not checked: plugins/tree_attention/README.md). For each model the bundle gets, beside its onnxruntime graph:

  <model>.trt.onnx  the same model lowered for TensorRT: TreeAttention as the one plugin node
                    (`attention="plugin"`), the norms in primitive ops (`prepare_graph`), opset 20
  <model>.engine    TensorRT's ONNX parser over that graph, the TreeAttention node resolved to the plugin library
                    built from plugins/tree_attention/tensorrt, one optimization profile over the step length
  tensorrt/<lib>    a copy of the plugin library the engines were built with, for tools such as trtexec (the
                    runtime loads its own installation's build, never a library from a bundle)

The bundle's onnxruntime graphs (<model>.onnx) are the same plugin-lowered graphs with each TreeAttention node
expanded into its reference ops (tree_attention.expand_plugin_nodes), so the CPU runtime runs such a bundle
unchanged. The target's graph has no verify extension (TensorRT has no float64): acceptance runs on the host.
`generate --backend tensorrt` drives the engines (runtime/trt_engine.py), the KV caches in device memory.
"""
from __future__ import annotations

import dataclasses
import os
import shutil

import numpy as np

from speccompile.errors import SpeccompileError, UnsupportedModelError, given
from speccompile.plugins import tree_attention
from speccompile.graphs import MAX_STEP_TOKENS  # the runtime's largest step: a prefill chunk
from speccompile.plugins.tree_attention.tensorrt_plugin import (BUILD_PLUGIN, PLUGIN_ENV, cuda_gpu, load_plugin,
                                                               plugin_library_path)

MIN_TENSORRT_MAJOR = 10  # IPluginV3, and the ONNX parser's fallback to IPluginV3 creators
TRT_OPSET = 20  # every TensorRT 10 ONNX parser reads opsets 9..20; the graphs use nothing newer once prepared
# the backends as the caller names them: build_bundle's backend="tensorrt", build's --backend tensorrt
TENSORRT, ONNXRUNTIME = given("backend", "tensorrt"), given("backend", "onnxruntime")
# Ops with a rewrite in prepare_graph; everything else must be standard ONNX or the plugin node.
# onnxruntime registers SimplifiedLayerNormalization in the ONNX domain as well as its own: both spellings occur
_EXPANDED = {("", "RMSNormalization"), ("com.microsoft", "SimplifiedLayerNormalization"),
             ("", "SimplifiedLayerNormalization")}


class TensorRTUnavailable(SpeccompileError):
    """--backend tensorrt on a machine without TensorRT, a CUDA GPU or the plugin library."""


@dataclasses.dataclass
class Toolchain:
    trt: object  # the tensorrt module
    plugin_library: str
    gpu: str  # CUDA device 0, by name


def require_toolchain() -> Toolchain:
    """What --backend tensorrt needs, or TensorRTUnavailable naming everything that is missing. Called before a
    build does any work, so a refused build has written nothing."""
    missing = []
    trt = None
    try:
        import tensorrt as trt
    except ImportError as e:
        missing.append(f"the TensorRT Python package ({e}; pip install 'speccompile[tensorrt]')")
    else:
        major = int(str(trt.__version__).split(".")[0])
        if major < MIN_TENSORRT_MAJOR:
            missing.append(f"TensorRT >= {MIN_TENSORRT_MAJOR} (found {trt.__version__})")
    gpu, why = cuda_gpu()
    if gpu is None:
        missing.append(f"a CUDA GPU ({why})")
    lib = plugin_library_path()
    if not os.path.isfile(lib):
        where = f"${PLUGIN_ENV}={lib}" if os.environ.get(PLUGIN_ENV) else lib
        missing.append(f"the TreeAttention plugin library {where} (build it: {BUILD_PLUGIN}; or set ${PLUGIN_ENV})")
    if missing:
        raise TensorRTUnavailable(f"{TENSORRT} needs TensorRT, a CUDA GPU and the TreeAttention plugin library; "
                                  "missing here: " + "; ".join(missing) +
                                  f". Without them build with the default {ONNXRUNTIME}.")
    return Toolchain(trt, os.path.abspath(lib), gpu)


def check_lowerable(nodes, model_name: str) -> None:
    """Refuse, naming the op, a graph with an op that has no TensorRT form (e.g. DeepSeek's MLA attention, which
    calls onnxruntime's GroupQueryAttention directly)."""
    for n in nodes:
        key = (n.domain or "", n.op_type)
        if key[0] in ("", "ai.onnx") or key in _EXPANDED or key == (tree_attention.DOMAIN, tree_attention.OP_TYPE):
            continue
        hint = " (multi-head latent attention)" if n.op_type == "GroupQueryAttention" else ""
        raise UnsupportedModelError(f"{TENSORRT}: model {model_name!r} uses {key[0]}::{n.op_type}{hint}, "
                                    f"which has no TensorRT lowering; build it with {ONNXRUNTIME}")


def prepare_graph(model):
    """A plugin-lowered graph in the form TensorRT's ONNX parser takes (a new ModelProto): RMSNormalization-23
    and onnxruntime's SimplifiedLayerNormalization expanded into Mul/ReduceMean/Add/Sqrt/Div/Mul, opset 20,
    IR 9. The TreeAttention node stays for the plugin. `check_graph` validates it once saved."""
    import onnx
    from onnx import helper, numpy_helper

    check_lowerable(model.graph.node, model.graph.name)
    m = onnx.ModelProto()
    m.CopyFrom(model)
    nodes = []
    for i, n in enumerate(m.graph.node):
        if (n.domain or "", n.op_type) not in _EXPANDED:
            nodes.append(n)
            continue
        a = {x.name: helper.get_attribute_value(x) for x in n.attribute}
        if a.get("axis", -1) != -1 or sum(1 for o in n.output if o) != 1:
            raise UnsupportedModelError(f"{n.op_type} node {n.name!r}: only the last-axis norm with one output has "
                                        "a TensorRT form here")
        p = f"{n.name or n.op_type}#{i}/"
        x, gamma = n.input[0], n.input[1]
        m.graph.initializer.extend([numpy_helper.from_array(np.array(a.get("epsilon", 1e-5), np.float32), p + "eps"),
                                    numpy_helper.from_array(np.array([-1], np.int64), p + "axes")])
        nodes += [helper.make_node("Mul", [x, x], [p + "sq"], name=p + "Mul"),
                  helper.make_node("ReduceMean", [p + "sq", p + "axes"], [p + "ms"], name=p + "ReduceMean", keepdims=1),
                  helper.make_node("Add", [p + "ms", p + "eps"], [p + "var"], name=p + "Add"),
                  helper.make_node("Sqrt", [p + "var"], [p + "rms"], name=p + "Sqrt"),
                  helper.make_node("Div", [x, p + "rms"], [p + "normed"], name=p + "Div"),
                  helper.make_node("Mul", [p + "normed", gamma], [n.output[0]], name=p + "Scale")]
    del m.graph.node[:]
    m.graph.node.extend(nodes)
    used = {n.domain or "" for n in nodes}
    imports = [helper.make_opsetid("", TRT_OPSET)] + [o for o in m.opset_import
                                                        if o.domain not in ("", "ai.onnx") and o.domain in used]
    del m.opset_import[:]
    m.opset_import.extend(imports)
    m.ir_version = 9  # opset 20's IR version: no newer than the parser knows
    return m


def check_graph(path: str) -> None:
    """onnx.checker on a saved graph (by path, so external weights resolve beside it): every op must exist at
    the graph's opset, the custom domain must be imported."""
    import onnx

    try:
        onnx.checker.check_model(path)
    except onnx.checker.ValidationError as e:
        raise SpeccompileError(f"{os.path.basename(path)} is not valid ONNX: {e}") from None


def profile_shapes(input_dims: dict[str, list], bounds: dict[str, tuple[int, int, int]]):
    """(min, opt, max) shapes of each input with a symbolic dimension; bounds: symbol -> (min, opt, max)."""
    shapes = {}
    for name, dims in input_dims.items():
        if all(isinstance(d, int) for d in dims):
            continue
        unknown = [d for d in dims if not isinstance(d, int) and d not in bounds]
        if unknown:
            raise SpeccompileError(f"input {name!r}: no TensorRT profile bounds for dimension {unknown[0]!r}")
        shapes[name] = tuple(tuple(d if isinstance(d, int) else bounds[d][k] for d in dims) for k in range(3))
    return shapes


def build_engine(toolchain: Toolchain, onnx_path: str, engine_path: str, input_dims: dict[str, list],
                 bounds: dict[str, tuple[int, int, int]]) -> dict:
    """Parse `onnx_path` (a prepare_graph output; its external weights beside it), build an fp32 engine with one
    optimization profile from `bounds`, write it to `engine_path`. Returns {"profile": input -> [min, opt, max]}."""
    trt = toolchain.trt
    logger = trt.Logger(trt.Logger.WARNING)
    load_plugin(trt, toolchain.plugin_library)
    builder = trt.Builder(logger)
    network = builder.create_network(0)  # TensorRT 10 networks are always explicit-batch
    parser = trt.OnnxParser(network, logger)
    if not parser.parse_from_file(onnx_path):
        errors = "; ".join(str(parser.get_error(i)) for i in range(parser.num_errors))
        raise SpeccompileError(f"TensorRT's ONNX parser rejected {os.path.basename(onnx_path)}: {errors}")
    config = builder.create_builder_config()
    # fp32 without TF32 matmuls: the engine's logits then agree with the CPU graph's to fp32 rounding, so greedy
    # decoding picks the same tokens on both
    if hasattr(trt.BuilderFlag, "TF32"):  # gone from TensorRT versions that no longer use it by default
        config.clear_flag(trt.BuilderFlag.TF32)
    shapes = profile_shapes(input_dims, bounds)
    if shapes:
        profile = builder.create_optimization_profile()
        for name, (lo, opt, hi) in shapes.items():
            profile.set_shape(name, lo, opt, hi)
        config.add_optimization_profile(profile)
    plan = builder.build_serialized_network(network, config)
    if plan is None:
        raise SpeccompileError(f"TensorRT could not build an engine from {os.path.basename(onnx_path)} "
                               "(its log above says why)")
    with open(engine_path, "wb") as f:
        f.write(plan)
    return {"profile": {name: [list(s) for s in shape] for name, shape in shapes.items()}}


def write_engines(toolchain: Toolchain, bundle_dir: str, graphs: dict, weight_refs: dict, models: dict,
                  verify_tokens: int, progress=print) -> dict:
    """Into `bundle_dir` (the build's temporary directory): each model's TensorRT graph and engine, and the plugin
    library. graphs: model -> (plugin-lowered GraphBuilder, weight files); records models[name]["tensorrt"] and
    returns the manifest's top-level "tensorrt" entry."""
    import onnx

    lib_rel = os.path.join("tensorrt", os.path.basename(toolchain.plugin_library))
    os.makedirs(os.path.join(bundle_dir, "tensorrt"), exist_ok=True)
    shutil.copy2(toolchain.plugin_library, os.path.join(bundle_dir, lib_rel))
    # One profile serves every step: prefill chunks up to MAX_STEP_TOKENS, tuned for the verify block's size.
    opt = max(1, min(verify_tokens, MAX_STEP_TOKENS))
    # N: the sequences of one pass that takes several (Medusa's rows), at most build --max-batch's largest
    bounds = {"S": (1, opt, MAX_STEP_TOKENS), "R": (1, opt, MAX_STEP_TOKENS), "N": (1, 1, 64)}
    version = str(toolchain.trt.__version__)
    for name, (g, wfiles) in graphs.items():
        model = prepare_graph(g.to_model({n: r for f in wfiles for n, r in weight_refs[f].items()}))
        onnx_rel, engine_rel = f"{name}.trt.onnx", f"{name}.engine"
        onnx.save_model(model, os.path.join(bundle_dir, onnx_rel))
        check_graph(os.path.join(bundle_dir, onnx_rel))
        dims = {i.name: [d.dim_param if d.dim_param else d.dim_value for d in i.type.tensor_type.shape.dim]
                for i in model.graph.input}
        progress(f"      {engine_rel}: TensorRT {version} on {toolchain.gpu}")
        # the plugin reads attention_bias rows LMAX wide: TensorRT engines take the static full-width bias
        lmax = models[name].get("kv_cache", {}).get("max_seq_len", 1)
        info = build_engine(toolchain, os.path.join(bundle_dir, onnx_rel), os.path.join(bundle_dir, engine_rel), dims,
                            dict(bounds, T=(lmax, lmax, lmax)))
        models[name]["tensorrt"] = {"graph": onnx_rel, "engine": engine_rel, "precision": "fp32", **info}
    return {"version": version, "device": toolchain.gpu, "plugin_library": lib_rel,
            "plugin": f"{tree_attention.DOMAIN}::{tree_attention.OP_TYPE} (TensorRT plugin TreeAttention, version 1)"}
