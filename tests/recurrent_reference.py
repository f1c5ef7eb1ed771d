"""Float64 references for the token-gated recurrent attentions, written out plainly from the papers' formulas.

One (batch, head) and one token at a time: the gates from the token (here the documented standalone input,
the keys with heads merged), then the state update. A padded position is skipped (the state is left as it
was), an independent route to what the library does (gate 1, β = 0, zero key and value).
"""

import torch
import torch.nn.functional as F


def tokens(k, mask):
    """x (B, L, H·D): the keys with heads merged, padded rows zero."""
    x = k.transpose(1, 2).flatten(2)
    return x if mask is None else x.masked_fill(mask[:, :, None], 0.0)


def mamba2_decay(attn, x):
    """a_t = exp(−exp(A_log) · softplus(x u + dt_bias)) per head: (B, H, L, 1)."""
    dt = F.softplus(x @ attn.dt_proj.T + attn.dt_bias)  # (B, L, H)
    return torch.exp(-attn.a_log.exp() * dt).transpose(1, 2)[..., None]


def gates_gla(attn, x):
    """α = σ(x W₁ᵀ W₂ᵀ + b)^{1/τ}, per channel: (B, H, L, D)."""
    b, length, _ = x.shape
    alpha = torch.sigmoid(x @ attn.gate_down.T @ attn.gate_up.T + attn.gate_bias) ** (1.0 / attn.gate_temperature)
    return alpha.view(b, length, attn.num_heads, attn.head_dim).transpose(1, 2), None


def gates_mamba2(attn, x):
    return mamba2_decay(attn, x), None


def gates_deltanet(attn, x):
    return None, torch.sigmoid(x @ attn.beta_proj.T).transpose(1, 2)  # β (B, H, L)


def gates_gated_deltanet(attn, x):
    return mamba2_decay(attn, x), torch.sigmoid(x @ attn.beta_proj.T).transpose(1, 2)


GATES = {"gla": gates_gla, "mamba2": gates_mamba2, "deltanet": gates_deltanet,
         "gated_deltanet": gates_gated_deltanet}
DELTA_RULE = {"deltanet", "gated_deltanet"}


def recurrent_reference(name, attn, q, k, v, mask=None):
    """out (B, H, L, Dv) of S_t = a_t S_{t−1} + k_tᵀ v_t (gated), or S_t = a_t (I − β k kᵀ) S_{t−1} + β k vᵀ (delta)."""
    a, beta = GATES[name](attn, tokens(k, mask))
    if name in DELTA_RULE:
        q, k = F.normalize(q, dim=-1), F.normalize(k, dim=-1)
    B, H, L, D = q.shape
    out = torch.zeros(B, H, L, v.shape[-1], dtype=torch.float64)
    for b in range(B):
        for h in range(H):
            s = torch.zeros(D, v.shape[-1], dtype=torch.float64)
            for t in range(L):
                if mask is None or not mask[b, t]:
                    kt, vt = k[b, h, t][:, None], v[b, h, t][None, :]  # (D, 1), (1, Dv)
                    decay = 1.0 if a is None else a[b, h, t][:, None]  # (D|1, 1)
                    if name in DELTA_RULE:
                        s = decay * (torch.eye(D, dtype=torch.float64) - beta[b, h, t] * kt @ kt.T) @ s
                        s = s + beta[b, h, t] * kt @ vt
                    else:
                        s = decay * s + kt @ vt
                out[b, h, t] = attn.scale * q[b, h, t] @ s
    return out
