"""Using a trained checkpoint on its own: loading it, scoring a split, translating, generating."""
