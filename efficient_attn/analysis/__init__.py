"""Analysis: approximation error of kernelized attention against exact softmax."""

# query rows KL(P ‖ P̂) is measured on (analysis.approx); defined here so approx_report's --help needs no torch
KL_ROWS = 256
