"""Graph signatures shared by the exporter and the runtime (installed as `speccompile.graphs`).

The decoder graph is the one contract every model in a bundle follows (target, draft model, early-exit draft),
so the runtime drives any of them with the same code:

inputs
  input_ids        int64   [1, S]             tokens of this step (prefill chunk, one decode token, or tree nodes)
  position_ids     int64   [1, S]             rotary position of each token (tree nodes: committed length + depth)
  seqlens_k        int32   [1]                committed length + S - 1 (the fused kernel's convention)
  attention_bias   float32 [1, 1, S, T]       0 where a token may attend a cache slot, -inf elsewhere; T >= committed
                                              length + S, at most LMAX (the kernel works over T slots; the
                                              runtime rounds committed + S up to a multiple of 64)
  logits_index     int64   [R]                rows of the step whose logits are wanted (last row, or all nodes)
  past_key.{i}     float32 [1, Hkv, LMAX, D]  static KV cache; bound to the same buffer as present_key.{i} (the
                                              model entry's kv_cache dtype: float16 in `--dtype float16` builds,
                                              and under float32 graphs with `--kv-dtype float16`, whose attention is
                                              speccompile.kernels::TreeAttentionF16)
  past_value.{i}   float32 [1, Hkv, LMAX, D]
  hidden_in        float32 [1, S, H]          (MTP and EAGLE draft heads only) the feature before each token: the
                                              target's hidden state, or the head's own for a drafted token
                                              (EAGLE-3's target features pass its fc graph first, eagle3_fc.onnx:
                                              aux_hidden_states [S, 3H_target] -> hidden [S, H])
outputs
  logits           float32 [R, V]
  next_token       int64   [R]                argmax of logits, computed in the graph (greedy needs no logits copy)
  hidden_states    float32 [S, H]             the residual stream before the final norm (what draft heads read)
  aux_hidden_states float32 [S, A*H]          (targets of EAGLE heads only) the features the heads read, side by
                                              side in the order of the model entry's `aux_hidden_layers`: a layer
                                              id i is the residual stream entering layer i (i = num_layers: after
                                              the last layer, before the final norm; vLLM's
                                              eagle_aux_hidden_state_layer_ids), "norm" the final norm's output
  present_key.{i}, present_value.{i}          the caches, written in place at slots [seqlens_k+1-S, seqlens_k]

verify extension (the target's graph, built with verify=True; speccompile/compile/graph/verify.py): acceptance
computed in the graph, so a verify pass copies a few numbers to the host instead of the [R, V] logits, which it need
not bind.
The R rows are the nodes of a verify block: row 0 the pending token (the root), then the draft nodes in
topological order.
inputs (optional: an omitted one takes its VERIFY_DEFAULTS value, broadcast over the rows: every row its own root,
greedy; so a caller of the plain contract above feeds none of them)
  node_parents     int64   [R]                each row's parent row, -1 for the root (a chain: r - 1)
  temperature      float32 [1]                0: greedy acceptance; > 0: sampled (SpecInfer recursive rejection)
  top_k            int64   [1]                0 = off (top-p is not in the graph: the runtime keeps it on the host)
  uniforms         float64 [R, 2]             host draws in [0, 1), so a seed reproduces a run: [r, 0] tests node r,
                                              [r, 1] draws the token after the path if it ends at r
  full_logits      bool    [1]                (graphs with the exact greedy head, speccompile/compile/graph/head_screen.py) true:
                                              logits are float32 products; false, with temperature 0: logits are
                                              an int8 screen's estimates and next_token is still the exact argmax
                                              of the float32 logits (the head reads a quarter of the bytes)
  sample_noise     float32 [R, V]             (graphs with the exact greedy head) added to each row's float32 logits
                                              before next_token's argmax (the screen's rescoring included), [1, 1]
                                              zeros by default: temperature times standard Gumbel draws make that
                                              argmax an exact draw from softmax(logits / temperature) at a greedy
                                              pass's price (the Gumbel-max trick, runtime/noise.py); fed with
                                              temperature 0, the greedy acceptance then accepts exactly the drafts
                                              the target draws
  noise_top_k      int64   [R] or [1]         (graphs with the exact greedy head, version 7; batched 3) 0 = off;
                                              k > 0: with sample_noise, a row's argmax is taken among its k largest
                                              float32 logits only (ties at the k-th kept, as the host's top-k keeps
                                              them): an exact draw from the top-k distribution at a greedy pass's
                                              price
outputs
  node_prob        float64 [R]                p_parent(r)(token of r) after temperature and top-k (greedy: 0; root: 0)
  accept_node      int64   [1]                end of the accepted path (0: no draft node accepted)
  accept_len       int64   [1]                its depth = the number of draft tokens accepted
  accept_token     int64   [1]                the target's token after the path: greedy the end's argmax; sampled a
                                              draw from p_end without the end's children's tokens (renormalised)
The rule: a node is kept if it is the first of its parent's children (in row order) to pass its test: greedy, its
token is the parent's argmax (next_token); sampled, uniforms[r, 0] * (1 - the mass of its earlier siblings'
tokens) < node_prob[r], failing outright on a token an earlier sibling had. The accepted path is the root's chain
of kept nodes; commit its tokens, then accept_token. Greedy, that is runtime/acceptance.py's `accept_greedy`;
sampled, with deterministic candidates (q one-hot) it is its `accept_sampled`, so the committed tokens are
distributed exactly as the target's, after temperature and top-k.

weight formats: the contract above holds whatever form the weights take; the manifest's `quantization` records
each target matrix's (WEIGHT_FORMATS). A packed matrix is a com.microsoft MatMulNBits product (CPU), its weights
key.nbits4 | key.nbits8 (codes), key.nbits_scales, optional key.nbits_zeros and key.nbits_offsets (a GGUF block's
minimum: the per-32-block sums of x times them, added), run at the manifest's accuracy_level; or, a 4-bit matrix
with a float16 scale and minimum per block of 32, a KERNEL_DOMAIN MatMulQ4 product (speccompile's own CPU kernels:
speccompile.plugins.q4_matmul), its weights key.q4blocks (that op's layout; a layer's joined gate_up matrix runs
as a KERNEL_DOMAIN MatMulQ4SiLU, silu(x gate) * (x up) in one op); an int8 matrix (the head screen, a draft head's) a
KERNEL_DOMAIN MatMulQ8 product, its codes' key holding that op's layout [N/16, K/32, 576], the screen's candidates
then picked by a KERNEL_DOMAIN TopK (ONNX TopK's outputs); the manifest's quantization.kernel_matrices naming them.
A graph that runs those kernels (or the kernel attention below) also takes its RMSNorms as KERNEL_DOMAIN RMSNorm and
SkipRMSNorm (outputs the norm and the residual sum) and its greedy acceptance as one KERNEL_DOMAIN GreedyAccept
(the rule above; sampled acceptance stays in standard ops).
The attention inside is the model entry's `attention` lowering (speccompile.plugins.tree_attention): "ort",
com.microsoft GroupQueryAttention with a pad row (kv_cache's scratch_slots 1), or "kernel", a KERNEL_DOMAIN
TreeAttention node (speccompile's CPU kernel, no scratch slot; the batched form passes it query_seqlens). Logits of a
quantized build are those of its quantized weights: speculation is lossless against the same bundle's plain
decoding, not against a float32 build.
batched form (the target's `target_batch` graph, `build --max-batch B`; BATCH_GRAPH_VERSION): the same decoder over a
run of consecutive sequence slots of a static cache [B, Hkv, LMAX, D]. The batch dimension N is symbolic: a pass
binds the cache rows of the slots it runs (any consecutive run of them, one slot included). Every slot's attention
runs S rows (the longest slot's count; the rest padding that nothing reads); everything else runs over the real
rows only, packed (version 4), so one slot's draft rows do not make every other slot pay for S rows. Differences
from the contract above:
  input_ids, position_ids [N, S]; seqlens_k [N] per slot; query_seqlens int32 [N] each slot's real rows (its K/V
  are written at slots [seqlens_k+1-query_seqlens, seqlens_k]); attention_bias [N, 1, S, T] per slot;
  row_index [P] the real rows, in order, as positions in the flattened [N * S] layout (slot n's row s is
  n * S + s); layout_index [N * S] each layout position's real row (any real row for a padding position; a graph
  on speccompile's attention kernel reads none: the kernel takes and gives the packed rows itself);
  logits_index [R] into the real rows; hidden_states [P, H] (and aux_hidden_states [P, A * H]). No verify
  extension: the host accepts from next_token (greedy) or the logits (sampled). With the exact greedy head the
  inputs full_logits (false: estimated logits, exact next_token) and sample_noise stay. Before version 4 the
  whole layout ran: no row_index or layout_index, logits_index and the hidden states over all N * S rows.
  A drafter's batched form (a drafter entry's batch_model, `{model}_batch` beside its graph, over a cache of its
  own slots; version 5) lets the slots' drafters catch up with their sequences in one pass
  (runtime/shared_catch_up.py): a draft model's or early exit's is this form (kind decoder_batch), a draft head's
  (kind head_batch) takes hidden_in [1, P, H] too, one feature per real row in row_index's order, and has no
  screen inputs.
"""
from __future__ import annotations

# Limits of the contract: the runtime sizes its buffers by them and the compiler its profiles (TensorRT).
MAX_STEP_TOKENS = 128  # tokens one pass may run: a prefill chunk, or a verify block
MAX_VERIFY_TOKENS = 64  # rows one verify pass may check: the pending token + its drafts
MAX_TREE_NODES = MAX_VERIFY_TOKENS - 1  # draft nodes of one tree

DECODER_GRAPH_VERSION = 7  # 7: noise_top_k; 6: sample_noise; 5: scratch slots (below); 4: the exact greedy
#                            head (full_logits); 3: attention_bias as wide as the slots in use (2: always LMAX); all still run
# what `quantization.formats` may say of a matrix: float32, a GGUF block type kept as it is stored (joined types
# as "q4_k+q6_k as 8-bit blocks of 16"), or a block-wise quantization of float weights by `build --weights`
WEIGHT_FORMATS = ("float32", "q4_0", "q4_1", "q5_0", "q5_1", "q8_0", "q4_k", "q5_k", "q6_k", "int4", "int8")
BATCH_GRAPH_VERSION = 5  # the batched form (above); 2: sample_noise; 3: noise_top_k; 4: packed rows; 5: draft heads
KERNEL_DOMAIN = "speccompile.kernels"  # speccompile's own onnxruntime CPU kernels (plugins/q4_matmul)
DEFAULT_MAX_BATCH = 4  # sequence slots of the batched graph unless the build says otherwise
VERIFY_DEFAULTS = {"node_parents": [-1], "temperature": [0.0], "top_k": [0], "uniforms": [[0.0, 0.0]],
                   "full_logits": [True], "sample_noise": [[0.0]], "noise_top_k": [0]}


# the inputs of a graph with the exact greedy head (speccompile/compile/graph/head_screen.py)
SCREEN_INPUTS = [("full_logits", "bool", [1]), ("sample_noise", "float32", ["RN", "VN"]),
                 ("noise_top_k", "int64", ["RK"])]


def trees_exact(quantization: dict | None) -> bool:
    """Whether a verify pass over a tree gives each node the target's own plain-step result, from the manifest's
    `quantization` section. A node's attention skips its siblings' cache slots, and the fused kernel then sums in
    another order than the same token's plain step: a last-bit difference, which a target whose products round
    their input to int8 (MatMulNBits at accuracy level 4) can turn into another token. A chain's rows see
    contiguous slots and are exact whatever the weights: over such a target, speculation verifies one path a
    pass. (speccompile's own attention kernel sums a node's visible slots in column order, as a plain step does,
    so its trees would be exact too; verifying them measured no faster than one path: docs/results.md.)"""
    q = quantization or {}
    return not (q.get("accuracy_level") == 4 and any(f != "float32" for f in q.get("formats", {}).values()))


def cache_slots(kv_cache: dict) -> int:
    """LMAX, a graph's cache length, from its manifest entry's kv_cache: max_seq_len, the tokens a sequence may
    hold, plus scratch_slots, slots past them that the graph's attention may write during a step and nothing
    reads (the fused lowering's pad row: speccompile.plugins.tree_attention); bundles before graph version 5
    have none."""
    return kv_cache["max_seq_len"] + kv_cache.get("scratch_slots", 0)


def decoder_signature(num_layers: int, num_kv_heads: int, head_dim: int, max_seq_len: int, vocab_size: int,
                      hidden_size: int, mtp: bool = False, verify: bool = False, aux_width: int = 0,
                      screen: bool = False, batched: bool = False, scratch: int = 0):
    """(inputs, outputs): lists of (name, dtype, shape); symbolic dims are strings. An MTP draft head has the
    same signature plus the input `hidden_in` (the target's hidden state, one row per token); verify=True adds
    the verify extension; aux_width > 0 adds the output aux_hidden_states [S, aux_width]; screen (with verify)
    adds the input full_logits of the exact greedy head. batched: the batched form (no verify; with mtp, a draft
    head's: hidden_in one row per real row, packed).
    scratch: cache slots past max_seq_len the graph's attention may write (LMAX = max_seq_len + scratch)."""
    if batched:
        return _batched_signature(num_layers, num_kv_heads, head_dim, max_seq_len + scratch, vocab_size,
                                  hidden_size, aux_width, screen, mtp)
    cache = [1, num_kv_heads, max_seq_len + scratch, head_dim]
    inputs = [("hidden_in", "float32", [1, "S", hidden_size])] if mtp else []
    inputs += [
        ("input_ids", "int64", [1, "S"]),
        ("position_ids", "int64", [1, "S"]),
        ("seqlens_k", "int32", [1]),
        ("attention_bias", "float32", [1, 1, "S", "T"]),
        ("logits_index", "int64", ["R"]),
    ]
    outputs = [("logits", "float32", ["R", vocab_size]), ("next_token", "int64", ["R"]),
               ("hidden_states", "float32", ["S", hidden_size])]
    if aux_width:
        outputs.append(("aux_hidden_states", "float32", ["S", aux_width]))
    if verify:
        inputs += [("node_parents", "int64", ["R"]), ("temperature", "float32", [1]), ("top_k", "int64", [1]),
                   ("uniforms", "float64", ["R", 2])]
        if screen:
            inputs += SCREEN_INPUTS
        outputs += [("node_prob", "float64", ["R"]), ("accept_node", "int64", [1]), ("accept_len", "int64", [1]),
                    ("accept_token", "int64", [1])]
    for i in range(num_layers):
        inputs += [(f"past_key.{i}", "float32", cache), (f"past_value.{i}", "float32", cache)]
        outputs += [(f"present_key.{i}", "float32", cache), (f"present_value.{i}", "float32", cache)]
    return inputs, outputs


def _batched_signature(num_layers, num_kv_heads, head_dim, max_seq_len, vocab_size, hidden_size, aux_width, screen,
                       mtp):
    cache = ["N", num_kv_heads, max_seq_len, head_dim]
    inputs = [("hidden_in", "float32", [1, "P", hidden_size])] if mtp else []
    inputs += [("input_ids", "int64", ["N", "S"]), ("position_ids", "int64", ["N", "S"]),
              ("seqlens_k", "int32", ["N"]), ("query_seqlens", "int32", ["N"]),
              ("attention_bias", "float32", ["N", 1, "S", "T"]), ("row_index", "int64", ["P"]),
              ("layout_index", "int64", ["NS"]), ("logits_index", "int64", ["R"])]
    if screen:
        inputs += SCREEN_INPUTS
    outputs = [("logits", "float32", ["R", vocab_size]), ("next_token", "int64", ["R"]),
               ("hidden_states", "float32", ["P", hidden_size])]
    if aux_width:
        outputs.append(("aux_hidden_states", "float32", ["P", aux_width]))
    for i in range(num_layers):
        inputs += [(f"past_key.{i}", "float32", cache), (f"past_value.{i}", "float32", cache)]
        outputs += [(f"present_key.{i}", "float32", cache), (f"present_value.{i}", "float32", cache)]
    return inputs, outputs
