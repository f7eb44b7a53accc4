"""M1 per-sample denoising losses with and without CFG, and M2 overestimation coefficients.

One batched UNet pass gives `e_c` and `e_0` for every (sample, timestep); every guided
prediction `e_g = e_0 + g (e_c - e_0)` is derived from those two, with no further UNet call.
"""
from __future__ import annotations

from dataclasses import dataclass, field

import torch

from mem_analysis.schedule import check_timesteps, clean_estimate, forward_noise, to_epsilon


def guided(e_c: torch.Tensor, e_0: torch.Tensor, g: float) -> torch.Tensor:
    """`e_g = e_0 + g (e_c - e_0)` (g = 1: conditional, g = 0: unconditional)."""
    return e_0 + g * (e_c - e_0)


def module_device_dtype(module: torch.nn.Module) -> tuple[torch.device, torch.dtype]:
    """Device and floating dtype of a (possibly wrapped) network."""
    param = next(p for p in module.parameters() if p.is_floating_point())
    return param.device, param.dtype


@dataclass
class DenoisingResult:
    """Predictions and per-(sample, timestep) losses of one `denoising_losses` pass (float32).

    Shapes: `timesteps`, `alpha_bar` (T,); `x`, (S, *latent); `noise`, `x_t`, `e_c`, `e_0`
    (S, T, *latent); `loss_cond`, `loss_uncond` and each `loss_cfg[g]` (S, T).
    """

    timesteps: torch.Tensor
    alpha_bar: torch.Tensor
    x: torch.Tensor
    noise: torch.Tensor
    x_t: torch.Tensor
    e_c: torch.Tensor
    e_0: torch.Tensor
    loss_cond: torch.Tensor
    loss_uncond: torch.Tensor
    loss_cfg: dict[float, torch.Tensor] = field(default_factory=dict)

    def prediction(self, g: float) -> torch.Tensor:
        """`e_g = e_0 + g (e_c - e_0)`, (S, T, *latent)."""
        return guided(self.e_c, self.e_0, g)

    def x0hat(self, g: float = 1.0) -> torch.Tensor:
        """`x0hat(e_g) = (x_t - sqrt(1 - abar_t) e_g) / sqrt(abar_t)`, (S, T, *latent)."""
        abar = self.alpha_bar.to(self.x_t.device, torch.float32).expand(self.x_t.shape[:2])
        return clean_estimate(self.x_t, self.prediction(g), abar)

    def loss(self, g: float) -> torch.Tensor:
        """`L_g = mean_elements (eps - e_g)^2`, (S, T)."""
        return per_sample_mse(self.noise, self.prediction(g))

    def loss_x0(self, g: float) -> torch.Tensor:
        """x0-space loss `mean_elements (x - x0hat(e_g))^2` (S, T); equals `L_g / SNR_t` (docs/science.md, notation)."""
        return per_sample_mse(self.x[:, None].expand_as(self.x_t), self.x0hat(g))


def per_sample_mse(noise: torch.Tensor, prediction: torch.Tensor) -> torch.Tensor:
    """`mean over the latent elements of (eps - e)^2`, keeping the two leading dims."""
    return (noise - prediction).pow(2).flatten(2).mean(-1)


def as_embeddings(emb: torch.Tensor, n: int, name: str) -> torch.Tensor:
    """Text embeddings as (1 or n, L, D), checked."""
    if emb.ndim == 2:
        emb = emb[None]
    if emb.ndim != 3 or emb.shape[0] not in (1, n):
        raise ValueError(f"{name} must be (L, D), (1, L, D) or ({n}, L, D) embeddings, got {tuple(emb.shape)}")
    return emb


@torch.no_grad()
def predict_noise(unet, x_t: torch.Tensor, cond: torch.Tensor, uncond: torch.Tensor, timesteps: torch.Tensor,
                  abar: torch.Tensor, prediction_type: str = "epsilon", chunk_size: int = 32
                  ) -> tuple[torch.Tensor, torch.Tensor]:
    """`e_c = eps_theta(x_t, t, c)` and `e_0 = eps_theta(x_t, t, 0)` for every (sample, timestep), float32.

    `x_t` (S, T, *latent) is any input (forward-noised latents, or pure noise); `timesteps` (T,) long;
    `abar` (T,) their alpha_bar; `cond` (S or 1, L, D), `uncond` (1 or S, L, D) already checked. The UNet sees
    cond and uncond stacked, `chunk_size` pairs at a time; v-/sample-predictions are converted to eps.
    """
    device, dtype = module_device_dtype(unet)
    S, T = x_t.shape[:2]
    e_c, e_0 = torch.empty_like(x_t), torch.empty_like(x_t)
    pairs_s = torch.arange(S, device=device).repeat_interleave(T)
    pairs_t = torch.arange(T, device=device).repeat(S)
    was_training = unet.training
    unet.eval()
    try:
        for start in range(0, S * T, chunk_size):
            s, t = pairs_s[start:start + chunk_size], pairs_t[start:start + chunk_size]
            n = s.numel()
            latents = x_t[s, t]
            model_in = torch.cat([latents, latents]).to(dtype)
            steps = timesteps.to(device)[t].repeat(2)
            hidden = torch.cat([cond[s if cond.shape[0] > 1 else torch.zeros_like(s)],
                                uncond[s if uncond.shape[0] > 1 else torch.zeros_like(s)]])
            out = unet(model_in, steps, encoder_hidden_states=hidden).sample.float()
            eps = to_epsilon(out, torch.cat([latents, latents]), abar[t].repeat(2), prediction_type)
            e_c[s, t], e_0[s, t] = eps[:n], eps[n:]
    finally:
        unet.train(was_training)
    return e_c, e_0


def checked_inputs(unet, x: torch.Tensor, cond: torch.Tensor, uncond: torch.Tensor, timesteps, noise: torch.Tensor,
                   alpha_bar: torch.Tensor, chunk_size: int):
    """The arguments of `denoising_losses` checked and moved to the UNet's device:
    (timesteps (T,) long, abar (T,) float32, x, noise (S, T, *latent) float32, cond, uncond)."""
    device, dtype = module_device_dtype(unet)
    timesteps = check_timesteps(timesteps, alpha_bar)
    S, T = x.shape[0], timesteps.numel()
    if noise.shape != (S, T) + tuple(x.shape[1:]):
        raise ValueError(f"noise must be (samples, timesteps, *latent) = {(S, T) + tuple(x.shape[1:])}, "
                         f"got {tuple(noise.shape)}")
    if chunk_size < 1:
        raise ValueError(f"chunk_size must be >= 1, got {chunk_size}")
    cond, uncond = as_embeddings(cond, S, "cond"), as_embeddings(uncond, S, "uncond")
    if cond.shape[1:] != uncond.shape[1:]:
        raise ValueError(f"cond {tuple(cond.shape)} and uncond {tuple(uncond.shape)} differ in (L, D)")
    abar = alpha_bar.to(device, torch.float64)[timesteps.to(device)].float()
    return (timesteps, abar, x.to(device, torch.float32), noise.to(device, torch.float32),
            cond.to(device, dtype), uncond.to(device, dtype))


@torch.no_grad()
def denoising_losses(unet, x: torch.Tensor, cond: torch.Tensor, uncond: torch.Tensor, timesteps,
                     noise: torch.Tensor, alpha_bar: torch.Tensor, guidance_scales=(),
                     prediction_type: str = "epsilon", chunk_size: int = 32) -> DenoisingResult:
    """M1: `L_c(t) = mean ||eps - e_c||^2`, `L_0(t)`, `L_g(t)` per sample and timestep.

    `x_t = sqrt(abar_t) x + sqrt(1 - abar_t) eps`; `e_c = eps_theta(x_t, t, c)`,
    `e_0 = eps_theta(x_t, t, 0)` (v-/sample-predictions converted to eps);
    `e_g = e_0 + g (e_c - e_0)`. Shapes: `x` (S, *latent); `cond` (S or 1, L, D);
    `uncond` (1, L, D); `timesteps` (T,) integers in the schedule; `noise` (S, T, *latent);
    `alpha_bar` the full (num_train_timesteps,) table. The UNet sees cond and uncond stacked,
    `chunk_size` (sample, timestep) pairs at a time (UNet batch `2 * chunk_size`); results
    are float32 on the UNet's device whatever its dtype.
    """
    timesteps, abar, x, noise, cond, uncond = checked_inputs(unet, x, cond, uncond, timesteps, noise, alpha_bar,
                                                             chunk_size)
    S, T = noise.shape[:2]
    x_t = forward_noise(x[:, None], noise, abar.expand(S, T))
    e_c, e_0 = predict_noise(unet, x_t, cond, uncond, timesteps, abar, prediction_type, chunk_size)
    result = DenoisingResult(timesteps.cpu(), abar, x, noise, x_t, e_c, e_0,
                             per_sample_mse(noise, e_c), per_sample_mse(noise, e_0))
    result.loss_cfg = {float(g): result.loss(float(g)) for g in guidance_scales}
    return result


def align_reference(x: torch.Tensor, like: torch.Tensor, latent_ndim: int = 3, name: str = "x",
                    like_name: str = "prediction") -> torch.Tensor:
    """`x` (*latent) or (*lead[:m], *latent) reshaped (float32) to broadcast against `like` (*lead, *latent)."""
    if like.ndim < latent_ndim or x.ndim < latent_ndim or like.shape[-latent_ndim:] != x.shape[-latent_ndim:]:
        raise ValueError(f"{like_name} {tuple(like.shape)} and {name} {tuple(x.shape)} must end in the same "
                         f"{latent_ndim} latent dims")
    lead, x_lead = like.shape[:-latent_ndim], x.shape[:-latent_ndim]
    if len(x_lead) > len(lead) or tuple(lead[:len(x_lead)]) != tuple(x_lead):
        raise ValueError(f"{name} {tuple(x.shape)} does not align with the leading dims of {like_name} {tuple(like.shape)}")
    return x.float().to(like.device).reshape(tuple(x_lead) + (1,) * (len(lead) - len(x_lead)) + x.shape[-latent_ndim:])


def dataset_mean(values: torch.Tensor, counts) -> torch.Tensor:
    """The training set's mean, duplicates counted as trained: `sum_n c_n v_n / sum_n c_n` over the first dim,
    for unique items `v_n` seen `c_n` times (the `mu` of the centred k, or the mean image); float32."""
    weights = torch.as_tensor(counts, dtype=torch.float32, device=values.device)
    if weights.shape != values.shape[:1] or not weights.sum() > 0:
        raise ValueError(f"counts {tuple(weights.shape)} must be one positive-sum count per row of {tuple(values.shape)}")
    return torch.einsum("n,n...->...", weights, values.float()) / weights.sum()


def overestimation(x0hat: torch.Tensor, x: torch.Tensor, mu: torch.Tensor | None = None,
                   latent_ndim: int = 3) -> torch.Tensor:
    """M2: `k = <x0hat - mu, x - mu> / ||x - mu||^2` over the last `latent_ndim` dims (mu = 0 if None).

    `x0hat` is (*lead, *latent); `x` is (*latent) or (*lead[:m], *latent), aligned on the left
    (e.g. x0hat (S, T, C, H, W) with x (S, C, H, W)). Returns float32 of shape `lead`.
    """
    x = align_reference(x, x0hat, latent_ndim, "x", "x0hat")
    x0hat = x0hat.float()
    if mu is not None:
        if mu.shape != x.shape[-latent_ndim:]:
            raise ValueError(f"mu must have the latent shape {tuple(x.shape[-latent_ndim:])}, got {tuple(mu.shape)}")
        mu = mu.float().to(x0hat.device)
        x, x0hat = x - mu, x0hat - mu
    dims = tuple(range(-latent_ndim, 0))
    norm2 = x.pow(2).sum(dims)
    if (norm2 == 0).any():
        raise ValueError("||x - mu|| is zero for some sample; k is undefined (is mu equal to x?)")
    return (x0hat * x).sum(dims) / norm2


def first_step_overestimation(x_T: torch.Tensor, e_c: torch.Tensor, e_0: torch.Tensor, alpha_bar_t0: float,
                              x: torch.Tensor, mu: torch.Tensor | None, guidance_scale: float) -> dict[str, torch.Tensor]:
    """M2 where the paper measures it: k of the sampler's first prediction, from pure Gaussian noise, per seed.

    `x_T`, `e_c`, `e_0` (N, *latent): the latent entering the first DDIM step of N seeds (pure noise) and the
    noise predictions there (eps space; v-prediction converted as sampling records it); `alpha_bar_t0` the
    first sampling timestep's abar; `x` (*latent) the training latent, `mu` the training mean (centred k;
    None: uncentred). For b in {0, c, g}: `x0hat_T(b) = (x_T - sqrt(1 - abar_t0) e_b) / sqrt(abar_t0)` with
    `e_g = e_0 + g (e_c - e_0)` at `guidance_scale` g, and `k_b = <x0hat_T(b) - mu, x - mu> / ||x - mu||^2`.
    Returns `k0_first`, `kc_first`, `kg_first`, each (N,) float32. The revised Corollary 3 of the paper:
    `x0hat_T(c; g) -> mu + g (x - mu)` for a memorized prompt (kc = 1, kg = g) while k0 ~ 0.

    The pooled scalar least-squares fit over seeds, `(x0hat_T,j - mu) ~ a (x - mu)`, is
    `a = sum_j <x0hat_T,j - mu, x - mu> / (N ||x - mu||^2)`, i.e. exactly the mean of the per-seed k (the
    regressor x - mu is the same for every seed), so the per-sample mean of these columns *is* the pooled fit.
    """
    abar = torch.full(x_T.shape[:1], float(alpha_bar_t0))
    x0hat = {name: clean_estimate(x_T.float(), e.float(), abar) for name, e in
             (("k0_first", e_0), ("kc_first", e_c), ("kg_first", guided(e_c, e_0, float(guidance_scale))))}
    return {name: overestimation(value, x, mu, x.ndim) for name, value in x0hat.items()}


def pooled_overestimation(k: torch.Tensor, x: torch.Tensor, mu: torch.Tensor | None = None) -> float:
    """The scalar least-squares fit over samples i and their seeds j, `(x0hat_ij - mu) ~ a (x_i - mu)`:
    `a = sum_i ||x_i - mu||^2 kbar_i / sum_i ||x_i - mu||^2`, kbar_i the sample's mean k over its seeds
    (equal seeds per sample), i.e. the mean of the per-sample k weighted by `||x_i - mu||^2`.
    `k` (S,), `x` (S, *latent), `mu` (*latent) or None (uncentred)."""
    x = x.double().reshape(len(x), -1)
    centred = x if mu is None else x - mu.double().reshape(1, -1)
    weight = centred.pow(2).sum(1)
    return float((weight * torch.as_tensor(k, dtype=torch.float64)).sum() / weight.sum())
