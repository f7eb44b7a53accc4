"""M3 noise-prediction alignment: how much of the training latent the noise predictions carry.

For an exact denoiser `e = (x_t - sqrt(abar) x) / sqrt(1 - abar)`, i.e. `e = a x + b x_t` with
`a = -sqrt(abar / (1 - abar))`, `b = 1 / sqrt(1 - abar)`.
"""
from __future__ import annotations

import torch

from mem_analysis.losses import align_reference


def cosine(u: torch.Tensor, v: torch.Tensor, latent_ndim: int = 3) -> torch.Tensor:
    """`<u, v> / (||u|| ||v||)` over the last `latent_ndim` dims (broadcasting the rest), float64."""
    dims = tuple(range(-latent_ndim, 0))
    u, v = u.double(), v.double()
    return (u * v).sum(dims) / (u.pow(2).sum(dims).sqrt() * v.pow(2).sum(dims).sqrt())


def least_squares_xt(e: torch.Tensor, x: torch.Tensor, x_t: torch.Tensor, latent_ndim: int = 3):
    """Coefficients (a, b) of `e ~ a x + b x_t` per leading index, by the 2x2 normal equations (float64)."""
    dims = tuple(range(-latent_ndim, 0))
    e, x, x_t = e.double(), x.double(), x_t.double()
    xx, xz, zz = (x * x).sum(dims), (x * x_t).sum(dims), (x_t * x_t).sum(dims)
    xe, ze = (x * e).sum(dims), (x_t * e).sum(dims)
    xx, xz, zz, xe, ze = torch.broadcast_tensors(xx, xz, zz, xe, ze)
    gram = torch.stack([torch.stack([xx, xz], -1), torch.stack([xz, zz], -1)], -2)
    coef = torch.linalg.solve(gram, torch.stack([xe, ze], -1)[..., None])[..., 0]
    return coef[..., 0], coef[..., 1]


def noise_alignment(e_c: torch.Tensor, e_0: torch.Tensor, x: torch.Tensor, x_t: torch.Tensor, alpha_bar,
                    mu: torch.Tensor | None = None, latent_ndim: int = 3, x_T: torch.Tensor | None = None
                    ) -> dict[str, torch.Tensor]:
    """M3 per leading index (e.g. (S, T) probes or (N, K) trajectory steps), float64.

    `cos_{c,0,diff}_x`: cosine of `e_c`, `e_0`, `e_c - e_0` with `x` (and `_xmu` with `x - mu`
    when `mu` is given, `_xT` with the initial noise `x_T` when given, aligned like `x`); `fit_a_{c,0}`, `fit_b_{c,0}`: least squares `e ~ a x + b x_t`;
    `theory_a = -sqrt(abar / (1 - abar))`, `theory_b = 1 / sqrt(1 - abar)`.
    Shapes: `e_c`, `e_0`, `x_t` (*lead, *latent); `x` (*latent) or left-aligned (*lead[:m], *latent);
    `alpha_bar` broadcasts against `lead` (e.g. (T,) for lead (S, T)).
    """
    if e_c.shape != e_0.shape or e_c.shape != x_t.shape:
        raise ValueError(f"e_c {tuple(e_c.shape)}, e_0 {tuple(e_0.shape)} and x_t {tuple(x_t.shape)} must match")
    x = align_reference(x, e_c, latent_ndim, "x", "e_c")
    lead = e_c.shape[:-latent_ndim]
    abar = torch.as_tensor(alpha_bar, dtype=torch.float64).to(e_c.device)
    try:
        abar = abar.expand(lead)
    except RuntimeError:
        raise ValueError(f"alpha_bar {tuple(abar.shape)} does not broadcast against the leading dims {tuple(lead)}")
    out = {}
    centred = {"x": x} if mu is None else {"x": x, "xmu": x - mu.float().to(x.device)}
    if x_T is not None:
        centred["xT"] = align_reference(x_T, e_c, latent_ndim, "x_T", "e_c")
    for suffix, ref in centred.items():
        for name, e in (("c", e_c), ("0", e_0), ("diff", e_c - e_0)):
            out[f"cos_{name}_{suffix}"] = cosine(e, ref, latent_ndim)
    for name, e in (("c", e_c), ("0", e_0)):
        out[f"fit_a_{name}"], out[f"fit_b_{name}"] = least_squares_xt(e, x, x_t, latent_ndim)
    out["theory_a"] = -(abar / (1 - abar)).sqrt()
    out["theory_b"] = 1 / (1 - abar).sqrt()
    return out


def guidance_norm(e_c: torch.Tensor, e_0: torch.Tensor, latent_ndim: int = 3) -> torch.Tensor:
    """The text guidance's size `||e_c - e_0||_2` over the last `latent_ndim` dims; (*lead,) in their dtype."""
    if e_c.shape != e_0.shape or e_c.ndim <= latent_ndim:
        raise ValueError(f"e_c {tuple(e_c.shape)} and e_0 {tuple(e_0.shape)} must match and be (..., *latent)")
    return (e_c - e_0).flatten(-latent_ndim).norm(dim=-1)


def wen_magnitude(e_c: torch.Tensor, e_0: torch.Tensor, first_steps: int | None = None,
                  latent_ndim: int = 3) -> torch.Tensor:
    """Wen et al. (ICLR 2024): `mean_{k < first_steps} ||e_c[..., k] - e_0[..., k]||_2` (guidance_norm per step).

    `e_c`, `e_0` (*lead, K, *latent) with the sampling steps as the last leading dim;
    returns (*lead,) float64 (all K steps when `first_steps` is None).
    """
    if e_c.shape != e_0.shape or e_c.ndim < latent_ndim + 1:
        raise ValueError(f"e_c {tuple(e_c.shape)} and e_0 {tuple(e_0.shape)} must match and be (..., steps, *latent)")
    K = e_c.shape[-latent_ndim - 1]
    first = K if first_steps is None else int(first_steps)
    if not 1 <= first <= K:
        raise ValueError(f"first_steps must be in [1, {K}], got {first_steps}")
    steps = lambda e: e.narrow(-latent_ndim - 1, 0, first).double()  # noqa: E731
    return guidance_norm(steps(e_c), steps(e_0), latent_ndim).mean(-1)
