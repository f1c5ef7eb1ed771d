"""Analysis: approximation error of kernelized attention against exact softmax (``approx``), and an attention's own
rows against softmax's (``rows``)."""

# query rows KL(P ‖ P̂) is measured on (analysis.approx); defined here, without torch, for the approx command's --help
KL_ROWS = 256
