"""The Triton expert kernels equal the PyTorch path: run by Triton's interpreter on CPU, natively on CUDA.

The interpreter is on when TRITON_INTERPRET=1 is set before Triton's first import (``conftest.py`` sets it
on machines without CUDA). Each kernel is also compiled for an H100/H200 (sm_90) ahead of time, in a
separate process without the interpreter; that needs no GPU, so a kernel that would not build fails here.
"""

from __future__ import annotations

import os
import subprocess
import sys

import pytest
import torch
from test_fast_path import SHAPES, close, expert_pass, module

triton = pytest.importorskip("triton", reason="Triton is not installed (pip install triton): kernels untested")

from upcycle import modeling_upcycle_doge as cdmoe  # noqa: E402

INTERPRETED = os.environ.get("TRITON_INTERPRET", "0") == "1"  # as Triton read it at its import
DEVICES = (["cpu"] if INTERPRETED else []) + (["cuda"] if torch.cuda.is_available() and not INTERPRETED else [])
pytestmark = pytest.mark.skipif(not DEVICES, reason="neither CUDA nor TRITON_INTERPRET=1 at Triton's import")


@pytest.fixture(params=DEVICES)
def device(request, monkeypatch) -> str:
    """Kernels on: interpreted on CPU, compiled on CUDA."""
    monkeypatch.setenv("UPCYCLE_TRITON", "1")
    return request.param


def primitives(table, indices, states, weights) -> dict[str, torch.Tensor]:
    return {"dots": cdmoe.row_dots(table, indices, states), "mix": cdmoe.row_mix(table, indices, weights),
            "scatter": cdmoe.scatter_rows(indices, weights, states, table.shape[0])}


@pytest.mark.parametrize("hidden, experts, k, tokens", [(48, 64, 8, 7), (20, 16, 3, 5), (33, 9, 1, 4), (16, 8, 4, 0),
                                                         (130, 32, 16, 3)])
def test_primitives_equal_the_pytorch_path(device, monkeypatch, hidden, experts, k, tokens):
    gen = torch.Generator().manual_seed(hidden)
    table = torch.randn(experts, hidden, generator=gen)
    indices = torch.randint(0, experts, (tokens, k), generator=gen)
    if tokens:
        indices[0] = indices[0, 0]  # one token picking the same row k times: the scatter must add, not overwrite
    states, weights = torch.randn(tokens, hidden, generator=gen), torch.randn(tokens, k, generator=gen)
    args = [t.to(device) for t in (table, indices, states, weights)]
    assert cdmoe.use_triton(args[0])
    got = primitives(*args)
    monkeypatch.setenv("UPCYCLE_TRITON", "0")
    want = primitives(table, indices, states, weights)
    for name in want:
        assert got[name].shape == want[name].shape and got[name].dtype == want[name].dtype, name
        assert not want[name].numel() or close(got[name].cpu(), want[name], 1e-5), name


@pytest.mark.parametrize("norm", [False, True])
@pytest.mark.parametrize("hidden, experts, k, tokens", [s for s in SHAPES if s[3] <= 40])
def test_module_forward_and_gradients_equal_the_reference(device, hidden, experts, k, tokens, norm):
    layer = module(hidden, experts, k, norm).to(device)
    gen = torch.Generator().manual_seed(tokens)
    x = torch.randn(tokens, hidden, generator=gen).to(device).requires_grad_()
    grad = torch.randn(tokens, hidden, generator=gen).to(device)
    fast, fast_grads = expert_pass(layer, x, grad, reference=False)
    ref, ref_grads = expert_pass(layer, x, grad, reference=True)
    assert close(fast.cpu(), ref.cpu(), 1e-5)
    for name, want in ref_grads.items():
        assert close(fast_grads[name].cpu(), want.cpu(), 1e-5), name


def test_off_by_default_and_never_for_fp64(monkeypatch):
    monkeypatch.delenv("UPCYCLE_TRITON", raising=False)
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    assert not cdmoe.use_triton(torch.zeros(1))
    monkeypatch.setenv("UPCYCLE_TRITON", "1")
    assert cdmoe.use_triton(torch.zeros(1)) and not cdmoe.use_triton(torch.zeros(1, dtype=torch.float64))
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    assert not cdmoe.use_triton(torch.zeros(1))  # CPU tensors need the interpreter


COMPILE_FOR_SM90 = """
import triton
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource
from upcycle import modeling_upcycle_doge as cdmoe

kernels = {  # kernel: (pointer arguments, constexpr values)
    "_dots_kernel": (("table", "indices", "states", "out"), dict(K=32, H=1024, BLOCK_K=32, BLOCK_H=128)),
    "_mix_kernel": (("table", "indices", "weights", "out"), dict(K=32, H=1024, BLOCK_K=32, BLOCK_H=128)),
    "_scatter_kernel": (("grad", "indices", "weights", "states"), dict(K=32, H=1024, BLOCK_H=1024)),
}
for dtype in ("fp32", "bf16"):
    for name, (pointers, constants) in kernels.items():
        types = {"indices": "*i64", "grad": "*fp32", "weights": "*fp32"}
        signature = {p: types.get(p, "*" + dtype) for p in pointers} | {c: "constexpr" for c in constants}
        source = ASTSource(triton.jit(getattr(cdmoe, name)), signature=signature, constexprs=constants)
        assert triton.compile(source, target=GPUTarget("cuda", 90, 32)).asm["cubin"], name
        print(name, dtype, "ok")
"""


def test_kernels_compile_for_sm90():
    env = {**os.environ, "TRITON_INTERPRET": "0", "TRITON_DEFAULT_FP_FUSION": "1"}
    done = subprocess.run([sys.executable, "-c", COMPILE_FOR_SM90], env=env, capture_output=True, text=True,
                          timeout=600)
    assert done.returncode == 0, done.stderr[-2000:]
    assert done.stdout.count(" ok") == 6, done.stdout
