"""The Triton draw (the sampler's GPU path) against the inverse CDF computed in float64.

Without CUDA the kernel runs in Triton's interpreter on CPU tensors; with CUDA it runs compiled, in bfloat16 too."""

from __future__ import annotations

import pytest
import torch
from triton_setup import DEVICE, WITH_BFLOAT16  # first: it sets up the interpreter before triton is imported

from glassbox.kernels import sampling_triton
from glassbox.sampling import SampleRequest, SamplingParams, sample_tokens

DTYPES = [torch.float32, *WITH_BFLOAT16]


def inverse_cdf(logits: torch.Tensor, scale: torch.Tensor, u: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """The draw in float64: tokens [N], and each target's distance to its nearest cdf step relative to the total
    (a draw that close to a step may go either way under float32 rounding)."""
    probs = (logits.double() * scale.double()[:, None]).softmax(-1)
    cdf = probs.cumsum(-1)
    target = u.double()[:, None] * cdf[:, -1:]
    drawn = torch.searchsorted(cdf, target, right=True)[:, 0]
    margin = ((cdf - target).abs() / cdf[:, -1:]).min(-1).values
    return drawn, margin


@pytest.mark.parametrize("dtype", DTYPES)
def test_draw_is_the_inverse_cdf_over_several_blocks(dtype):
    generator = torch.Generator().manual_seed(0)
    rows, vocab = 48, 2 * sampling_triton.BLOCK + 123  # three blocks, the last one partial
    logits = (torch.randn(rows, vocab, generator=generator) * 4).to(dtype).float()
    logits[::3, ::2] = float("-inf")  # filtered-out tokens (top-k / top-p masks)
    logits[5, :] = float("-inf")
    logits[5, vocab - 7] = 0.0  # a single token left: the draw must be it
    scale = torch.rand(rows, generator=generator) * 2 + 0.25
    u = torch.rand(rows, generator=generator)
    u[7], u[8] = 0.0, 1 - 2**-24  # the ends of [0, 1)

    got = sampling_triton.draw(logits.to(DEVICE, dtype), scale.to(DEVICE), u.to(DEVICE)).cpu()

    expected, margin = inverse_cdf(logits, scale, u)
    close = margin < 1e-6
    assert close.sum() <= 3, "the seed should keep targets off the cdf steps"
    assert torch.equal(got[~close], expected[~close])
    assert got[5] == vocab - 7
    positive = torch.isfinite(logits).nonzero()
    assert got[7] == positive[positive[:, 0] == 7, 1].min()  # u = 0: the first token that can be drawn
    assert torch.isfinite(logits[torch.arange(rows), got]).all()  # never a filtered-out token


def test_sampler_on_the_device_keeps_seeds_and_filters():
    """sample_tokens as the engine calls it: temperature-only rows go to the kernel from the raw logits,
    filtered rows after their masks; a seeded row draws the same token alone and in a batch."""
    generator = torch.Generator().manual_seed(1)
    logits = (torch.randn(4, 5000, generator=generator) * 3).to(DEVICE)
    params = [SamplingParams(temperature=0.7, seed=3), SamplingParams(temperature=0), SamplingParams(top_k=3),
              SamplingParams(temperature=1.3)]  # fmt: skip

    def requests(ps: list[SamplingParams]) -> list[SampleRequest]:
        return [SampleRequest(p, [], [], None if p.seed is None else torch.Generator(DEVICE).manual_seed(p.seed))
                for p in ps]  # fmt: skip

    default = torch.Generator(DEVICE).manual_seed(0)
    batched = sample_tokens(logits, requests(params), default).cpu()
    alone = sample_tokens(logits[:1], requests(params[:1]), default).cpu()
    assert batched[0] == alone[0]
    assert batched[1] == logits[1].argmax().cpu()
    assert batched[2] in torch.topk(logits[2], 3).indices.cpu()
