"""Mutants of the core that cannot change behaviour, each with the reason, read from a survivor.

Owns ``EQUIVALENT``: (file, original source line, mutation) -> why the mutant cannot change behaviour. Keyed by
text, not line number, so entries survive edits elsewhere in a file; ``tools/mutation.py`` prints the reason
beside each such survivor. Add one after reading a survivor.
"""

EQUIVALENT: dict[tuple[str, str, str], str] = {
    ('efficient_attn/ops/gated.py',
     'size = 1 << (c - 1).bit_length()  # the power of two ≥ C',
     'constant 1 -> 0 in `1`'):
        '(the `c - 1` one; `0 << …` gives size 0 and is killed) size becomes the power of two above C, twice C '
        'when C is one: more padded rows, which change nothing, and the same scores, only slower',
    ('efficient_attn/attention/base.py',
     's = key_padding_mask.shape[-1]',
     'drop unary operator in `-1`'):
        'the mask is validated to be 2-D (B, S), so shape[1] is shape[-1]',
    ('efficient_attn/attention/additive.py',
     '_CHUNK_ELEMENTS = 1 << 21  # tanh elements alive at once when chunk_size is automatic (8 MiB fp32)',
     'constant 1 -> 0 in `1`'):
        'automatic chunk rows become max(1, 0) = 1: one query row per chunk, the same scores, only slower',
    ('efficient_attn/attention/additive.py',
     'buf = qp.new_empty(b, h, min(rows, length), kp.shape[2], n)  # (B, H, rows, S, n)',
     'call -> its first argument in `min(rows, length)`'):
        "the backward's reusable buffer gets `rows` rows instead of min(rows, L): only a larger allocation; every "
        'chunk writes into a view of its own size',
    ('efficient_attn/attention/additive.py',
     'out = buf[:, :, : qp.shape[2]]',
     'constant 2 -> 3 in `2`'):
        'the out= view then spans the whole buffer; torch resizes an out= tensor to the broadcast shape (B, H, c, S, '
        'n), so the same values are written and returned',
    ('efficient_attn/attention/base.py',
     'k, v = k.masked_fill(pad, 0.0), v.masked_fill(pad, 0.0)  # padding (even inf/NaN) cannot leak',
     'constant 0.0 -> 1.0 in `0.0`'):
        'any finite fill works: every variant masks padded keys itself (softmax mask, zero value-and-normalizer '
        'rows); the fill only removes inf/NaN, which 1.0 does too (tests put NaN/inf there)',
    ('efficient_attn/attention/base.py',
     'devices.add(default.index if default.index is not None else torch.cuda.current_device())',
     'drop statement in `devices.add(default.index if default.index is not None else torch.c...`'):
        'CUDA-only branch (default device is a GPU); no GPU on this machine',
    ('efficient_attn/attention/base.py',
     'devices.add(default.index if default.index is not None else torch.cuda.current_device())',
     'comparison -> Is in `default.index is not None`'):
        'CUDA-only branch (default device is a GPU); no GPU on this machine',
    ('efficient_attn/attention/base.py',
     'empty = (~visible.any(-1, keepdim=True)).expand(-1, length)  # (B, L)',
     'drop unary operator in `-1`'):
        'the mask is validated to be 2-D (B, S): dim 1 is dim -1',
    ('efficient_attn/attention/base.py',
     'length, s = scores.shape[-2:]',
     'drop unary operator in `-2`'):
        'scores are 4-D (B, H, L, S): shape[2:] is shape[-2:]',
    ('efficient_attn/ops/causal_linear.py',
     'out = _CausalLinear.apply(*flat, g, max(1, min(chunk_size, length)))  # (B·H, L, E)',
     'call -> its first argument in `min(chunk_size, length)`'):
        'a chunk longer than L is clipped to L by `chunk_spans` anyway (the first slice ends at L)',
    ('efficient_attn/ops/causal_linear.py',
     'run_max = None if g is None else g.cummax(-1).values  # (BH, L): G_i',
     'drop unary operator in `-1`'):
        'g is 2-D (BH, L): cummax over dim 1 is over dim -1',
    ('efficient_attn/attention/favor.py',
     'base = seed if seed is not None else int(torch.randint(2**31 - 1, ()))  # one draw from the global RNG',
     'operator -> Add in `2**31 - 1`'):
        'only the range of the one draw_seed taken from the global RNG moves by 2; any seed in it is as good',
    ('efficient_attn/attention/favor.py',
     'generator = torch.Generator().manual_seed(int(self.draw_seed) * 1_000_003 + int(self.num_draws))',
     'operator -> Sub in `int(self.draw_seed) * 1_000_003 + int(self.num_draws)`'):
        'another injective map from (draw_seed, draw count) to a generator seed: draws stay distinct and '
        'reproducible',
    ('efficient_attn/ops/features.py',
     'q = q * torch.sign(torch.diagonal(r))  # sign fix: makes q Haar-distributed',
     'operator -> Div in `q * torch.sign(torch.diagonal(r))`'):
        "the signs are ±1 (QR's R has a non-zero diagonal almost surely): dividing by ±1 is multiplying by it",
    ('efficient_attn/ops/features.py',
     'if is_query:',
     'delete return branch in `if is_query: return feats, None`'):
        'queries then carry h(q) = exp(‖q‖²/2) as a log-scale the attention ignores and a gradient factor e^{s − '
        's.detach()} of value 1: h(q) is one factor per output row and cancels in its ratio, so outputs and '
        'gradients are unchanged',
    ('efficient_attn/ops/numerics.py',
     "PADDED_LOG_SCALE = -1e30  # below any real key's log-scale; finite, so differences stay defined",
     'constant 1e+30 -> 2e+30 in `1e30`'):
        "any log-scale far below every real key's works (e^{−1e30 − G} and e^{−2e30 − G} are both 0)",
    ('efficient_attn/attention/kernel.py',
     'phi_q, _ = self.feature_map(q, is_query=True, fresh_grad=True)  # (B, H, L, M)',
     'constant True -> False in `True`'):
        "fresh_grad only lets the features' backward reuse the incoming gradient buffer; False allocates a new one "
        '(memory, not values)',
    ('efficient_attn/attention/kernel.py',
     'phi_k, log_scale = self.feature_map(k, is_query=False, fresh_grad=True)  # (B, H, S, M)',
     'constant True -> False in `True`'):
        "fresh_grad only lets the features' backward reuse the incoming gradient buffer; False allocates a new one "
        '(memory, not values)',
    ('efficient_attn/attention/kernel.py',
     'out1 = self.feature_map(q, is_query=True)[0] @ kv  # (B, H, 1, Dv+1)',
     'constant True -> False in `True`'):
        'decoding runs without gradients, and key- and query-style features have the same values (only their '
        'log-scale, discarded here, and their backward differ)',
    ('efficient_attn/attention/kernel.py',
     'with torch.autocast(k.device.type, enabled=False):',
     'constant False -> True in `False`'):
        'the check passes k as both queries and keys, so L == S and causal=True adds no condition',
    ('efficient_attn/generate.py',
     'tokens = logp.argmax(-1).masked_fill(done, pad)  # (B,)',
     'drop unary operator in `-1`'):
        'logits are 2-D (B, V): argmax over dim 1 is over dim -1',
    ('efficient_attn/attention/favor.py',
     'self.num_draws.zero_()',
     'drop statement in `self.num_draws.zero_()`'):
        'the new stream then starts at draw index n instead of 0: still a deterministic function of (seed, module '
        'name), distinct per module and the same on every process',
    ('efficient_attn/attention/kernel.py',
     'out1 = self.feature_map(q.to(kv.dtype), is_query=True)[0] @ kv  # (B, H, L, Dv+1)',
     'constant True -> False in `True`'):
        'key-style positive features of a query have the same values; their backward adds −x·Σᵢ φᵢ∂L/∂φᵢ, which is 0 '
        'for a query: its output is homogeneous of degree 0 in φ(q) (numerator and normalizer both linear), so the '
        "gradient is unchanged (tested against the forward's)",
    # cosFormer, Hedgehog, retention, sliding window (results/mutation_variants.md)
    ('efficient_attn/attention/cosformer.py',
     'check_inputs(q, k, v, None, True, self.num_heads, self.head_dim)',
     'constant True -> False in `True`'):
        "decode_step's q and k are one position each, so the causal check (L == S) holds either way",
    ('efficient_attn/attention/cosformer.py',
     'phi_k, _ = self.feature_map(k, is_query=False, start=t)  # (B, H, 1, 2D)',
     'constant False -> True in `False`'):
        "cosFormer's feature map is the same for queries and keys (ReLU features times cos/sin of the position); "
        'is_query is unused',
    ('efficient_attn/attention/hedgehog.py',
     "phi_q, _ = self.feature_map(q, is_query=True)  # (B, H, L, 2d')",
     'constant True -> False in `True`'):
        'Hedgehog applies one learned map to queries and keys; is_query is unused',
    ('efficient_attn/attention/hedgehog.py',
     "phi_k, _ = self.feature_map(k, is_query=False)  # (B, H, S, 2d')",
     'constant False -> True in `False`'):
        'Hedgehog applies one learned map to queries and keys; is_query is unused',
    ('efficient_attn/attention/hedgehog.py',
     'cross_entropy = -(teacher * log_student).sum(-1)  # (B, H, L); 0 on empty rows',
     'drop unary operator in `-1`'):
        'the per-row sums are only ever summed again (cross_entropy.sum()), so reducing dim 1 first gives the same '
        'total',
    ('efficient_attn/attention/retention.py',
     'c = max(1, min(chunk_size, length))',
     'call -> its first argument in `max(1, min(chunk_size, length))`'):
        'chunk size 1: the chunked form is exact for any chunk size (tested at several), only slower',
    ('efficient_attn/attention/retention.py',
     'c = max(1, min(chunk_size, length))',
     'constant 1 -> 0 in `1`'):
        'min(chunk_size, L) is already ≥ 1 for L ≥ 1 (chunk_size is validated ≥ 1); the max only guards L = 0',
    ('efficient_attn/attention/retention.py',
     'if n > 1:',
     'constant 1 -> 0 in `1`'):
        'with one chunk the inter-chunk term runs on the zero initial state and adds exactly 0',
    ('efficient_attn/attention/sliding_window.py',
     'check_inputs(q, k, v, None, True, self.num_heads, self.head_dim)',
     'constant True -> False in `True`'):
        "decode_step's q and k are one position each, so the causal check (L == S) holds either way",
    ('efficient_attn/attention/sliding_window.py',
     'w = min(window, length)',
     'call -> its first argument in `min(window, length)`'):
        'a block longer than the sequence is padded and its extra keys masked: the same output, more work',
    ('efficient_attn/attention/favor.py',
     'check_inputs(q, k, v, None, True, self.num_heads, self.head_dim)',
     'constant True -> False in `True`'):
        "decode_step's q and k are one position each, so the causal check (L == S) holds either way",
    ('efficient_attn/attention/favor.py',
     'if run_max.device.type != "cpu" or bool((g > run_max).any()):',
     'comparison -> Eq in `run_max.device.type != "cpu"`'):
        'on CPU the step then rescales every time: a maximum that did not grow gives the factor e^0 = 1 '
        'exactly, so the same state; the GPU branch cannot run here',
    ('efficient_attn/attention/kernel.py',
     'if run_max.device.type != "cpu" or not torch.equal(run_max, before):',
     'comparison -> Eq in `run_max.device.type != "cpu"`'):
        'on CPU the step then rescales every time: a maximum that did not grow gives the factor e^0 = 1 '
        'exactly, so the same state; the GPU branch cannot run here',
    ('efficient_attn/attention/favor.py',
     'if cached is not None and cached[0] is w and cached[1] == (w._version, w.data_ptr(), dtype, self.kernel):',
     'delete return branch in `if cached is not None and cached[0] is w and cached[1] == (w._versi...`'):
        'without the cache the step projection is made again from the same buffer at every step: the same '
        'values, slower',
    ('efficient_attn/attention/kernel.py',
     'grad_v = grad_v.masked_fill(pad[:, None, :, None], 0.0)',
     'call -> its receiver in `grad_v.masked_fill(pad[:, None, :, None], 0.0)`'):
        'Attention.forward zeroes padded keys and values (masked_fill) before attend, so autograd zeroes the '
        "padded rows' value gradient again; the line only guards a direct call of attend",
    ('efficient_attn/attention/taylor.py',
     'grad_v = grad_v.masked_fill(pad[:, None, :, None], 0.0)',
     'constant 0.0 -> 1.0 in `0.0`'):
        'Attention.forward zeroes padded keys and values (masked_fill) before attend, so autograd zeroes the '
        "padded rows' value gradient again; the line only guards a direct call of attend",
    ('efficient_attn/attention/kernel.py',
     'run_max = None if g is None else g.cummax(-1).values  # (BH, L)',
     'drop unary operator in `-1`'):
        'g is 2-D (BH, L): cummax(1) is cummax(-1)',
    ('efficient_attn/attention/sliding_window.py',
     'if recompute_active(self.recompute) and (q.requires_grad or k.requires_grad or v.requires_grad):',
     'boolean -> And in `q.requires_grad or k.requires_grad or v.requires_grad`'):
        'recompute then only when q, k and v all need gradients (as in every model); otherwise the plain '
        'path, whose output and gradients are bit-identical (tested): memory only, in a case no model makes',
    ('efficient_attn/attention/sliding_window.py',
     'c = min(w, BLOCK)  # queries per block',
     'call -> its first argument in `min(w, BLOCK)`'):
        'blocks of w queries instead of min(w, BLOCK): other blocks over the same bands, the same values; '
        'speed and memory only',
    ('efficient_attn/attention/sliding_window.py',
     'scores = torch.baddbmm(zero, qb, kb, beta=0.0, alpha=scale).view(b, h, n, c, span)  # (B, H, N, c, span)',
     'constant 0.0 -> 1.0 in `0.0`'):
        'beta = 1 adds the zero tensor `zero`: the same scores',
    ('efficient_attn/ops/favor_fused.py',
     'if _pairwise_is_cheaper(length, s_len, w.shape[0], v.shape[-1] + 1) and max(length, s_len) <= rows:',
     'operator -> Sub in `v.shape[-1] + 1`'):
        'the cost model then counts E − 2 value columns: only which of the two product orders runs changes, '
        'and both give the same estimator (tested equal in both orders)',
    ('efficient_attn/ops/favor_fused.py',
     'if _pairwise_is_cheaper(length, s_len, w.shape[0], v.shape[-1] + 1) and max(length, s_len) <= rows:',
     'call -> its first argument in `max(length, s_len)`'):
        "the pairwise order's size bound then checks L only: only which of the two product orders runs "
        'changes, and both give the same estimator (tested equal in both orders)',
    ('efficient_attn/ops/favor_fused.py',
     'return v1 if pad is None else v1.masked_fill(pad[..., None], 0.0)',
     'call -> its receiver in `v1.masked_fill(pad[..., None], 0.0)`'):
        "padded keys' log-scales are PADDED_LOG_SCALE, so their weight e^{g − G} is 0 wherever a real key is "
        'visible (and v is zero there, from Attention.forward): a row that sees only padding gets 0 / den = 0'
        ' either way',
}
