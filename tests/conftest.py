import pytest
import torch


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)


def make_qkv(b=2, h=2, length=12, s=None, d=8, dv=None, dtype=torch.float64, scale=1.0):
    """Random heads-first q (B,H,L,D), k (B,H,S,D), v (B,H,S,Dv)."""
    s = length if s is None else s
    dv = d if dv is None else dv
    q = torch.randn(b, h, length, d, dtype=dtype) * scale
    k = torch.randn(b, h, s, d, dtype=dtype) * scale
    v = torch.randn(b, h, s, dv, dtype=dtype)
    return q, k, v
