"""Measurement helpers of the GPU check (a library of bench/, no main): the bare diffusers-style training loop
and its options, FLOP counting and model FLOPs utilization, and bf16-against-float32 probe numerics with their
tolerances.
"""
from __future__ import annotations

import contextlib
import copy
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image

from bench.timing import free_memory, peak_gib, reset_peak, synchronize, time_steps
from mem_analysis.probes import probe_metrics, probe_noise
from mem_analysis.schedule import alpha_bar_from_scheduler
from mem_analysis.sd import encode_images, encode_prompts, tokenize

# bf16 dense tensor-core peaks from NVIDIA's datasheets (TFLOP/s, without sparsity), by device-name substring.
BF16_PEAK_TFLOPS = [("H100 PCIe", 756.0), ("H100 NVL", 835.0), ("H100", 989.4), ("H200", 989.4),
                    ("A100", 312.0), ("L40S", 362.0)]
# bf16 keeps 8 significant bits (relative rounding 2^-9 ~ 2e-3 per operation), so through a deep UNet the
# noise predictions e move by about 1e-2 relative. The losses (means of squared errors of order 1) should
# then agree to LOSS_RTOL relative. k reads e through x0hat = (x_t - sqrt(1 - abar_t) e_g) / sqrt(abar_t) with
# e_g = (1 - g) e_0 + g e_c, so an error in e reaches k multiplied by (|g| + |1 - g|) sqrt((1 - abar_t) / abar_t)
# (14 x 13 at g = 7.5, t = 950): k must agree to K_ATOL times that factor (and to K_ATOL where it is below 1).
# Both are stored with the numerics results, so a table of an old results file uses the tolerances it was judged by.
LOSS_RTOL = 2e-2
K_ATOL = 2e-2


@contextlib.contextmanager
def tf32(matmul: bool, cudnn: bool):
    """TF32 for float32 matmuls / convolutions inside the block (diffusers' --allow_tf32 turns on both)."""
    saved = torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32
    torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = matmul, cudnn
    try:
        yield
    finally:
        torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = saved


def synthetic_images(count: int, resolution: int, seed: int) -> list[Image.Image]:
    """Smooth random colour fields (8x8 random RGB grids upscaled bicubically): PNG-friendly stand-ins for photos."""
    rng = np.random.default_rng(seed)
    grids = (rng.random((count, 8, 8, 3)) * 255).astype(np.uint8)
    return [Image.fromarray(grid).resize((resolution, resolution), Image.BICUBIC) for grid in grids]


def release(unet) -> None:
    """Drop gradients (an OOM can leave some) and cached memory."""
    for p in unet.parameters():
        p.grad = None
    free_memory()


@dataclass
class BareLoop:
    """The bare diffusers-style training loop on in-memory images: every step encodes its batch with the VAE
    and the text encoder, then UNet forward and backward, gradient clipping at 1.0 and AdamW (lr 1e-4).
    `amp`: bf16 autocast by default (the GPU); `steps` timed after `warmup`."""

    pipe: object
    pixels: torch.Tensor  # (N, 3, R, R) in [-1, 1]
    captions: list
    device: torch.device
    amp: bool
    steps: int
    warmup: int

    def step_function(self, unet, batch: int, autocast: bool | None = None, channels_last: bool = False,
                      fused: bool = False, attention=None):
        """One step on the next `batch` images; options: bf16 autocast, channels-last activations, fused AdamW,
        an SDPA backend (torch.nn.attention.SDPBackend) for every attention call."""
        pipe, device = self.pipe, self.device
        autocast = self.amp if autocast is None else autocast
        params = [p for p in unet.parameters() if p.requires_grad]
        optimizer = torch.optim.AdamW(params, lr=1e-4, weight_decay=1e-2, **({"fused": True} if fused else {}))
        ids = tokenize(pipe.tokenizer, self.captions).to(device)
        pixels = self.pixels.to(device, pipe.vae.dtype)
        scheduler, position = pipe.scheduler, [0]
        unet_dtype = next(unet.parameters()).dtype
        memory_format = torch.channels_last if channels_last else torch.contiguous_format

        def step():
            index = torch.arange(position[0], position[0] + batch, device=device) % len(pixels)
            position[0] += batch
            with torch.no_grad():
                latents = pipe.vae.encode(pixels[index]).latent_dist.sample() * pipe.vae.config.scaling_factor
                hidden = pipe.text_encoder(ids[index])[0]
            noise = torch.randn_like(latents)
            t = torch.randint(0, scheduler.config.num_train_timesteps, (batch,), device=device)
            noisy = scheduler.add_noise(latents, noise, t).contiguous(memory_format=memory_format)
            if not autocast:
                noisy, hidden = noisy.to(unet_dtype), hidden.to(unet_dtype)
            with attention_backend(attention):  # the backward of attention runs the same backend
                with torch.autocast(device.type, dtype=torch.bfloat16, enabled=autocast):
                    prediction = unet(noisy, t, hidden).sample
                F.mse_loss(prediction.float(), noise.float()).backward()
            torch.nn.utils.clip_grad_norm_(params, 1.0)
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)

        return step

    def measure(self, unet, batch: int, **options) -> dict:
        """images/s (median step), first-step seconds and peak memory at `batch`."""
        step = self.step_function(unet, batch, **options)
        reset_peak(self.device)
        timing = time_steps(step, self.steps, self.warmup, self.device)
        record = dict(batch=batch, steps=self.steps, images_per_s=batch / timing["step_s_median"], **timing,
                      **peak_gib(self.device))
        del step
        release(unet)
        return record

    def largest_batch(self, unet, candidates) -> tuple[int, dict]:
        """The largest candidate batch whose two steps fit in 85% of device memory (the rest is headroom for
        finetune.py's own buffers); every candidate tried, with its peak GiB or 'OOM'."""
        if self.device.type != "cuda":
            return candidates[0], {}  # nothing to probe: CPU memory is not the limit here
        tried = {}
        total = torch.cuda.get_device_properties(self.device).total_memory / 2**30
        for batch in candidates:
            step = None
            try:
                step = self.step_function(unet, batch)
                reset_peak(self.device)
                step()
                step()
                synchronize(self.device)
                tried[batch] = peak_gib(self.device).get("peak_allocated_gib")
                if tried[batch] <= 0.85 * total:
                    return batch, tried
            except (torch.cuda.OutOfMemoryError, RuntimeError) as error:
                if "out of memory" not in str(error).lower() and "ALLOC" not in str(error):
                    raise
                tried[batch] = "OOM"
            finally:
                del step
                release(unet)
        raise RuntimeError(f"no batch size fits: {tried}")


def attention_backend(name: str | None):
    """A context restricting scaled_dot_product_attention to one backend ('flash', 'efficient', 'math'),
    or nothing (PyTorch picks)."""
    if name is None:
        return contextlib.nullcontext()
    from torch.nn.attention import SDPBackend, sdpa_kernel

    return sdpa_kernel({"flash": SDPBackend.FLASH_ATTENTION, "efficient": SDPBackend.EFFICIENT_ATTENTION,
                        "math": SDPBackend.MATH}[name])


def count_flops(fn, math_attention: bool = True) -> int:
    """FLOPs of fn() counted by FlopCounterMode; attention through the math backend (plain matmuls, each
    counted) unless `math_attention` is False (then fused attention kernels count by their registered formulas)."""
    from torch.utils.flop_counter import FlopCounterMode

    with attention_backend("math" if math_attention else None), FlopCounterMode(display=False) as counter:
        fn()
    return counter.get_total_flops()


def unet_flops_per_image(pipe, unet, pixels: torch.Tensor, caption: str, device, amp: bool) -> dict:
    """UNet forward and forward+backward FLOPs for one image (batch 1; FLOPs scale with the batch), and the
    frozen encoders' forward FLOPs (VAE encode + text encode) apart."""
    latents = encode_images(pipe.vae, pixels.to(device))
    hidden = encode_prompts(pipe.tokenizer, pipe.text_encoder, [caption])
    t = torch.tensor([500], device=device)

    def forward():
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=amp):
            return unet(latents, t, hidden).sample

    def forward_backward():
        F.mse_loss(forward().float(), torch.zeros_like(latents, dtype=torch.float32)).backward()

    with torch.no_grad():
        fwd = count_flops(forward)
        fwd_fused_attention = count_flops(forward, math_attention=False)  # cross-check of the count
    fwd_bwd = count_flops(forward_backward)
    release(unet)
    encoders = count_flops(lambda: (encode_images(pipe.vae, pixels.to(device)),
                                    encode_prompts(pipe.tokenizer, pipe.text_encoder, [caption])))
    return dict(unet_forward=fwd, unet_forward_backward=fwd_bwd, backward_over_forward=(fwd_bwd - fwd) / fwd,
                unet_forward_default_attention=fwd_fused_attention, vae_encode_plus_text_encode=encoders,
                note="MFU counts unet_forward_backward only; the frozen encoders' forward is listed apart")


def mfu(flops_per_image: float, images_per_s: float, env: dict) -> dict:
    """Model FLOPs utilization: flops_per_image * images/s over the datasheet and the measured bf16 peaks."""
    achieved = flops_per_image * images_per_s / 1e12
    out = dict(achieved_tflops=achieved)
    if env.get("bf16_peak_tflops"):
        out["mfu_vs_datasheet"] = achieved / env["bf16_peak_tflops"]
    if env.get("matmul_bf16_tflops"):
        out["mfu_vs_measured_matmul"] = achieved / env["matmul_bf16_tflops"]
    return out


def probe_inputs(pipe, pixels: torch.Tensor, captions: list, device, timesteps, guidance_scales, chunk_size: int
                 ) -> dict:
    """probe_metrics inputs as finetune.py builds them: posterior-mean latents, captions, fixed noise."""
    latents = encode_images(pipe.vae, pixels.to(device)).float()
    return dict(latents=latents, cond=encode_prompts(pipe.tokenizer, pipe.text_encoder, captions),
                uncond=encode_prompts(pipe.tokenizer, pipe.text_encoder, [""]), timesteps=timesteps,
                noise=probe_noise(range(len(latents)), timesteps, latents.shape[1:], seed=0),
                alpha_bar=alpha_bar_from_scheduler(pipe.scheduler), guidance_scales=guidance_scales,
                mu=latents.mean(0), chunk_size=chunk_size)


def k_amplification(column: str, timesteps, alpha_bar: torch.Tensor) -> torch.Tensor:
    """(T,) factor by which an error in the noise predictions reaches column k_<..>:
    (|g| + |1 - g|) sqrt((1 - abar_t) / abar_t)."""
    fixed = {"k_cond": 1.0, "k_uncond": 0.0}
    column = column.removesuffix("_uncentred")  # the uncentred k amplifies errors the same way
    g = fixed[column] if column in fixed else float(column.removeprefix("k_cfg_"))
    abar = alpha_bar.double().cpu()[torch.as_tensor(timesteps)]
    return ((abs(g) + abs(1 - g)) * ((1 - abar) / abar).sqrt()).float()


def precision_differences(test: dict, reference: dict, timesteps, alpha_bar: torch.Tensor) -> dict:
    """Per probe column: max |test - ref|, max |test - ref| / |ref|, and for k columns the max of
    |test - ref| / max(1, amplification), the quantity held to K_ATOL."""
    out = {}
    for name, ref in reference.items():
        diff = (test[name] - ref).abs()
        out[name] = dict(max_abs=diff.max().item(), max_rel=(diff / ref.abs().clamp_min(1e-12)).max().item())
        if name.startswith("k_"):
            scale = k_amplification(name, timesteps, alpha_bar).clamp_min(1.0)
            out[name]["max_scaled"] = (diff / scale).max().item()
    return out


def probe_precision_agreement(unet, inputs: dict) -> dict:
    """probe_metrics in bf16 against float32 (TF32 off) on the same inputs: bf16 autocast over the float32
    UNet (full fine-tuning's probes) and a bf16 copy of the UNet (LoRA's probes). Each variant: per-column
    differences, the worst relative loss difference, the worst (raw and amplification-scaled) k difference,
    and whether all values are finite, losses within LOSS_RTOL and scaled k within K_ATOL."""
    device = next(unet.parameters()).device
    with tf32(False, False):
        reference = probe_metrics(unet, **inputs)
    with torch.autocast(device.type, dtype=torch.bfloat16):
        autocast = probe_metrics(unet, **inputs)
    bf16_unet = copy.deepcopy(unet).to(torch.bfloat16)
    bf16_weights = probe_metrics(bf16_unet, **inputs)
    del bf16_unet
    free_memory()
    losses = torch.cat([v.flatten() for k, v in reference.items() if k.startswith("loss")])
    out = dict(loss_rtol=LOSS_RTOL, k_atol=K_ATOL, reference="float32, TF32 off",
               samples=len(inputs["latents"]), timesteps=list(inputs["timesteps"]),
               reference_loss_range=[losses.min().item(), losses.max().item()])
    for name, result in (("bf16_autocast", autocast), ("bf16_weights", bf16_weights)):
        columns = precision_differences(result, reference, inputs["timesteps"], inputs["alpha_bar"])
        loss_rel = max(v["max_rel"] for k, v in columns.items() if k.startswith("loss"))
        k_abs = max(v["max_abs"] for k, v in columns.items() if k.startswith("k_"))
        k_scaled = max(v["max_scaled"] for k, v in columns.items() if k.startswith("k_"))
        finite = all(torch.isfinite(v).all() for v in result.values())
        out[name] = dict(columns=columns, max_loss_rel=loss_rel, max_k_abs=k_abs, max_k_scaled=k_scaled,
                         within_tolerance=bool(finite and loss_rel <= LOSS_RTOL and k_scaled <= K_ATOL))
    return out
