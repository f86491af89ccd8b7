"""What every Triton test imports first, before triton: without CUDA the kernels run in Triton's interpreter
on CPU tensors (TRITON_INTERPRET is read when the kernels are decorated, so it is set here, before the first
triton import); with CUDA they run compiled. bfloat16 only there: the interpreter's tl.dot gets it wrong."""

from __future__ import annotations

import os

import pytest
import torch

if not torch.cuda.is_available():
    os.environ["TRITON_INTERPRET"] = "1"

pytest.importorskip("triton")

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
WITH_BFLOAT16 = [torch.bfloat16] if DEVICE == "cuda" else []
