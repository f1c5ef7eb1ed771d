"""Numerical kernels shared by the attention variants: chunked causal linear attention
(``causal_linear``), fused FAVOR+ (``favor_fused``), random features (``features``), precision and
normalisation helpers (``numerics``) and exact second derivatives (``differentiable``)."""
