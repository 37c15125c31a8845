"""Fused ops of speccompile (installed as `speccompile.plugins`): definitions, lowerings and kernels."""
