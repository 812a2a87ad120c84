"""Small analytic models shared by the tests."""

from __future__ import annotations

import torch

from adaptive_sampling.evaluation.workloads.gaussian import GaussianWorkload


def gaussian(shape=(2, 6, 6), num_classes=3, seed=0, dtype=torch.float64) -> GaussianWorkload:
    return GaussianWorkload.make(num_classes=num_classes, shape=shape, std=0.5, seed=seed, dtype=dtype)


class CountingModel:
    """Wraps a denoiser; counts, per sample id, how many rows the model really evaluated.

    The sample ids travel in extra_args['ids'] (a batch-leading tensor), so they are sliced
    exactly like any other conditioning.
    """

    def __init__(self, denoiser, batch: int):
        self.denoiser = denoiser
        self.rows = torch.zeros(batch, dtype=torch.long)
        self.calls = 0

    def __call__(self, x, sigma, ids, **kw):
        self.calls += 1
        self.rows[ids.cpu()] += 1
        return self.denoiser(x, sigma, **kw)


class MLPDenoiser(torch.nn.Module):
    """A random smooth nonlinear denoiser (float64) for equivalence tests."""

    def __init__(self, dim: int, hidden: int = 32, seed: int = 0):
        super().__init__()
        g = torch.Generator().manual_seed(seed)
        self.w1 = torch.nn.Parameter(torch.randn(dim + 1, hidden, generator=g, dtype=torch.float64) / dim**0.5)
        self.w2 = torch.nn.Parameter(torch.randn(hidden, dim, generator=g, dtype=torch.float64) / hidden**0.5)

    def forward(self, x, sigma, **kw):
        flat = x.reshape(x.shape[0], -1)
        c_in = (1 + sigma[:, None] ** 2) ** -0.5
        h = torch.tanh(torch.cat([flat * c_in, sigma[:, None].log()], dim=1) @ self.w1)
        eps = (h @ self.w2).reshape(x.shape)
        return x - sigma.reshape(-1, *([1] * (x.ndim - 1))) * eps


class LinearEps:
    """eps(x, sigma) = A x + b sigma + c per row, as a denoiser: x - sigma * eps.

    Lipschitz constants: L_x = ||A||_2, L_sigma = ||b||.
    """

    def __init__(self, A, b, c):
        self.A, self.b, self.c = A, b, c

    def eps(self, x, sigma):
        return x @ self.A.T + sigma[:, None] * self.b + self.c

    def __call__(self, x, sigma, **kw):
        return x - sigma[:, None] * self.eps(x, sigma)

    @property
    def lipschitz(self):
        return torch.linalg.matrix_norm(self.A, ord=2).item(), self.b.norm().item()


def assert_merge_mode_is_the_sub_grid_run(sample, model, x: torch.Tensor, sigmas: torch.Tensor, mask) -> None:
    """A 2M sampler in merge mode with the per-row boolean ``mask`` [B, N] computes exactly those
    calls, and each row's output is, bit for bit, the plain solver on that row's sub-grid (its
    computed sigmas plus the final one). The model is called one row at a time: a float32 matmul's
    rounding may depend on the batch size (1e-7 between batch 1 and 2 with MKL on one of our CPUs),
    which is BLAS's property, not the sampler's."""
    from adaptive_sampling import FixedMask

    inner = model

    def model(x, sigma, **kw):
        return torch.cat([inner(x[i : i + 1], sigma[i : i + 1], **kw) for i in range(len(x))])

    out, rep = sample(model, x, sigmas, disable=True, skip=FixedMask(mask), merge_skipped=True)
    assert rep.computed.tolist() == mask.tolist()
    for b in range(x.shape[0]):
        sub = torch.cat([sigmas[:-1][torch.from_numpy(mask[b])], sigmas[-1:]])
        want, _ = sample(model, x[b : b + 1], sub, disable=True)
        assert torch.equal(out[b : b + 1], want)
