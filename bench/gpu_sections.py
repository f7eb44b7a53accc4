"""The sections of the GPU check (a library of bench/, no main; bench/gpu_bench.py runs them in order).

Each section measures one thing side by side with its baseline in the same run and returns a JSON-able
record; a section reads the records of the sections it needs through `Context.result`. SECTIONS gives the
running order (most important first), each section's estimated seconds on an H100 (the driver skips one that
would end after the budget) and the sections it needs. Timed figures are medians over SIZES' `steps` steps
after `warmup` (20 after 3 on the GPU).
"""
from __future__ import annotations

import argparse
import contextlib
import json
import platform
import shutil
import subprocess
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

from bench.finetune_runs import ROOT, finetune_record
from bench.gpu_measure import (BF16_PEAK_TFLOPS, BareLoop, mfu, probe_inputs, probe_precision_agreement, release,
                               synthetic_images, tf32, unet_flops_per_image)
from bench.timing import free_memory, time_steps, timed
from mem_analysis.presets import PRESETS, build_pipeline
from mem_analysis.probes import probe_metrics
from mem_analysis.sd import encode_images

SIZES = {  # per-run settings: the GPU run, and the CPU smoke run (the dry run) that exercises the same code paths
    "gpu": dict(batch_sizes=(32, 24, 16, 8), steps=20, warmup=3, small_batch=8, images=256, finetune_steps=24,
                finetune_warmup=4, finetune_timeout_s=200, workers=6, numerics_samples=4, eval_prompts=4,
                eval_seeds=4, eval_steps=50, eval_batch=16, matmul=8192, compile_backend="inductor",
                probe_samples=None),
    "smoke": dict(batch_sizes=(4,), steps=1, warmup=1, small_batch=2, images=24, finetune_steps=2,
                  finetune_warmup=1, finetune_timeout_s=300, workers=0, numerics_samples=2, eval_prompts=3,
                  eval_seeds=2, eval_steps=4, eval_batch=4, matmul=128, compile_backend="eager", probe_samples=2),
}
UNCACHED = ["--no-cache_latents", "--no-cache_caption_embeddings"]  # finetune.py encoding every batch


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

    def bare(self) -> BareLoop:
        """The bare diffusers-style loop on this run's model and images."""
        return BareLoop(self.pipe, self.pixels, self.captions, self.device, self.amp, self.sizes["steps"],
                        self.sizes["warmup"])

    def result(self, name: str) -> dict:
        """The record of an earlier section that succeeded (empty otherwise); a section reads those it needs."""
        return self.results["sections"].get(name, {}) if self.results["status"].get(name) == "ok" else {}


class Skip(Exception):
    """A section that does not apply here (recorded as 'skipped: reason')."""


@contextlib.contextmanager
def parked(ctx: Context):
    """The in-memory pipeline moved to the CPU while a finetune.py process has the device."""
    if ctx.device.type != "cuda" or ctx.pipe is None:
        yield
        return
    ctx.pipe.to("cpu")
    free_memory()
    try:
        yield
    finally:
        ctx.pipe.to(ctx.device)


def run_finetune(ctx: Context, name: str, extra=(), launcher=None) -> dict:
    """One finetune.py run in a fresh process at the bare loop's batch, probes, checkpoints and validation off;
    its record (bench.finetune_runs.finetune_record), run folder removed."""
    if ctx.data_dir is None or ctx.batch is None:
        raise Skip("needs the study dataset and the batch size (sections dataset and bare_full)")
    output_dir = ctx.work / f"run-{name}"
    flags = ["--pretrained_model_name_or_path", ctx.model_dir, "--train_data_dir", ctx.data_dir,
             "--output_dir", output_dir, "--train_batch_size", ctx.batch, "--max_train_steps",
             ctx.sizes["finetune_steps"], "--checkpointing_steps", 0, "--probe_steps", 0, "--validation_steps", 0,
             "--mixed_precision", "bf16" if ctx.amp else "no", "--dataloader_num_workers", ctx.sizes["workers"],
             "--learning_rate", "1e-4", "--seed", 0, *extra]
    env = {} if ctx.amp else {"OMP_NUM_THREADS": str(torch.get_num_threads())}
    with parked(ctx):
        record = finetune_record([str(f) for f in flags], ctx.work / f"{name}.log", ctx.sizes["finetune_warmup"],
                                 launcher, env, ctx.sizes["finetune_timeout_s"])
    shutil.rmtree(output_dir, ignore_errors=True)
    return dict(record, flags=" ".join(map(str, extra)))


def with_ratios(ctx: Context, record: dict, bare: dict | None, flops_per_image: float | None) -> dict:
    """A finetune record with its images/s over the bare loop's (`ratio_to_bare`) and its MFU."""
    if bare and "images_per_s" in bare:
        record["ratio_to_bare"] = record["images_per_s"] / bare["images_per_s"]
    if flops_per_image:
        record["mfu"] = mfu(flops_per_image, record["images_per_s"], ctx.result("env"))
    return record


def full_unet_flops(ctx: Context) -> float | None:
    """FLOPs of one image's full-UNet forward + backward (section flops), when measured."""
    return ctx.result("flops").get("per_image", {}).get("unet_forward_backward")


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
    """The synthetic images as an image folder, then a study dataset built from it by build_duplicated_dataset.py
    (every image once, and 2 images at 4 and 16 copies: the cache encodes each unique image once)."""
    source = ctx.work / "images"
    source.mkdir(exist_ok=True)
    with open(source / "metadata.jsonl", "w") as handle:
        for i, (image, caption) in enumerate(zip(ctx.images, ctx.captions)):
            image.save(source / f"{i:04d}.png")
            handle.write(json.dumps({"file_name": f"{i:04d}.png", "text": caption}) + "\n")
    data_dir = ctx.work / "data"
    subprocess.run([sys.executable, str(ROOT / "data_scripts" / "build_duplicated_dataset.py"), "--source",
                    str(source), "--output_dir", str(data_dir), "--resolution", str(ctx.images[0].size[0]),
                    "--dup_factors", "1,4,16", "--samples_per_factor", "2", "--seed", "0"], check=True,
                   cwd=ROOT, stdout=subprocess.DEVNULL)
    ctx.data_dir = data_dir
    manifest = json.loads((data_dir / "manifest.json").read_text())
    return dict(folder_mib=sum(f.stat().st_size for f in data_dir.rglob("*") if f.is_file()) / 2**20,
                manifest_keys=sorted(manifest))


def section_bare_full(ctx: Context) -> dict:
    """The largest batch that fits, then the bare full fine-tuning loop's images/s and peak memory there."""
    bare = ctx.bare()
    batch, tried = bare.largest_batch(ctx.pipe.unet, ctx.sizes["batch_sizes"])
    ctx.batch = batch
    return dict(batch_probe={str(b): v for b, v in tried.items()}, **bare.measure(ctx.pipe.unet, batch))


def section_finetune_cached(ctx: Context) -> dict:
    """finetune.py full fine-tuning with its input cache (the default) at the bare loop's batch: images/s, the
    ratio to the bare loop (which encodes every step) and the cache's build seconds, size and peak memory."""
    return with_ratios(ctx, run_finetune(ctx, "finetune_cached"), ctx.result("bare_full"), full_unet_flops(ctx))


def section_finetune_uncached(ctx: Context) -> dict:
    """finetune.py full fine-tuning encoding every batch (--no-cache_latents --no-cache_caption_embeddings)."""
    record = with_ratios(ctx, run_finetune(ctx, "finetune_uncached", UNCACHED), ctx.result("bare_full"),
                         full_unet_flops(ctx))
    cached = ctx.result("finetune_cached")
    if "images_per_s" in cached:
        record["cached_over_uncached"] = cached["images_per_s"] / record["images_per_s"]
    return record


def section_flops(ctx: Context) -> dict:
    """UNet FLOPs per image (full fine-tuning) and the bare loop's MFU."""
    flops = unet_flops_per_image(ctx.pipe, ctx.pipe.unet, ctx.pixels[:1], ctx.captions[0], ctx.device, ctx.amp)
    out = dict(per_image=flops)
    if "images_per_s" in ctx.result("bare_full"):
        out["bare_full_mfu"] = mfu(flops["unet_forward_backward"], ctx.result("bare_full")["images_per_s"],
                                   ctx.result("env"))
    return out


def section_lora(ctx: Context) -> dict:
    """LoRA (r=4 on the attention projections, as finetune.py adds it): bare loop and FLOPs."""
    from diffusers import UNet2DConditionModel
    from train.finetune_state import add_lora

    unet = UNet2DConditionModel.from_pretrained(ctx.model_dir, subfolder="unet").to(ctx.device)
    add_lora(unet, rank=4, weight_dtype=torch.bfloat16 if ctx.device.type == "cuda" else torch.float32)
    trainable = sum(p.numel() for p in unet.parameters() if p.requires_grad)
    bare = ctx.bare().measure(unet, ctx.batch)
    flops = unet_flops_per_image(ctx.pipe, unet, ctx.pixels[:1], ctx.captions[0], ctx.device, ctx.amp)
    del unet
    free_memory()
    return dict(trainable_params=trainable, flops_per_image=flops,
                bare=dict(bare, mfu=mfu(flops["unet_forward_backward"], bare["images_per_s"], ctx.result("env"))))


def section_finetune_lora(ctx: Context) -> dict:
    """finetune.py --use_lora (input cache on) at the same batch; ratio to the bare LoRA loop."""
    record = run_finetune(ctx, "finetune_lora", ["--use_lora", "--rank", "4"])
    lora = ctx.result("lora")
    return with_ratios(ctx, record, lora.get("bare"), lora.get("flops_per_image", {}).get("unet_forward_backward"))


def section_eval(ctx: Context) -> dict:
    """Trajectory capture + M1-M6 (bench.eval_paths.analysis) vs the plain pipeline, bf16, best of 2 alternations."""
    from diffusers import DDIMScheduler, StableDiffusionPipeline

    from bench.eval_paths import analysis, plain_pipeline, synthetic_probe_set
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
    pipe = components = None  # dropped before free_memory (the timed lambdas close over them)
    free_memory()
    n_images = len(prompts) * len(seeds)
    ours, plain = min(ours_times), min(plain_times)
    return dict(prompts=len(prompts), seeds=len(seeds), ddim_steps=s["eval_steps"], batch=s["eval_batch"],
                dtype=str(dtype), plain_s=plain, analysis_s=ours, plain_images_per_s=n_images / plain,
                analysis_images_per_s=n_images / ours, ratio_analysis_to_plain=ours / plain,
                max_image_difference=(images - traj.images).abs().max().item(), plain_runs_s=plain_times,
                analysis_runs_s=ours_times)


def default_probe_inputs(ctx: Context, samples: int) -> dict:
    """probe_metrics inputs on `samples` training images at finetune.py's default probe grid."""
    from train.finetune_config import FLAGS

    return probe_inputs(ctx.pipe, ctx.pixels[:samples], ctx.captions[:samples], ctx.device,
                        FLAGS["probe_timesteps"][0], FLAGS["probe_guidance_scales"][0], FLAGS["probe_batch_size"][0])


def section_numerics(ctx: Context) -> dict:
    """bf16 vs float32 probe_metrics on the same inputs (bench.gpu_measure.probe_precision_agreement)."""
    return probe_precision_agreement(ctx.pipe.unet, default_probe_inputs(ctx, ctx.sizes["numerics_samples"]))


def toggle(name: str, off: dict, on: dict) -> dict:
    """One option measured off and on: both records' images/s and peak memory, and the speed-up on / off."""
    return dict(option=name, off_images_per_s=off["images_per_s"], on_images_per_s=on["images_per_s"],
                speedup=on["images_per_s"] / off["images_per_s"], batch=on["batch"], steps=on["steps"],
                off_peak=off.get("peak_allocated_gib"), on_peak=on.get("peak_allocated_gib"))


def section_toggles(ctx: Context) -> dict:
    """What the fast SD trainers turn on, each measured on and off in this run on the bare loop (full UNet):
    channels-last and fused AdamW at the chosen batch against the bare_full record; SDPA (PyTorch's pick, and
    flash / memory-efficient / math kernels alone) against diffusers' classic attention processor, and bf16
    autocast against float32 (TF32 off, torch's default, allowed), at a small batch (the classic processor
    stores every attention matrix; float32 takes twice the memory)."""
    from diffusers.models.attention_processor import AttnProcessor

    unet, bare, small = ctx.pipe.unet, ctx.bare(), ctx.sizes["small_batch"]
    baseline = ctx.result("bare_full") or bare.measure(unet, ctx.batch)
    out = {"fused_adamw": toggle("fused AdamW", baseline, bare.measure(unet, ctx.batch, fused=True))}
    unet.to(memory_format=torch.channels_last)
    try:
        out["channels_last"] = toggle("channels_last", baseline, bare.measure(unet, ctx.batch, channels_last=True))
    finally:
        unet.to(memory_format=torch.contiguous_format)
    default, attention = unet.attn_processors, {"sdpa": bare.measure(unet, small)}
    for kernel in ("flash", "efficient", "math"):
        try:
            attention[f"sdpa_{kernel}"] = bare.measure(unet, small, attention=kernel)
        except RuntimeError as error:  # a kernel this card, dtype or shape does not offer
            attention[f"sdpa_{kernel}"] = {"error": str(error).splitlines()[0][:200]}
            release(unet)
    unet.set_attn_processor(AttnProcessor())
    try:
        classic = bare.measure(unet, small)
    finally:
        unet.set_attn_processor(default)
    out["attention"] = {name: toggle(f"attention {name}", classic, record) if "images_per_s" in record else record
                        for name, record in attention.items()}
    out["attention"]["processors"] = sorted({type(p).__name__ for p in default.values()})
    autocast = attention["sdpa"]
    for name, (matmul, cudnn) in (("float32_strict", (False, False)), ("float32_torch_default", (False, True)),
                                  ("float32_allow_tf32", (True, True))):
        with tf32(matmul, cudnn):
            out[f"bf16_autocast_vs_{name}"] = toggle(f"bf16 autocast vs {name}",
                                                     bare.measure(unet, small, autocast=False), autocast)
    return out


def section_probe_cost(ctx: Context) -> dict:
    """One probe pass as finetune.py runs it (bf16 autocast, default grid and guidance scales, all probe
    samples of the dataset) against training time at the default --probe_steps."""
    from mem_analysis.data import load_study_dataset
    from train.finetune_config import FLAGS

    samples = ctx.sizes["probe_samples"] or len(load_study_dataset(ctx.data_dir)["probe"])
    inputs = default_probe_inputs(ctx, samples)

    def probe():
        with torch.autocast(ctx.device.type, dtype=torch.bfloat16, enabled=ctx.amp):
            probe_metrics(ctx.pipe.unet, **inputs)

    timing = time_steps(probe, 3, 1, ctx.device)
    step = (ctx.result("finetune_cached") or ctx.result("bare_full"))["step_s_median"]
    interval = FLAGS["probe_steps"][0]
    pass_s = timing["step_s_median"]
    return dict(probe_samples=samples, timesteps=len(inputs["timesteps"]), guidance_scales=inputs["guidance_scales"],
                unet_evaluations=2 * samples * len(inputs["timesteps"]), pass_s=pass_s,
                training_steps_per_pass=pass_s / step, default_probe_steps=interval,
                share_of_training_time=pass_s / (pass_s + interval * step))


def section_compile(ctx: Context) -> dict:
    """torch.compile of the UNet (module.compile, as finetune.py --torch_compile), bare loop at the chosen batch,
    on against off."""
    unet = ctx.pipe.unet
    baseline = ctx.result("bare_full") or ctx.bare().measure(unet, ctx.batch)
    unet.compile(backend=ctx.sizes["compile_backend"])
    try:
        compiled = ctx.bare().measure(unet, ctx.batch)
    finally:
        unet._compiled_call_impl = None  # back to eager for anything after this section
    return dict(toggle("torch.compile", baseline, compiled), backend=ctx.sizes["compile_backend"],
                compile_s=compiled["first_step_s"] - compiled["step_s_median"])


def section_finetune_compile(ctx: Context) -> dict:
    """finetune.py --torch_compile: steady images/s and first-step (compile) seconds, against the eager run."""
    record = run_finetune(ctx, "finetune_compile", ["--torch_compile"])
    plain = ctx.result("finetune_cached")
    if "images_per_s" in plain:
        record["speedup_vs_eager"] = record["images_per_s"] / plain["images_per_s"]
        record["compile_s"] = record["first_step_s"] - plain["first_step_s"]
    return record


def section_zero2(ctx: Context) -> dict:
    """finetune.py under DeepSpeed ZeRO-2 with one process (accelerate launch), against the plain run."""
    try:
        import deepspeed
    except Exception as error:  # noqa: BLE001 - any import failure means: not available here
        raise Skip(f"deepspeed does not import ({type(error).__name__}: {error})") from None
    launcher = [sys.executable, "-m", "accelerate.commands.launch", "--config_file",
                str(ROOT / "configs" / "accelerate" / "deepspeed_zero2.yaml"), "--num_processes", "1",
                "--mixed_precision", "bf16" if ctx.amp else "no"]
    record = run_finetune(ctx, "finetune_zero2", launcher=launcher)
    record["deepspeed"] = deepspeed.__version__
    plain = ctx.result("finetune_cached")
    if "images_per_s" in plain:
        record["ratio_to_plain_finetune"] = record["images_per_s"] / plain["images_per_s"]
    return record


@dataclass(frozen=True)
class Section:
    """One measurement: its function, its estimated seconds on an H100 (a section that would end after
    --budget_s is skipped), the sections it needs (run before it; it is skipped when one did not succeed), and
    whether it runs only when named in --only."""

    name: str
    run: Callable[[Context], dict]
    seconds: float
    needs: tuple[str, ...] = ()
    on_request: bool = False


# In running order, most important first. env, setup and dataset always run (CORE).
SECTIONS = [
    Section("env", section_env, 5),
    Section("setup", section_setup, 15, ("env",)),
    Section("dataset", section_dataset, 10, ("setup",)),
    Section("bare_full", section_bare_full, 30, ("setup",)),
    Section("flops", section_flops, 10, ("env", "setup")),
    Section("finetune_cached", section_finetune_cached, 40, ("env", "dataset", "bare_full")),
    Section("finetune_uncached", section_finetune_uncached, 42, ("env", "dataset", "bare_full")),
    Section("lora", section_lora, 20, ("env", "bare_full")),
    Section("finetune_lora", section_finetune_lora, 38, ("env", "dataset", "bare_full")),
    Section("eval", section_eval, 25, ("setup",)),
    Section("numerics", section_numerics, 10, ("setup",)),
    Section("toggles", section_toggles, 45, ("bare_full",)),
    Section("probe_cost", section_probe_cost, 8, ("dataset", "bare_full")),
    Section("compile", section_compile, 100, ("bare_full",)),
    Section("finetune_compile", section_finetune_compile, 120, ("dataset", "bare_full"), on_request=True),
    Section("zero2", section_zero2, 60, ("dataset", "bare_full"), on_request=True),
]
CORE = ("env", "setup", "dataset")
