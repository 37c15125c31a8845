"""Mixture-of-experts blocks' weights (DeepSeek-V3 and Mixtral; the graph is graph/moe.py)."""
from __future__ import annotations

import numpy as np

from speccompile.compile.config import ModelConfig
from speccompile.compile.weights.tensors import TensorReader


def lower_moe_weights(cfg: ModelConfig, r: TensorReader, prefix: str) -> dict[str, np.ndarray]:
    """Router and expert tensors (names relative to the MoE block: DeepSeek "mlp.", Mixtral "block_sparse_moe.")
    -> graph weights. Experts come stacked (transformers' layout) or one module per expert (checkpoints' own)."""
    T = np.ascontiguousarray
    E, I, H = cfg.n_routed_experts, cfg.moe_intermediate_size, cfg.hidden_size
    w = {prefix + "router": T(r.get("gate.weight", (E, H)).T)}
    if cfg.router_scoring == "sigmoid":
        w[prefix + "router_bias"] = r.get("gate.e_score_correction_bias", (E,))
    gate, up, down = ("w1", "w3", "w2") if cfg.model_type == "mixtral" else ("gate_proj", "up_proj", "down_proj")
    if r.has("experts.gate_up_proj"):
        gate_up = r.get("experts.gate_up_proj", (E, 2 * I, H))
        downs = r.get("experts.down_proj", (E, H, I))
    else:
        gate_up = np.stack([np.concatenate([r.get(f"experts.{j}.{gate}.weight", (I, H)),
                                            r.get(f"experts.{j}.{up}.weight", (I, H))]) for j in range(E)])
        downs = np.stack([r.get(f"experts.{j}.{down}.weight", (H, I)) for j in range(E)])
    w[prefix + "experts.gate_up"] = T(gate_up.transpose(0, 2, 1))  # [E, H, 2I]
    w[prefix + "experts.down"] = T(downs.transpose(0, 2, 1))  # [E, I, H]
    Is = I * cfg.n_shared_experts
    if Is:
        w[prefix + "shared.gate_up"] = T(np.concatenate([r.get("shared_experts.gate_proj.weight", (Is, H)),
                                                         r.get("shared_experts.up_proj.weight", (Is, H))]).T)
        w[prefix + "shared.down"] = T(r.get("shared_experts.down_proj.weight", (H, Is)).T)
    return w
