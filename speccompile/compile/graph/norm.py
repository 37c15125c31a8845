"""RMSNorm, alone or fused with the residual add before it."""
from __future__ import annotations

import dataclasses

from speccompile.graphs import KERNEL_DOMAIN
from speccompile.graphs.builder import GraphBuilder


@dataclasses.dataclass
class RMSNorm:
    """fused: onnxruntime's fused kernels (SimplifiedLayerNormalization, SkipSimplifiedLayerNormalization); False
    keeps to standard ONNX ops (RMSNormalization), for other backends. kernel: speccompile's RMSNorm and
    SkipRMSNorm (plugins/q4_matmul/norm.c), in a graph that runs speccompile's kernels anyway: a pass's few rows
    inline, where onnxruntime's fused norm hands two rows or more to its threads."""
    g: GraphBuilder
    eps: float
    fused: bool = True
    kernel: bool = False

    def __call__(self, x: str, gamma: str) -> str:
        if self.kernel:
            return self.g.op("RMSNorm", [x, gamma], domain=KERNEL_DOMAIN, epsilon=self.eps)[0]
        if self.fused:
            return self.g.op("SimplifiedLayerNormalization", [x, gamma], axis=-1, epsilon=self.eps, stash_type=1)[0]
        return self.g.op("RMSNormalization", [x, gamma], axis=-1, epsilon=self.eps)[0]

    def add(self, x: str, residual: str, gamma: str) -> tuple[str, str]:
        """(norm(x + residual), x + residual)"""
        if self.kernel:
            out, total = self.g.op("SkipRMSNorm", [x, residual, gamma], n_out=2, domain=KERNEL_DOMAIN, epsilon=self.eps)
            return out, total
        if not self.fused:
            total = self.g.op("Add", [x, residual])[0]
            return self(total, gamma), total
        # outputs 1 and 2 (mean, inverse std) unnamed: fetched, they would cost a write per row
        out, total = self.g.fresh("norm"), self.g.fresh("residual")
        self.g.op("SkipSimplifiedLayerNormalization", [x, residual, gamma], outputs=[out, "", "", total],
                  domain="com.microsoft", epsilon=self.eps)
        return out, total
