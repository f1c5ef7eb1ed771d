"""Lightning tasks (translation, listops, lm) and the efficient-attn-train app."""
