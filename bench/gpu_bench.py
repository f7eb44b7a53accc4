"""Every GPU measurement of issue 7, on the sd15-shape architecture at 512 px, in one process.

    python bench/gpu_bench.py [--budget_s 360]                      # on the GPU (bench/gpu_check.sh runs it)
    python bench/gpu_bench.py --device cpu --preset tiny --smoke    # the same code paths on CPU, tiny sizes
    python bench/gpu_bench.py --device cpu --dry_run                # sd15-shape model + data, finetune.py --dry_run

Sections run in order of importance; one whose estimated cost no longer fits in --budget_s is
skipped, and one that fails is recorded with its error while the others go on. The JSON is
rewritten after every section (bench/results/<card>-<date>.json, and $OUT/ when set), so a run
cut short keeps what it measured. All figures are measured here, side by side in one run:
- bare loop (VAE encode, text encode, UNet fwd+bwd under bf16 autocast, clipping, AdamW), at the
  largest batch that fits with headroom (probed), full and LoRA: images/s and peak GiB;
- finetune.py on the same model, data and batch (subprocess, bench/gpu_finetune_run.py): its
  steady-state images/s and peak GiB, and the ratio to the bare loop;
- UNet fwd+bwd FLOPs per image counted by torch.utils.flop_counter.FlopCounterMode on one step
  (attention through the math backend, so every product is counted) -> model FLOPs utilization
  against the card's bf16 dense peak and against a measured 8192^3 bf16 matmul;
- probe cost: one finetune.py probe pass (probe_metrics at its default grid) as a share of training
  time at the default --probe_steps;
- evaluation: trajectory capture + M1-M6 (bench/bench_analysis.py) vs the plain StableDiffusionPipeline;
- numerics: probe_metrics in bf16 (autocast, as full fine-tuning runs it; bf16 weights, as LoRA
  does) against float32 on the same inputs, with stated tolerances;
- speed-ups: channels-last, SDPA vs the classic attention processor, TF32 on the float32 path,
  torch.compile (compile time = first step - steady step);
- one single-process DeepSpeed ZeRO-2 finetune.py run when deepspeed imports.
"""
from __future__ import annotations

import argparse
import contextlib
import copy
import datetime
import json
import os
import platform
import re
import shutil
import subprocess
import sys
import tempfile
import time
import traceback
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image

from bench.gpu_table import table
from bench.timing import free_memory, peak_gib, reset_peak, synchronize, time_steps
from mem_analysis.io import write_text_atomic
from mem_analysis.presets import PRESETS, build_pipeline
from mem_analysis.probes import probe_metrics, probe_noise
from mem_analysis.schedule import alpha_bar_from_scheduler
from mem_analysis.sd import encode_images, encode_prompts, tokenize

ROOT = Path(__file__).resolve().parents[1]

# bf16 dense tensor-core peaks from NVIDIA's datasheets (TFLOP/s, without sparsity), by device-name substring.
BF16_PEAK_TFLOPS = [("H100 PCIe", 756.0), ("H100 NVL", 835.0), ("H100", 989.4), ("H200", 989.4),
                    ("A100", 312.0), ("L40S", 362.0)]
# bf16 keeps 8 significant bits (relative rounding 2^-9 ~ 2e-3 per operation), so through a deep UNet the
# noise predictions e move by about 1e-2 relative. The losses (means of squared errors of order 1) should
# then agree to LOSS_RTOL relative. k reads e through x0hat = (x_t - sqrt(1 - abar_t) e_g) / sqrt(abar_t) with
# e_g = (1 - g) e_0 + g e_c, so an error in e reaches k multiplied by (|g| + |1 - g|) sqrt((1 - abar_t) / abar_t)
# (14 x 13 at g = 7.5, t = 950): k must agree to K_ATOL times that factor (and to K_ATOL where it is below 1).
LOSS_RTOL = 2e-2
K_ATOL = 2e-2

SIZES = {  # per-run settings: the GPU run, and the CPU smoke run that exercises the same code paths
    "gpu": dict(batch_sizes=(96, 64, 48, 32, 24, 16, 8), steps=8, warmup=2, small_batch=4, images=256,
                finetune_steps=16, finetune_warmup=3, finetune_timeout_s=240, workers=6, numerics_samples=4,
                eval_prompts=4, eval_seeds=4, eval_steps=50, eval_batch=16, matmul=8192, compile_backend="inductor"),
    "smoke": dict(batch_sizes=(4,), steps=1, warmup=1, small_batch=2, images=24,
                  finetune_steps=3, finetune_warmup=1, finetune_timeout_s=300, workers=0, numerics_samples=2,
                  eval_prompts=3, eval_seeds=2, eval_steps=10, eval_batch=4, matmul=128, compile_backend="eager"),
}


@dataclass
class Context:
    """What the sections share: settings, device, the model in memory, its folder, the data, the results."""

    args: argparse.Namespace
    sizes: dict
    device: torch.device
    work: Path
    results: dict
    pipe: object = None
    model_dir: Path | None = None
    data_dir: Path | None = None
    images: list = field(default_factory=list)  # the synthetic training images (PIL)
    pixels: torch.Tensor | None = None  # (N, 3, R, R) in [-1, 1], the training images as finetune.py reads them
    captions: list = field(default_factory=list)
    batch: int | None = None

    @property
    def amp(self) -> bool:
        """bf16 autocast for training and probes: on the GPU (CPU bf16 is emulated and would only measure that)."""
        return self.device.type == "cuda"


    def result(self, name: str) -> dict:
        """The record of an earlier section that succeeded (empty otherwise); a section reads those it needs."""
        return self.results["sections"].get(name, {}) if self.results["status"].get(name) == "ok" else {}


class Skip(Exception):
    """A section that does not apply here (recorded as 'skipped: reason')."""


# ----------------------------------------------------------------------------------------------- helpers
@contextlib.contextmanager
def tf32(matmul: bool, cudnn: bool):
    """TF32 for float32 matmuls / convolutions inside the block (diffusers' --allow_tf32 turns on both)."""
    saved = torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32
    torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = matmul, cudnn
    try:
        yield
    finally:
        torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = saved


@contextlib.contextmanager
def off_device(ctx: Context):
    """The in-memory pipeline parked on the CPU, so that a finetune.py subprocess has the whole device."""
    if ctx.device.type != "cuda" or ctx.pipe is None:
        yield
        return
    ctx.pipe.to("cpu")
    free_memory()
    try:
        yield
    finally:
        ctx.pipe.to(ctx.device)


def synthetic_images(count: int, resolution: int, seed: int) -> list[Image.Image]:
    """Smooth random colour fields (8x8 random RGB grids upscaled bicubically): PNG-friendly stand-ins for photos."""
    rng = np.random.default_rng(seed)
    grids = (rng.random((count, 8, 8, 3)) * 255).astype(np.uint8)
    return [Image.fromarray(grid).resize((resolution, resolution), Image.BICUBIC) for grid in grids]


# ------------------------------------------------------------------------------------------ bare loop
def make_train_step(ctx: Context, unet, batch: int, autocast: bool | None = None, channels_last: bool = False):
    """One bare training step on the next `batch` training images: VAE encode, text encode,
    UNet fwd+bwd (bf16 autocast unless `autocast` is False; default ctx.amp), gradient clipping at 1.0,
    AdamW (lr 1e-4)."""
    pipe, device = ctx.pipe, ctx.device
    autocast = ctx.amp if autocast is None else autocast
    params = [p for p in unet.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=1e-4, weight_decay=1e-2)
    ids = tokenize(pipe.tokenizer, ctx.captions).to(device)
    pixels = ctx.pixels.to(device, pipe.vae.dtype)
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
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=autocast):
            prediction = unet(noisy, t, hidden).sample
        loss = F.mse_loss(prediction.float(), noise.float())
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    return step


def release(unet) -> None:
    """Drop gradients (an OOM can leave some) and cached memory."""
    for p in unet.parameters():
        p.grad = None
    free_memory()


def measure_training(ctx: Context, unet, batch: int, steps: int | None = None, **step_options) -> dict:
    """images/s (median step), first-step seconds and peak memory of the bare loop at `batch`."""
    step = make_train_step(ctx, unet, batch, **step_options)
    reset_peak(ctx.device)
    timing = time_steps(step, steps or ctx.sizes["steps"], ctx.sizes["warmup"], ctx.device)
    record = dict(batch=batch, images_per_s=batch / timing["step_s_median"], **timing, **peak_gib(ctx.device))
    del step
    release(unet)
    return record


def largest_batch(ctx: Context, unet) -> tuple[int, dict]:
    """The largest candidate batch whose two bare steps fit in 85% of device memory (the rest is headroom
    for finetune.py's own buffers); every candidate tried, with its peak GiB or 'OOM'."""
    if ctx.device.type != "cuda":
        return ctx.sizes["batch_sizes"][0], {}  # nothing to probe: CPU memory is not the limit here
    tried = {}
    total = torch.cuda.get_device_properties(ctx.device).total_memory / 2**30
    for batch in ctx.sizes["batch_sizes"]:
        step = None
        try:
            step = make_train_step(ctx, unet, batch)
            reset_peak(ctx.device)
            step()
            step()
            synchronize(ctx.device)
            peak = peak_gib(ctx.device).get("peak_allocated_gib")
            tried[batch] = peak
            if peak <= 0.85 * total:
                return batch, tried
        except (torch.cuda.OutOfMemoryError, RuntimeError) as error:
            if "out of memory" not in str(error).lower() and "ALLOC" not in str(error):
                raise
            tried[batch] = "OOM"
        finally:
            del step
            release(unet)
    raise RuntimeError(f"no batch size fits: {tried}")


def count_flops(fn, math_attention: bool = True) -> int:
    """FLOPs of fn() counted by FlopCounterMode; attention through the math backend (plain matmuls, each
    counted) unless `math_attention` is False (then fused attention kernels count by their registered formulas)."""
    from torch.nn.attention import SDPBackend, sdpa_kernel
    from torch.utils.flop_counter import FlopCounterMode

    backend = sdpa_kernel(SDPBackend.MATH) if math_attention else contextlib.nullcontext()
    with backend, FlopCounterMode(display=False) as counter:
        fn()
    return counter.get_total_flops()


def unet_flops_per_image(ctx: Context, unet) -> dict:
    """UNet forward and forward+backward FLOPs for one 512 px image (batch 1; FLOPs scale with the batch)."""
    pipe, device = ctx.pipe, ctx.device
    latents = encode_images(pipe.vae, ctx.pixels[:1].to(device))
    hidden = encode_prompts(pipe.tokenizer, pipe.text_encoder, ctx.captions[:1])
    t = torch.tensor([500], device=device)

    def forward():
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=ctx.amp):
            return unet(latents, t, hidden).sample

    def forward_backward():
        F.mse_loss(forward().float(), torch.zeros_like(latents, dtype=torch.float32)).backward()

    with torch.no_grad():
        fwd = count_flops(forward)
        fwd_fused_attention = count_flops(forward, math_attention=False)  # cross-check of the count
    fwd_bwd = count_flops(forward_backward)
    release(unet)
    encoders = count_flops(lambda: (encode_images(pipe.vae, ctx.pixels[:1].to(device)),
                                    encode_prompts(pipe.tokenizer, pipe.text_encoder, ctx.captions[:1])))
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


# ------------------------------------------------------------------------------------------- finetune.py
def finetune_flags(ctx: Context, output_dir: Path, steps: int, extra=()) -> list[str]:
    """finetune.py flags for a throughput run: probes, checkpoints and validation off, the bare loop's batch."""
    precision = "bf16" if ctx.device.type == "cuda" else "no"
    return ["--pretrained_model_name_or_path", str(ctx.model_dir), "--train_data_dir", str(ctx.data_dir),
            "--output_dir", str(output_dir), "--train_batch_size", str(ctx.batch), "--max_train_steps", str(steps),
            "--checkpointing_steps", "0", "--probe_steps", "0", "--validation_steps", "0",
            "--mixed_precision", precision, "--dataloader_num_workers", str(ctx.sizes["workers"]),
            "--learning_rate", "1e-4", "--seed", "0", *extra]  # gpu_finetune_run.py adds --logging_steps 1


def run_finetune(ctx: Context, name: str, extra=(), launcher=None, dry_run: bool = False) -> dict:
    """One finetune.py run in a fresh process (bench/gpu_finetune_run.py); its JSON record, run folder removed."""
    if ctx.data_dir is None or ctx.batch is None:
        raise Skip("needs the study dataset and the batch size (sections dataset and bare_full)")
    result, output_dir, log = ctx.work / f"{name}.json", ctx.work / f"run-{name}", ctx.work / f"{name}.log"
    flags = finetune_flags(ctx, output_dir, ctx.sizes["finetune_steps"], extra) + (["--dry_run"] if dry_run else [])
    command = [*(launcher or [sys.executable]), str(ROOT / "bench" / "gpu_finetune_run.py"), "--result", str(result),
               "--warmup", str(ctx.sizes["finetune_warmup"]), "--", *flags]
    environment = dict(os.environ, PYTHONPATH=os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")]))
    with off_device(ctx), open(log, "w") as handle:
        started = time.perf_counter()
        status = subprocess.run(command, stdout=handle, stderr=subprocess.STDOUT, env=environment, cwd=ROOT,
                                timeout=ctx.sizes["finetune_timeout_s"]).returncode
        wall = time.perf_counter() - started
    shutil.rmtree(output_dir, ignore_errors=True)
    if status != 0:
        tail = log.read_text().strip().splitlines()[-15:]
        raise RuntimeError(f"{name}: exit {status}; last lines of its log:\n" + "\n".join(tail))
    if dry_run:
        return dict(dry_run=[line for line in log.read_text().splitlines() if line.startswith("[dry run]")],
                    process_wall_s=wall)
    return dict(json.loads(result.read_text()), process_wall_s=wall, flags=" ".join(extra))


def finetune_has(flag: str) -> bool:
    """Whether train/finetune.py has this flag (--channels_last and --torch_compile came later)."""
    from train.finetune_config import FLAGS

    return flag in FLAGS


# ------------------------------------------------------------------------------------------- numerics
def probe_inputs(ctx: Context, samples: int) -> dict:
    """probe_metrics inputs as finetune.py builds them: posterior-mean latents, captions, fixed noise."""
    from train.finetune_config import FLAGS

    pipe = ctx.pipe
    latents = encode_images(pipe.vae, ctx.pixels[:samples].to(ctx.device)).float()
    timesteps = FLAGS["probe_timesteps"][0]
    return dict(latents=latents, cond=encode_prompts(pipe.tokenizer, pipe.text_encoder, ctx.captions[:samples]),
                uncond=encode_prompts(pipe.tokenizer, pipe.text_encoder, [""]), timesteps=timesteps,
                noise=probe_noise(range(samples), timesteps, latents.shape[1:], seed=0),
                alpha_bar=alpha_bar_from_scheduler(pipe.scheduler), guidance_scales=FLAGS["probe_guidance_scales"][0],
                mu=latents.mean(0), chunk_size=FLAGS["probe_batch_size"][0])


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


# -------------------------------------------------------------------------------------------- sections
def section_env(ctx: Context) -> dict:
    """Card, versions, datasheet bf16 peak and a measured bf16 matmul rate (median of 10 after 3 warm-ups)."""
    import accelerate
    import diffusers
    import transformers

    env = dict(torch=torch.__version__, diffusers=diffusers.__version__, transformers=transformers.__version__,
               accelerate=accelerate.__version__, python=platform.python_version(), device=str(ctx.device))
    try:
        import peft
        env["peft"] = peft.__version__
    except ImportError:
        env["peft"] = None
    if ctx.device.type == "cuda":
        props = torch.cuda.get_device_properties(ctx.device)
        env.update(card=props.name, memory_gib=props.total_memory / 2**30, multiprocessors=props.multi_processor_count,
                   capability=f"{props.major}.{props.minor}", cuda=torch.version.cuda,
                   bf16_peak_tflops=next((peak for key, peak in BF16_PEAK_TFLOPS if key in props.name), None))
    else:
        env.update(card=f"cpu-{platform.machine()}", threads=torch.get_num_threads(), bf16_peak_tflops=None)
    n = ctx.sizes["matmul"] if ctx.device.type == "cuda" else min(ctx.sizes["matmul"], 512)
    a, b = (torch.randn(n, n, device=ctx.device, dtype=torch.bfloat16) for _ in range(2))
    timing = time_steps(lambda: a @ b, 10, 3, ctx.device)
    env["matmul_bf16_tflops"] = 2 * n**3 / timing["step_s_median"] / 1e12
    env["matmul_size"] = n
    return env


def section_setup(ctx: Context) -> dict:
    """Build the preset on the device, save it as a pipeline folder, and make the synthetic training images."""
    from diffusers import DDPMScheduler

    resolution = PRESETS[ctx.args.preset]["resolution"]
    started = time.perf_counter()
    with torch.device(ctx.device):  # random init on the GPU: seconds instead of a minute on the CPU
        pipe = build_pipeline(ctx.args.preset, seed=0)
    pipe.scheduler = DDPMScheduler.from_config(pipe.scheduler.config)  # its tables on the CPU, as when loaded
    built = time.perf_counter() - started
    pipe.set_progress_bar_config(disable=True)
    ctx.model_dir = ctx.work / "model"
    pipe.to("cpu").save_pretrained(ctx.model_dir, safe_serialization=True)
    pipe.to(ctx.device)
    saved = time.perf_counter() - started - built
    pipe.vae.to(dtype=torch.bfloat16 if ctx.device.type == "cuda" else torch.float32)
    pipe.text_encoder.to(dtype=pipe.vae.dtype)
    pipe.vae.requires_grad_(False)
    pipe.text_encoder.requires_grad_(False)
    ctx.pipe = pipe

    ctx.images = synthetic_images(ctx.sizes["images"], resolution, seed=0)
    ctx.captions = [f"a smooth colour field, number {i}" for i in range(len(ctx.images))]
    ctx.pixels = torch.stack([torch.from_numpy(np.array(im)).permute(2, 0, 1).float() / 127.5 - 1
                              for im in ctx.images])
    unet_params = sum(p.numel() for p in pipe.unet.parameters())
    return dict(preset=ctx.args.preset, resolution=resolution, unet_params=unet_params, build_s=built,
                save_s=saved, images=len(ctx.images),
                latent_shape=list(encode_images(pipe.vae, ctx.pixels[:1].to(ctx.device)).shape[1:]))


def section_dataset(ctx: Context) -> dict:
    """The synthetic images as an image folder, then a study dataset built from it by build_duplicated_dataset.py."""
    from data_scripts import build_duplicated_dataset

    source = ctx.work / "images"
    source.mkdir(exist_ok=True)
    with open(source / "metadata.jsonl", "w") as handle:
        for i, (image, caption) in enumerate(zip(ctx.images, ctx.captions)):
            image.save(source / f"{i:04d}.png")
            handle.write(json.dumps({"file_name": f"{i:04d}.png", "text": caption}) + "\n")
    data_dir = ctx.work / "data"
    build_duplicated_dataset.main(["--source", str(source), "--output_dir", str(data_dir), "--resolution",
                                   str(ctx.images[0].size[0]), "--dup_factors", "1,4", "--samples_per_factor", "4",
                                   "--seed", "0"])
    ctx.data_dir = data_dir
    manifest = json.loads((data_dir / "manifest.json").read_text())
    return dict(folder_mib=sum(f.stat().st_size for f in data_dir.rglob("*") if f.is_file()) / 2**20,
                manifest_keys=sorted(manifest))


def section_bare_full(ctx: Context) -> dict:
    """The largest batch that fits, then the bare full fine-tuning loop's images/s and peak memory there."""
    batch, tried = largest_batch(ctx, ctx.pipe.unet)
    ctx.batch = batch
    return dict(batch_probe={str(b): v for b, v in tried.items()}, **measure_training(ctx, ctx.pipe.unet, batch))


def section_flops(ctx: Context) -> dict:
    """UNet FLOPs per image (full fine-tuning) and the bare loop's MFU."""
    flops = unet_flops_per_image(ctx, ctx.pipe.unet)
    out = dict(per_image=flops)
    bare = ctx.result("bare_full")
    if "images_per_s" in bare:
        out["bare_full_mfu"] = mfu(flops["unet_forward_backward"], bare["images_per_s"], ctx.result("env"))
    return out


def section_finetune_full(ctx: Context) -> dict:
    """finetune.py full fine-tuning at the bare loop's batch; ratio of its images/s to the bare loop's."""
    record = run_finetune(ctx, "finetune_full")
    record["ratio_to_bare"] = record["images_per_s"] / ctx.result("bare_full")["images_per_s"]
    if "per_image" in ctx.result("flops"):
        record["mfu"] = mfu(ctx.result("flops")["per_image"]["unet_forward_backward"], record["images_per_s"],
                            ctx.result("env"))
    return record


def section_lora(ctx: Context) -> dict:
    """LoRA (r=4 on the attention projections, as finetune.py adds it): bare loop and FLOPs."""
    from diffusers import UNet2DConditionModel
    from train.finetune_state import add_lora

    unet = UNet2DConditionModel.from_pretrained(ctx.model_dir, subfolder="unet").to(ctx.device)
    add_lora(unet, rank=4, weight_dtype=torch.bfloat16 if ctx.device.type == "cuda" else torch.float32)
    trainable = sum(p.numel() for p in unet.parameters() if p.requires_grad)
    bare = measure_training(ctx, unet, ctx.batch)
    flops = unet_flops_per_image(ctx, unet)
    del unet
    free_memory()
    return dict(trainable_params=trainable, flops_per_image=flops,
                bare=dict(bare, mfu=mfu(flops["unet_forward_backward"], bare["images_per_s"],
                                        ctx.result("env"))))


def section_finetune_lora(ctx: Context) -> dict:
    """finetune.py --use_lora at the same batch; ratio to the bare LoRA loop."""
    record = run_finetune(ctx, "finetune_lora", extra=["--use_lora", "--rank", "4"])
    lora = ctx.result("lora")
    if "bare" in lora:
        record["ratio_to_bare"] = record["images_per_s"] / lora["bare"]["images_per_s"]
        record["mfu"] = mfu(lora["flops_per_image"]["unet_forward_backward"], record["images_per_s"],
                            ctx.result("env"))
    return record


def section_probe_cost(ctx: Context) -> dict:
    """One probe pass as finetune.py runs it (bf16 autocast, default grid and guidance scales, all probe
    samples of the dataset) against training time at the default --probe_steps."""
    from train.finetune_config import FLAGS
    from mem_analysis.data import load_study_dataset

    samples = len(load_study_dataset(ctx.data_dir)["probe"]) if ctx.data_dir else 8
    inputs = probe_inputs(ctx, samples)

    def probe():
        with torch.autocast(ctx.device.type, dtype=torch.bfloat16, enabled=ctx.amp):
            probe_metrics(ctx.pipe.unet, **inputs)

    timing = time_steps(probe, 3, 1, ctx.device)
    step = (ctx.result("finetune_full") or ctx.result("bare_full"))["step_s_median"]
    interval = FLAGS["probe_steps"][0]
    pass_s = timing["step_s_median"]
    return dict(probe_samples=samples, timesteps=len(inputs["timesteps"]), guidance_scales=inputs["guidance_scales"],
                unet_evaluations=2 * samples * len(inputs["timesteps"]), pass_s=pass_s,
                training_steps_per_pass=pass_s / step, default_probe_steps=interval,
                share_of_training_time=pass_s / (pass_s + interval * step))


def section_numerics(ctx: Context) -> dict:
    """bf16 vs float32 probe_metrics on the same inputs (see probe_precision_agreement)."""
    return probe_precision_agreement(ctx.pipe.unet, probe_inputs(ctx, ctx.sizes["numerics_samples"]))


def section_eval(ctx: Context) -> dict:
    """Trajectory capture + M1-M6 (bench_analysis.analysis) vs the plain pipeline, bf16, best of 2 alternations."""
    from bench.bench_analysis import analysis, plain_pipeline, synthetic_probe_set
    from bench.timing import timed
    from diffusers import DDIMScheduler, StableDiffusionPipeline
    from mem_analysis.sd import SDComponents

    s = ctx.sizes
    dtype = torch.bfloat16 if ctx.device.type == "cuda" else torch.float32
    pipe = StableDiffusionPipeline.from_pretrained(ctx.model_dir, torch_dtype=dtype, safety_checker=None,
                                                   requires_safety_checker=False).to(ctx.device)
    pipe.scheduler = DDIMScheduler.from_config(pipe.scheduler.config)
    pipe.set_progress_bar_config(disable=True)
    components = SDComponents(pipe.unet, pipe.vae, pipe.text_encoder, pipe.tokenizer,
                              DDIMScheduler.from_config(pipe.scheduler.config), pipe.scheduler)
    prompts = ctx.captions[:s["eval_prompts"]]
    seeds = list(range(1000, 1000 + s["eval_seeds"]))
    pool = (ctx.pixels[:4 * len(prompts)] + 1) / 2
    train_pixels = pool[:len(prompts)]
    train_latents = encode_images(pipe.vae, train_pixels * 2 - 1).float().cpu()
    settings = argparse.Namespace(steps=s["eval_steps"], batch_size=s["eval_batch"], probe_timesteps=10)
    probe = synthetic_probe_set(components, prompts, train_pixels, train_latents, pool)
    plain_times, ours_times = [], []
    for _ in range(2):
        t_ours, (traj, _, _) = timed(lambda: analysis(components, probe, seeds, settings))
        t_plain, images = timed(lambda: plain_pipeline(pipe, prompts, traj.x_T.to(dtype), s["eval_steps"],
                                                       s["eval_batch"]))
        ours_times.append(t_ours)
        plain_times.append(t_plain)
    del pipe, components
    free_memory()
    n_images = len(prompts) * len(seeds)
    ours, plain = min(ours_times), min(plain_times)
    return dict(prompts=len(prompts), seeds=len(seeds), ddim_steps=s["eval_steps"], batch=s["eval_batch"],
                dtype=str(dtype), plain_s=plain, analysis_s=ours, plain_images_per_s=n_images / plain,
                analysis_images_per_s=n_images / ours, ratio_analysis_to_plain=ours / plain,
                max_image_difference=(images - traj.images).abs().max().item(), plain_runs_s=plain_times,
                analysis_runs_s=ours_times)


def section_speedups(ctx: Context) -> dict:
    """Each speed-up against its own baseline in this run: channels-last (bf16, the chosen batch),
    SDPA vs the classic attention processor (bf16, a small batch: the classic one stores every
    attention matrix), TF32 on the float32 path (small batch)."""
    from diffusers.models.attention_processor import AttnProcessor

    unet, small = ctx.pipe.unet, ctx.sizes["small_batch"]
    out = {}
    baseline = measure_training(ctx, unet, ctx.batch)
    unet.to(memory_format=torch.channels_last)
    try:
        last = measure_training(ctx, unet, ctx.batch, channels_last=True)
    finally:
        unet.to(memory_format=torch.contiguous_format)
    out["channels_last"] = dict(batch=ctx.batch, baseline_images_per_s=baseline["images_per_s"],
                                images_per_s=last["images_per_s"],
                                speedup=last["images_per_s"] / baseline["images_per_s"],
                                baseline_peak=baseline.get("peak_allocated_gib"), peak=last.get("peak_allocated_gib"))

    default = unet.attn_processors
    names = sorted({type(p).__name__ for p in default.values()})
    sdpa = measure_training(ctx, unet, small)
    unet.set_attn_processor(AttnProcessor())
    try:
        classic = measure_training(ctx, unet, small)
    finally:
        unet.set_attn_processor(default)
    out["attention"] = dict(batch=small, default_processors=names, sdpa_images_per_s=sdpa["images_per_s"],
                            classic_images_per_s=classic["images_per_s"],
                            speedup=sdpa["images_per_s"] / classic["images_per_s"],
                            sdpa_peak=sdpa.get("peak_allocated_gib"), classic_peak=classic.get("peak_allocated_gib"))

    fp32 = {}
    for name, (matmul, cudnn) in (("strict_fp32", (False, False)), ("torch_default", (False, True)),
                                  ("allow_tf32", (True, True))):
        with tf32(matmul, cudnn):
            fp32[name] = measure_training(ctx, unet, small, autocast=False)["images_per_s"]
    out["tf32_float32_path"] = dict(batch=small, images_per_s=fp32,
                                    speedup_allow_tf32_vs_strict=fp32["allow_tf32"] / fp32["strict_fp32"],
                                    speedup_allow_tf32_vs_torch_default=fp32["allow_tf32"] / fp32["torch_default"],
                                    bf16_autocast_images_per_s=sdpa["images_per_s"])
    return out


def section_compile(ctx: Context) -> dict:
    """torch.compile of the UNet (module.compile, as finetune.py --torch_compile), bare loop at the chosen batch."""
    unet = ctx.pipe.unet
    speedups = ctx.result("speedups")
    baseline = ({"images_per_s": speedups["channels_last"]["baseline_images_per_s"],
                 "peak_allocated_gib": speedups["channels_last"]["baseline_peak"]}
                if "channels_last" in speedups else measure_training(ctx, unet, ctx.batch))
    unet.compile(backend=ctx.sizes["compile_backend"])
    try:
        compiled = measure_training(ctx, unet, ctx.batch)
    finally:
        unet._compiled_call_impl = None  # back to eager for anything after this section
    return dict(backend=ctx.sizes["compile_backend"], batch=ctx.batch, eager_images_per_s=baseline["images_per_s"],
                compiled_images_per_s=compiled["images_per_s"],
                speedup=compiled["images_per_s"] / baseline["images_per_s"],
                compile_s=compiled["first_step_s"] - compiled["step_s_median"],
                eager_peak=baseline.get("peak_allocated_gib"), compiled_peak=compiled.get("peak_allocated_gib"))


def section_zero2(ctx: Context) -> dict:
    """finetune.py under DeepSpeed ZeRO-2 with one process (accelerate launch), against the plain run."""
    try:
        import deepspeed
    except Exception as error:  # noqa: BLE001 - any import failure means: not available here
        raise Skip(f"deepspeed does not import ({type(error).__name__}: {error})") from None
    precision = "bf16" if ctx.device.type == "cuda" else "no"
    launcher = [sys.executable, "-m", "accelerate.commands.launch", "--config_file",
                str(ROOT / "configs" / "accelerate" / "deepspeed_zero2.yaml"), "--num_processes", "1",
                "--mixed_precision", precision]
    record = run_finetune(ctx, "finetune_zero2", launcher=launcher)
    record["deepspeed"] = deepspeed.__version__
    plain = ctx.result("finetune_full")
    if "images_per_s" in plain:
        record["ratio_to_plain_finetune"] = record["images_per_s"] / plain["images_per_s"]
    return record


def section_finetune_compile(ctx: Context) -> dict:
    """finetune.py --torch_compile (when the flag exists): steady images/s and first-step (compile) seconds."""
    if not finetune_has("torch_compile"):
        raise Skip("train/finetune.py has no --torch_compile flag")
    record = run_finetune(ctx, "finetune_compile", extra=["--torch_compile"])
    plain = ctx.result("finetune_full")
    if "images_per_s" in plain:
        record["speedup_vs_eager"] = record["images_per_s"] / plain["images_per_s"]
        record["compile_s"] = record["first_step_s"] - plain["first_step_s"]
    return record


# ------------------------------------------------------------------------------------------------ driver
@dataclass(frozen=True)
class Section:
    """One measurement: its function, its estimated seconds on an H100 (a section that would end after
    --budget_s is skipped) and the sections it needs (run before it; it is skipped when one did not succeed)."""

    name: str
    run: Callable[[Context], dict]
    seconds: float
    needs: tuple[str, ...] = ()


# In running order. env, setup and dataset always run (CORE).
SECTIONS = [
    Section("env", section_env, 5),
    Section("setup", section_setup, 15, ("env",)),
    Section("dataset", section_dataset, 10, ("setup",)),
    Section("bare_full", section_bare_full, 30, ("setup",)),
    Section("flops", section_flops, 10, ("env", "setup")),
    Section("finetune_full", section_finetune_full, 45, ("env", "dataset", "bare_full")),
    Section("lora", section_lora, 25, ("env", "bare_full")),
    Section("finetune_lora", section_finetune_lora, 40, ("env", "dataset", "bare_full")),
    Section("probe_cost", section_probe_cost, 8, ("dataset", "bare_full")),
    Section("numerics", section_numerics, 10, ("setup",)),
    Section("eval", section_eval, 25, ("setup",)),
    Section("speedups", section_speedups, 35, ("bare_full",)),
    Section("compile", section_compile, 100, ("bare_full",)),
    Section("zero2", section_zero2, 60, ("dataset", "bare_full")),
    Section("finetune_compile", section_finetune_compile, 120, ("dataset", "bare_full")),
]
CORE = ("env", "setup", "dataset")


def with_needs(names) -> set[str]:
    """The named sections and, recursively, those they need (SystemExit on an unknown name)."""
    by_name, chosen, todo = {section.name: section for section in SECTIONS}, set(), list(names)
    while todo:
        name = todo.pop()
        if name not in by_name:
            raise SystemExit(f"gpu_bench.py: error: unknown section {name!r}; choose from {', '.join(by_name)}")
        if name not in chosen:
            chosen.add(name)
            todo.extend(by_name[name].needs)
    return chosen


def result_name(env: dict) -> str:
    """<card>-<UTC date>, lower case, letters, digits and '-' only."""
    card = re.sub(r"[^a-z0-9]+", "-", env.get("card", "unknown").lower()).strip("-")
    return f"{card}-{datetime.datetime.now(datetime.timezone.utc):%Y-%m-%d}"


def write_results(ctx: Context) -> list[Path]:
    """The results JSON, written atomically to every destination."""
    name = result_name(ctx.result("env")) + ".json"
    destinations = [Path(p) for p in ctx.args.json] if ctx.args.json else [ROOT / "bench" / "results" / name]
    if os.environ.get("OUT") and not ctx.args.json:
        destinations.append(Path(os.environ["OUT"]) / name)
    text = json.dumps(ctx.results, indent=1, default=str)
    for path in destinations:
        write_text_atomic(path, text)
    return destinations


def parse_args(argv=None) -> argparse.Namespace:
    """Command-line settings."""
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", default="cuda")
    parser.add_argument("--preset", default="sd15-shape", choices=sorted(PRESETS))
    parser.add_argument("--smoke", action="store_true", help="tiny sizes (CPU check of every code path)")
    parser.add_argument("--dry_run", action="store_true",
                        help="only build the model and data, then run finetune.py --dry_run with the bench's flags")
    parser.add_argument("--budget_s", type=float, default=360.0, help="skip sections that would end after this")
    parser.add_argument("--only", default=None, help="comma list of sections to run (env and setup always run)")
    parser.add_argument("--json", action="append", default=None,
                        help="write the results here (repeatable; default bench/results/<card>-<date>.json + $OUT/)")
    parser.add_argument("--work_dir", default=None, help="scratch folder (default: a temporary one, removed)")
    parser.add_argument("--extra", default=None, help="JSON file whose object is stored under 'extra' (e.g. pytest)")
    parser.add_argument("--table_of", default=None, help="only print the table of this results JSON")
    return parser.parse_args(argv)


def main(argv=None) -> int:
    args = parse_args(argv)
    if args.table_of:
        print(table(json.loads(Path(args.table_of).read_text())))
        return 0
    device = torch.device(args.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise SystemExit("gpu_bench.py: error: --device cuda but torch sees no CUDA GPU; use --device cpu --smoke")
    torch.backends.cuda.matmul.allow_tf32 = False  # PyTorch's default; sections that measure TF32 set it themselves
    threads = torch.get_num_threads()
    if args.smoke:  # code paths, not speed: one thread avoids OpenMP spin-waits on a shared CPU
        torch.set_num_threads(1)
    work = Path(args.work_dir or tempfile.mkdtemp(prefix="gpu_bench_"))
    work.mkdir(parents=True, exist_ok=True)
    results = dict(started_utc=datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
                   command=" ".join(sys.argv), sizes="smoke" if args.smoke else "gpu", budget_s=args.budget_s,
                   status={}, seconds={}, sections={})
    if args.extra and Path(args.extra).is_file():
        results["extra"] = json.loads(Path(args.extra).read_text())
    ctx = Context(args, SIZES["smoke" if args.smoke else "gpu"], device, work, results)
    wanted = None if args.only is None else with_needs([*CORE, *args.only.split(",")])
    if args.dry_run:
        wanted = set(CORE)
    started = time.perf_counter()
    try:
        for section in SECTIONS:
            name, estimate, elapsed = section.name, section.seconds, time.perf_counter() - started
            if wanted is not None and name not in wanted:
                continue
            missing = [need for need in section.needs if results["status"].get(need) != "ok"]
            if missing:
                results["status"][name] = f"skipped: needs {', '.join(missing)}"
                continue
            if name not in CORE and elapsed + estimate > args.budget_s and not args.smoke:
                results["status"][name] = (f"skipped: {elapsed:.0f} s + estimated {estimate} s > "
                                           f"budget {args.budget_s:.0f} s")
                continue
            print(f"[gpu_bench] {name} (at {elapsed:.0f} s)", flush=True)
            section_start = time.perf_counter()
            try:
                results["sections"][name] = section.run(ctx)
                results["status"][name] = "ok"
            except Skip as reason:
                results["status"][name] = f"skipped: {reason}"
            except (Exception, SystemExit) as error:  # noqa: BLE001 - record and go on with the other sections
                traceback.print_exc()
                results["status"][name] = f"failed: {type(error).__name__}: {(str(error).splitlines() or [''])[0][:300]}"
                results["sections"][name] = dict(error=traceback.format_exc(limit=4)[-3000:])
            finally:
                results["seconds"][name] = round(time.perf_counter() - section_start, 2)
                results["total_s"] = round(time.perf_counter() - started, 2)
                free_memory()
                if not args.dry_run:
                    write_results(ctx)
        if args.dry_run and results["status"].get("dataset") == "ok":
            ctx.batch = ctx.sizes["batch_sizes"][-1]
            for name, extra in (("full", []), ("lora", ["--use_lora", "--rank", "4"])):
                for line in run_finetune(ctx, f"dry_{name}", extra=extra, dry_run=True)["dry_run"]:
                    print(f"{name}: {line}")
            return 0
    finally:
        torch.set_num_threads(threads)
        if args.work_dir is None:
            shutil.rmtree(work, ignore_errors=True)
    paths = write_results(ctx)
    print("\n" + table(results))
    print(f"\n[gpu_bench] {results['total_s']:.0f} s; results in {', '.join(str(p) for p in paths)}")
    return 0 if all(v == "ok" or v.startswith("skipped") for v in results["status"].values()) else 1


if __name__ == "__main__":
    sys.exit(main())
