"""Analysis: approximation error of kernelized attention against exact softmax."""
