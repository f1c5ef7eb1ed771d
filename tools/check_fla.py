"""Check the gated and delta-rule kernels against flash-linear-attention's plain-torch references.

flash-linear-attention (fla, github.com/fla-org/flash-linear-attention, MIT) ships a ``naive.py`` beside each
Triton kernel. This tool loads only those four files by path (``--fla-dir``: a checkout or an extracted tree; fla is
never installed or imported as a package), runs them on random float64 inputs and compares their outputs with
``efficient_attn.ops.gated`` and ``efficient_attn.ops.delta``. Exits 1 when an error exceeds ``--tol``.

Conventions of the fla references (read from the files) and how they are mapped:

- GLA ``naive_recurrent_gla(q, k, v, gk)``: (B, T, H, D), gk (B, T, H, D) log gates, scale fixed to D**-0.5 inside;
  h = h * exp(gk_t) + k_tᵀ v_t, o_t = (scale q_t) h. Ours gets ``q * D**-0.5``.
- simple GLA ``naive_recurrent_simple_gla`` / ``naive_chunk_simple_gla`` / ``naive_parallel_simple_gla``: (B, T, H, D),
  g (B, T, H) log decay per head, ``scale`` argument (1 is passed). Ours gets ``g[..., None]``.
- DeltaNet ``delta_rule_recurrence`` / ``delta_rule_chunkwise`` / ``delta_rule_parallel``: (B, H, T, D), beta
  (B, H, T), scale fixed to D**-0.5 inside; v'_t = beta_t (v_t - k_t S), S += k_tᵀ v'_t, which is
  S_t = (I - beta_t k_tᵀ k_t) S_{t-1} + beta_t k_tᵀ v_t. Ours gets ``q * D**-0.5``. The chunked and parallel forms need
  T a multiple of their block: their inputs are zero-padded at the end (k = v = beta = 0, causal, so earlier outputs
  cannot change) and the output cut back to T.
- Gated DeltaNet ``naive_recurrent_gated_delta_rule(q, k, v, beta, g)`` / ``naive_chunk_gated_delta_rule(q, k, v, g,
  beta)`` (note the swapped argument order): (B, T, H, D), g and beta (B, T, H), ``scale`` argument (1 is passed);
  h = exp(g_t) h first, then the delta step on the decayed state, i.e. S_t = (I - beta_t k_tᵀ k_t) exp(g_t) S_{t-1} +
  beta_t k_tᵀ v_t, the same as exp(g_t) (I - beta_t k_tᵀ k_t) S_{t-1} + ... since exp(g_t) is a scalar.

The references cast to float32 (``.float()``, ``torch.float32``, ``dtype=torch.float``); the loader rewrites those
casts to float64 in the source text before executing it (counted in the report) so that a 1e-10 tolerance is
meaningful. Nothing else in the fla code is changed.

A float64 per-token loop of the formulas, written here (``_loop_gated``, ``_loop_delta``), is compared too: it checks
the layout and scale mapping on its own, so a mismatch points at either side.

Usage: ``python tools/check_fla.py --fla-dir /tmp/fla --fla-commit <sha>``
"""

from __future__ import annotations

import argparse
import importlib.util
import re
import shlex
import subprocess
import sys
from pathlib import Path
from types import ModuleType

import torch
import torch.nn.functional as F

FILES = {
    'gla': 'fla/ops/gla/naive.py',
    'simple_gla': 'fla/ops/simple_gla/naive.py',
    'delta_rule': 'fla/ops/delta_rule/naive.py',
    'gated_delta_rule': 'fla/ops/gated_delta_rule/naive.py',
}
_FP32 = re.compile(r'\.float\(\)|torch\.float32\b|torch\.float\b')
_FP32_TO = {'.float()': '.double()', 'torch.float32': 'torch.float64', 'torch.float': 'torch.float64'}


def load_naive(fla_dir: Path, rel: str, promote: bool = True) -> tuple[ModuleType, int]:
    """Execute one fla ``naive.py`` as a standalone module, its float32 casts rewritten to float64 if ``promote``.

    Returns the module and the number of casts rewritten.
    """
    path = fla_dir / rel
    src, n = path.read_text(), 0
    if promote:
        src, n = _FP32.subn(lambda m: _FP32_TO[m.group(0)], src)
    name = 'fla_naive_' + rel.split('/')[-2]
    spec = importlib.util.spec_from_loader(name, loader=None, origin=str(path))
    mod = importlib.util.module_from_spec(spec)
    mod.__file__ = str(path)
    exec(compile(src, str(path), 'exec'), mod.__dict__)  # noqa: S102 - a reference file named by the caller
    return mod, n


# ---- self-check loops: the formulas of the contract, (B, H, L, D) layout, no scale --------------------------------

def _loop_gated(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, log_gate: torch.Tensor) -> torch.Tensor:
    """S_t = diag(exp(g_t)) S_{t-1} + k_tᵀ v_t, o_t = q_t S_t; log_gate (B, H, L, D) or (B, H, L, 1)."""
    b, h, n, d = q.shape
    s = q.new_zeros(b, h, d, v.shape[-1])  # (B, H, D, E)
    out = []
    for t in range(n):
        s = log_gate[:, :, t, :, None].exp() * s + k[:, :, t, :, None] * v[:, :, t, None, :]
        out.append(torch.einsum('bhd,bhde->bhe', q[:, :, t], s))
    return torch.stack(out, 2)  # (B, H, L, E)


def _loop_delta(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, beta: torch.Tensor,
                log_gate: torch.Tensor | None = None) -> torch.Tensor:
    """S_t = exp(g_t) (I - beta_t k_tᵀ k_t) S_{t-1} + beta_t k_tᵀ v_t, o_t = q_t S_t."""
    b, h, n, d = q.shape
    s = q.new_zeros(b, h, d, v.shape[-1])  # (B, H, D, E)
    eye = torch.eye(d, dtype=q.dtype)
    out = []
    for t in range(n):
        kt, bt = k[:, :, t], beta[:, :, t, None, None]
        a = eye - bt * kt[..., :, None] * kt[..., None, :]  # (B, H, D, D)
        if log_gate is not None:
            a = log_gate[:, :, t, None, None].exp() * a
        s = a @ s + bt * kt[..., :, None] * v[:, :, t, None, :]
        out.append(torch.einsum('bhd,bhde->bhe', q[:, :, t], s))
    return torch.stack(out, 2)  # (B, H, L, E)


# ---- inputs ----------------------------------------------------------------------------------------------------

def draw(seed: int, b: int, h: int, n: int, d: int, e: int) -> dict[str, torch.Tensor]:
    """Random float64 inputs in our (B, H, L, .) layout."""
    gen = torch.Generator().manual_seed(seed)

    def randn(*shape: int) -> torch.Tensor:
        return torch.randn(*shape, generator=gen, dtype=torch.float64)

    q, k, v = randn(b, h, n, d), randn(b, h, n, d), randn(b, h, n, e)
    gk = F.logsigmoid(randn(b, h, n, d)) / 16  # GLA per-channel log gate
    a_log = torch.empty(h, dtype=torch.float64).uniform_(1.0, 16.0, generator=gen).log()  # Mamba-2 style A = exp(A_log)
    g = -a_log.exp()[:, None] * F.softplus(randn(b, h, n) - 3.0)  # scalar log decay per head and token, (B, H, L)
    beta = torch.sigmoid(randn(b, h, n))
    return {'q': q, 'k': k, 'v': v, 'gk': gk, 'g': g, 'beta': beta,
            'qn': F.normalize(q, dim=-1), 'kn': F.normalize(k, dim=-1)}


def _bthd(x: torch.Tensor) -> torch.Tensor:
    """(B, H, L, ...) -> (B, L, H, ...)."""
    return x.transpose(1, 2).contiguous()


def _pad_t(x: torch.Tensor, to: int) -> torch.Tensor:
    """Zero-pad dim 2 (time, (B, H, L, ...) layout) to length ``to``."""
    pad = [0, 0] * (x.dim() - 3) + [0, to - x.shape[2]]
    return F.pad(x, pad)


def _ceil(n: int, m: int) -> int:
    return -(-n // m) * m


# ---- the comparisons -------------------------------------------------------------------------------------------

Row = tuple[str, str, str, float]


Outputs = dict[str, list[tuple[str, torch.Tensor]]]


def fla_refs(mods: dict[str, ModuleType], x: dict[str, torch.Tensor], chunk: int) -> Outputs:
    """Every fla reference output, mapped back to (B, H, L, E) float64, keyed by op."""
    gla, sgla, dr, gdr = (mods[k] for k in FILES)
    n = x['q'].shape[2]
    q, k, v, gk, g, beta = (x[k] for k in ('q', 'k', 'v', 'gk', 'g', 'beta'))
    qn, kn = x['qn'], x['kn']
    out: Outputs = {}
    out['gla'] = [('naive_recurrent_gla', _bthd(gla.naive_recurrent_gla(_bthd(q), _bthd(k), _bthd(v), _bthd(gk))[0]))]
    qs, ks, vs, gs = _bthd(q), _bthd(k), _bthd(v), _bthd(g)
    out['simple_gla'] = [
        ('naive_recurrent_simple_gla', _bthd(sgla.naive_recurrent_simple_gla(qs, ks, vs, gs, scale=1.0)[0])),
        (f'naive_chunk_simple_gla(chunk_size={chunk})',
         _bthd(sgla.naive_chunk_simple_gla(qs, ks, vs, gs, chunk_size=chunk, scale=1.0)[0])),
        ('naive_parallel_simple_gla', _bthd(sgla.naive_parallel_simple_gla(qs, ks, vs, gs, scale=1.0)[0])),
    ]
    np_c, np_p = _ceil(n, chunk), _ceil(n, 2 * chunk)
    out['delta'] = [
        ('delta_rule_recurrence', dr.delta_rule_recurrence(qn, kn, v, beta)[0]),
        (f'delta_rule_chunkwise(chunk_size={chunk}), padded to {np_c}',
         dr.delta_rule_chunkwise(*(_pad_t(t, np_c) for t in (qn, kn, v, beta)), chunk_size=chunk)[0][:, :, :n]),
        (f'delta_rule_parallel(BM={2 * chunk}, BN={chunk}), padded to {np_p}',
         dr.delta_rule_parallel(*(_pad_t(t, np_p) for t in (qn, kn, v, beta)), BM=2 * chunk, BN=chunk)[0][:, :, :n]),
    ]
    qg, kg, bg = _bthd(qn), _bthd(kn), _bthd(beta)
    out['gated_delta'] = [
        ('naive_recurrent_gated_delta_rule',
         _bthd(gdr.naive_recurrent_gated_delta_rule(qg, kg, vs, bg, gs, scale=1.0)[0])),
        (f'naive_chunk_gated_delta_rule(chunk_size={chunk})',
         _bthd(gdr.naive_chunk_gated_delta_rule(qg, kg, vs, gs, bg, chunk_size=chunk, scale=1.0)[0])),
    ]
    return out


def ours(x: dict[str, torch.Tensor], chunks: list[int]) -> Outputs:
    """Our outputs (and the self-check loops) on the same inputs, each with the scale the fla side applies."""
    try:
        from efficient_attn.ops import gated as og
    except ImportError:
        og = None
    try:
        from efficient_attn.ops import delta as od
    except ImportError:
        od = None
    d = x['q'].shape[-1]
    q, k, v, gk, g, beta = (x[k] for k in ('q', 'k', 'v', 'gk', 'g', 'beta'))
    qn, kn = x['qn'], x['kn']
    qd = q * d ** -0.5  # fla's GLA recurrence scales q by D**-0.5 itself
    qnd = qn * d ** -0.5  # so does fla's DeltaNet
    g1 = g[..., None]  # (B, H, L, 1)
    res: Outputs = {
        'gla': [('tool loop (self-check)', _loop_gated(qd, k, v, gk))],
        'simple_gla': [('tool loop (self-check)', _loop_gated(q, k, v, g1))],
        'delta': [('tool loop (self-check)', _loop_delta(qnd, kn, v, beta))],
        'gated_delta': [('tool loop (self-check)', _loop_delta(qn, kn, v, beta, g))],
    }
    if og is not None:
        res['gla'].append(('gated_recurrence', og.gated_recurrence(qd, k, v, gk)))
        res['simple_gla'].append(('gated_recurrence', og.gated_recurrence(q, k, v, g1)))
        for c in chunks:
            res['gla'].append((f'chunked_gated(chunk_size={c})', og.chunked_gated(qd, k, v, gk, c)))
            res['simple_gla'].append((f'chunked_gated(chunk_size={c})', og.chunked_gated(q, k, v, g1, c)))
    if od is not None:
        res['delta'].append(('delta_recurrence', od.delta_recurrence(qnd, kn, v, beta)))
        res['gated_delta'].append(('delta_recurrence', od.delta_recurrence(qn, kn, v, beta, g)))
        for c in chunks:
            res['delta'].append((f'chunked_delta(chunk_size={c})', od.chunked_delta(qnd, kn, v, beta, None, c)))
            res['gated_delta'].append((f'chunked_delta(chunk_size={c})', od.chunked_delta(qn, kn, v, beta, g, c)))
    return res


OP_NAMES = {'gla': 'GLA (per-channel gate)', 'simple_gla': 'simple GLA (scalar decay)', 'delta': 'DeltaNet',
            'gated_delta': 'Gated DeltaNet'}


def run(mods: dict[str, ModuleType], seeds: list[int], shape: tuple[int, int, int, int, int], fla_chunk: int,
        chunks: list[int], promote: bool = True) -> tuple[list[Row], list[str]]:
    """Max |error| over the seeds for every (op, our function, fla function) pair."""
    worst: dict[tuple[str, str, str], float] = {}
    for seed in seeds:
        x = draw(seed, *shape)
        ref, mine = fla_refs(mods, x, fla_chunk), ours(x, chunks)
        for op in OP_NAMES:
            for our_name, a in mine[op]:
                for fla_name, r in ref[op]:
                    assert a.shape == r.shape and a.dtype == torch.float64, (op, our_name, fla_name)
                    assert r.dtype == torch.float64 or not promote, (op, our_name, fla_name)
                    key = (OP_NAMES[op], our_name, fla_name)
                    worst[key] = max(worst.get(key, 0.0), (a - r.double()).abs().max().item())
    missing = [m for m in ('efficient_attn.ops.gated', 'efficient_attn.ops.delta')
               if importlib.util.find_spec(m) is None]
    return [(*key, err) for key, err in worst.items()], missing


def table(rows: list[Row], tol: float) -> str:
    lines = ['| op | our function | fla function | max abs error | ok |', '|---|---|---|---|---|']
    lines += [f'| {op} | `{a}` | `{b}` | {e:.3e} | {"yes" if e <= tol else "**NO**"} |' for op, a, b, e in rows]
    return '\n'.join(lines)


def _git_commit(fla_dir: Path) -> str | None:
    try:
        return subprocess.run(['git', '-C', str(fla_dir), 'rev-parse', 'HEAD'], capture_output=True, text=True,
                              check=True).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return None


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split('\n')[0])
    p.add_argument('--fla-dir', type=Path, required=True, help='fla checkout or extracted tree (holds fla/ops/...)')
    p.add_argument('--fla-commit', default=None, help='commit of the tree (read with git when --fla-dir is a checkout)')
    p.add_argument('--out', type=Path, default=Path('results/reference_checks/fla.md'))
    p.add_argument('--seeds', type=int, nargs='+', default=[0, 1, 2, 3, 4])
    p.add_argument('--shape', type=int, nargs=5, default=[2, 3, 150, 8, 5], metavar=('B', 'H', 'L', 'D', 'E'))
    p.add_argument('--fla-chunk', type=int, default=16, help="chunk size of fla's chunked references")
    p.add_argument('--chunks', type=int, nargs='+', default=[8, 32, 64], help='chunk sizes of ours')
    p.add_argument('--tol', type=float, default=1e-10)
    p.add_argument('--as-shipped', action='store_true',
                   help='run the fla files unmodified (float32 inside; needs a looser --tol)')
    args = p.parse_args(argv)

    mods, rewrites = {}, {}
    for key, rel in FILES.items():
        mods[key], rewrites[rel] = load_naive(args.fla_dir, rel, promote=not args.as_shipped)
    commit = args.fla_commit or _git_commit(args.fla_dir) or 'unknown'
    rows, missing = run(mods, args.seeds, tuple(args.shape), args.fla_chunk, args.chunks, not args.as_shipped)
    tab = table(rows, args.tol)
    bad = [r for r in rows if not r[3] <= args.tol]
    print(tab)
    for m in missing:
        print(f'not found: {m} (only the self-check loop was compared for its ops)')
    print(f'{len(rows) - len(bad)}/{len(rows)} within {args.tol:g}')

    b, h, n, d, e = args.shape
    cmd = 'python tools/check_fla.py ' + ' '.join(shlex.quote(a) for a in (argv if argv is not None else sys.argv[1:]))
    md = [
        '# Gated and delta-rule kernels against flash-linear-attention\'s plain-torch references', '',
        f'fla: github.com/fla-org/flash-linear-attention at commit `{commit}`.', '',
        f'efficient-attn: commit `{_git_commit(Path(__file__).resolve().parent.parent) or "unknown"}` '
        '(the tree the command ran on).', '',
        f'Command: `{cmd}`', '',
        ('fla files (loaded alone by path, unmodified: float32 inside):' if args.as_shipped else
         'fla files (loaded alone by path, float32 casts rewritten to float64 in the source text, nothing else '
         'changed):'),
        '',
        *[f'- `{rel}` ({rewrites[rel]} casts rewritten)' for rel in FILES.values()], '',
        'Ours: `efficient_attn/ops/gated.py` (`gated_recurrence`, `chunked_gated`), `efficient_attn/ops/delta.py` '
        '(`delta_recurrence`, `chunked_delta`); "tool loop" is the float64 loop of the formulas in '
        '`tools/check_fla.py`, a check of the mapping on its own.', '',
        f'Inputs: float64, B={b}, H={h}, L={n}, D={d}, E={e}, seeds {args.seeds}; GLA gate logsigmoid(randn)/16 '
        'per channel; scalar decay g = -exp(A_log)·softplus(randn - 3), A_log = log U(1, 16) per head; '
        'beta = sigmoid(randn); q, k L2-normalised for the delta rule. fla GLA and DeltaNet scale q by D^-0.5 '
        'inside, so ours gets q·D^-0.5; the other fla functions get scale=1. fla DeltaNet chunkwise / parallel '
        'need L a multiple of their block: inputs zero-padded at the end, output cut to L.', '',
        'fla conventions (read from the files; all agree with ours once mapped): GLA and simple GLA decay the '
        'state first, then add k_tᵀ v_t, and read o_t after the update (gate of token t applies to S_{t-1}, '
        'token t itself undecayed); DeltaNet v\'_t = beta_t (v_t - k_t S), S += k_tᵀ v\'_t; Gated DeltaNet decays S '
        'by exp(g_t) before the delta step (a scalar, so the same as decaying after (I - beta_t k_tᵀ k_t)). '
        'Layouts: `delta_rule/naive.py` is (B, H, T, D), the other three files (B, T, H, D). '
        '`naive_chunk_gated_delta_rule` takes (q, k, v, g, beta), `naive_recurrent_gated_delta_rule` '
        '(q, k, v, beta, g).', '',
        f'Max |error| over the seeds (tolerance {args.tol:g}):', '',
        tab, '',
        *[f'Not found: `{m}`; only the self-check loop was compared for its ops.' for m in missing],
        f'{len(rows) - len(bad)}/{len(rows)} within {args.tol:g}.', '',
    ]
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text('\n'.join(md))
    return 1 if bad else 0


if __name__ == '__main__':
    sys.exit(main())
