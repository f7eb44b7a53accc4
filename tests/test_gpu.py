"""bench/gpu_check.sh and the GPU checks (issue 7).

On CPU: the script refuses at once without CUDA and writes nothing, and its --dry_run goes through every
step at tiny sizes; bench/gpu_bench.py's smoke mode runs its in-process sections on the tiny preset;
bench/finetune_runs.py turns a finetune.py run into its throughput record; the carried wheels (when fetched)
install as one set for python 3.12.
Marked `gpu` (skipped without CUDA; bench/gpu_check.sh runs them on the GPU machine first): bf16
probe numerics against float32 on the sd15-shape UNet within gpu_bench's stated tolerances, SDPA
as the default attention agreeing with the classic processor, and a bf16 finetune.py run on CUDA.
"""
from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from bench import finetune_runs, gpu_bench, gpu_measure, gpu_table

ROOT = Path(__file__).resolve().parents[1]

gpu = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")


def reset_accelerate() -> None:
    """Fresh accelerate singletons after an in-process finetune.py run, as in a new process."""
    from accelerate.state import AcceleratorState, GradientState, PartialState

    AcceleratorState._reset_state(True)
    GradientState._reset_state()
    PartialState._reset_state()


def test_gpu_check_refuses_without_cuda(tmp_path):
    out = tmp_path / "out"
    out.mkdir()
    results = ROOT / "bench" / "results"
    before = sorted(results.iterdir()) if results.exists() else []
    env = dict(os.environ, CUDA_VISIBLE_DEVICES="", PYTHON=sys.executable, OUT=str(out))
    done = subprocess.run(["bash", str(ROOT / "bench" / "gpu_check.sh")], env=env, capture_output=True, text=True,
                          timeout=60)
    assert done.returncode == 2
    assert done.stdout == ""
    message = done.stderr.strip().splitlines()
    assert len(message) == 1 and "sees no CUDA GPU" in message[0] and "nothing was run" in message[0]
    assert list(out.iterdir()) == []
    assert (sorted(results.iterdir()) if results.exists() else []) == before


def test_gpu_check_dry_run_on_cpu(tmp_path):
    """`bash bench/gpu_check.sh --dry_run`: the GPU tests step (all skip on a CPU), then the bench at tiny sizes,
    its JSON and log written into $OUT as it goes and nothing into bench/results/. The sections that
    test_gpu_bench_smoke_on_cpu runs in process (bare loop, FLOPs, LoRA, numerics) and the further finetune.py
    variants (the same code path with other flags) are left to the full dry run, to keep this test short."""
    out = tmp_path / "out"
    results_dir = ROOT / "bench" / "results"
    before = sorted(results_dir.iterdir())
    only = "finetune_cached,eval,toggles,probe_cost,compile"
    env = dict(os.environ, CUDA_VISIBLE_DEVICES="", PYTHON=sys.executable, OUT=str(out), GPU_BENCH_ARGS=f"--only {only}")
    done = subprocess.run(["bash", str(ROOT / "bench" / "gpu_check.sh"), "--dry_run"], env=env, capture_output=True,
                          text=True, timeout=900)
    assert done.returncode == 0, done.stdout[-4000:]
    results = json.loads(next(out.glob("cpu-*.json")).read_text())
    assert results["extra"]["pytest_gpu_exit"] == 0 and "skipped" in results["extra"]["pytest_gpu_summary"]
    assert set(results["status"]) == {"env", "setup", "dataset", "bare_full", "finetune_cached", "eval", "toggles",
                                      "probe_cost", "compile"}
    assert all(status == "ok" for status in results["status"].values()), results["status"]
    s = results["sections"]
    assert s["finetune_cached"]["ratio_to_bare"] > 0 and s["finetune_cached"]["cache"]["latents"]["mib"] > 0
    assert {"fused_adamw", "channels_last", "attention", "bf16_autocast_vs_float32_strict"} <= set(s["toggles"])
    log = next(out.glob("gpu_check-*.log")).read_text()
    assert "finetune.py full, input cache" in log and "on / off, bare loop:" in log
    assert sorted(results_dir.iterdir()) == before


def test_gpu_bench_smoke_on_cpu(tmp_path):
    path = tmp_path / "smoke.json"
    status = gpu_bench.main(["--device", "cpu", "--preset", "tiny", "--smoke", "--only",
                             "bare_full,flops,lora,numerics", "--json", str(path), "--work_dir", str(tmp_path / "work")])
    results = json.loads(path.read_text())
    assert status == 0, results["status"]
    s = results["sections"]
    assert s["setup"]["latent_shape"] == [4, 16, 16]
    assert s["bare_full"]["batch"] == 4 and s["bare_full"]["images_per_s"] > 0
    # Backward costs about twice the forward when weights train; with LoRA the frozen weights need
    # only input gradients, so the backward is about one forward.
    full, lora = s["flops"]["per_image"], s["lora"]["flops_per_image"]
    assert 1.6 < full["backward_over_forward"] < 2.4
    assert 0.8 < lora["backward_over_forward"] < 1.4
    assert 0 < s["lora"]["trainable_params"] < s["setup"]["unet_params"] / 10
    for variant in ("bf16_autocast", "bf16_weights"):
        agreement = s["numerics"][variant]
        assert agreement["within_tolerance"], agreement
        assert 0 < agreement["max_loss_rel"] <= gpu_measure.LOSS_RTOL  # bf16 really ran: not bitwise float32
    assert "bare full (batch 4)" in gpu_table.table(results)


def test_k_amplification_matches_x0hat_error():
    """An error d in e_c moves k_cfg_g by g sqrt((1 - abar)/abar) <d, x> / ||x||^2 (uncentred)."""
    alpha_bar = torch.tensor([0.9, 0.5, 0.01])
    factor = gpu_measure.k_amplification("k_cfg_7.5", [0, 1, 2], alpha_bar)
    expected = (7.5 + 6.5) * ((1 - alpha_bar) / alpha_bar).sqrt()
    assert torch.allclose(factor, expected)
    assert torch.allclose(gpu_measure.k_amplification("k_uncond", [1], alpha_bar), torch.tensor([1.0]))


def test_sd15_shape_attention_is_sdpa_by_default():
    """diffusers' default processor on torch 2 is AttnProcessor2_0 (F.scaled_dot_product_attention) on every layer."""
    from diffusers import UNet2DConditionModel
    from mem_analysis.presets import PRESETS

    with torch.device("meta"):  # the architecture only, no memory for weights
        unet = UNet2DConditionModel(**PRESETS["sd15-shape"]["unet"])
    processors = unet.attn_processors
    assert len(processors) == 32  # 16 transformer blocks x (self, cross)
    assert {type(p).__name__ for p in processors.values()} == {"AttnProcessor2_0"}


def tiny_study(folder: Path) -> tuple[Path, Path]:
    """An untrained tiny base model and a study dataset of 24 synthetic 32 px images (factors 1, 4)."""
    from data_scripts import build_duplicated_dataset
    from mem_analysis.presets import build_pipeline

    build_pipeline("tiny", seed=0).save_pretrained(folder / "model")
    source = folder / "images"
    source.mkdir()
    with open(source / "metadata.jsonl", "w") as handle:
        for i, image in enumerate(gpu_measure.synthetic_images(24, 32, seed=0)):
            image.save(source / f"{i}.png")
            handle.write(json.dumps({"file_name": f"{i}.png", "text": f"colour field {i}"}) + "\n")
    build_duplicated_dataset.main(["--source", str(source), "--output_dir", str(folder / "data"), "--resolution", "32",
                                   "--dup_factors", "1,4", "--samples_per_factor", "2"])
    return folder / "model", folder / "data"


def test_finetune_run_record(tmp_path):
    """A finetune.py run (channels-last, saved at the end) becomes a throughput record."""
    model, data = tiny_study(tmp_path)
    result = tmp_path / "record.json"
    flags = ["--pretrained_model_name_or_path", str(model), "--train_data_dir", str(data),
             "--output_dir", str(tmp_path / "run"), "--train_batch_size", "4", "--max_train_steps", "3",
             "--checkpointing_steps", "0", "--probe_steps", "0", "--mixed_precision", "no", "--channels_last"]
    # a shared CPU: one thread avoids OpenMP spin-waits
    record = finetune_runs.finetune_record(flags, result.with_suffix(".log"), warmup=1, env={"OMP_NUM_THREADS": "1"})
    assert record["steps"] == 3 and record["warmup_steps"] == 1 and record["batch"] == 4
    assert record["images_per_s"] > 0 and record["step_s_median"] == pytest.approx(4 / record["images_per_s"])
    assert set(record["cache"]) == {"latents", "text_embeddings"} and record["cache"]["latents"]["build_seconds"] > 0
    assert len(record["cpu_seconds_per_step"]) == 3 and min(record["cpu_seconds_per_step"]) > 0


def test_summarize_finetune_rates():
    record = finetune_runs.summarize([1.0, 8.0, 4.0, 8.0], samples_per_step=8, warmup=1)
    assert record["images_per_s"] == 8.0 and record["first_step_s"] == 8.0
    assert record["images_per_s_overall"] == pytest.approx(3 / (1 / 8 + 1 / 4 + 1 / 8))


@pytest.mark.skipif(not (ROOT / ".whl").is_dir(), reason="no .whl/ (bench/fetch_gpu_wheels.sh fetches it)")
def test_gpu_wheels_install_as_one_set_for_python312(tmp_path):
    wheels = sorted((ROOT / ".whl").glob("*.whl"))
    names = [re.split(r"-\d", w.name, maxsplit=1)[0].lower() for w in wheels]
    assert len(names) == len(set(names)), "two versions of one package stop the install on the GPU machine"
    subprocess.run([sys.executable, "-m", "pip", "install", "-q", "--disable-pip-version-check", "--no-index",
                    "--no-deps", "--no-compile", "--target", str(tmp_path), "--python-version", "3.12",
                    "--implementation", "cp", "--only-binary=:all:", "--platform", "manylinux_2_17_x86_64",
                    *map(str, wheels)], check=True, capture_output=True, timeout=120)
    pins = dict(line.strip().split("==") for line in (ROOT / "requirements.txt").read_text().splitlines()
                if "==" in line and not line.startswith("#"))
    for package in ("diffusers", "datasets", "peft", "deepspeed"):
        assert (tmp_path / f"{package}-{pins[package]}.dist-info").is_dir(), package


# ------------------------------------------------------------------------------------------ GPU only
@pytest.fixture(scope="module")
def sd15_unet():
    """The sd15-shape UNet, randomly initialised directly on the GPU (float32)."""
    from diffusers import UNet2DConditionModel
    from mem_analysis.presets import PRESETS

    torch.manual_seed(0)
    with torch.device("cuda"):
        return UNet2DConditionModel(**PRESETS["sd15-shape"]["unet"]).eval()


def sd15_probe_inputs(samples: int = 2) -> dict:
    """probe_metrics inputs at 64x64x4 latents with the SD schedule and finetune.py's default grid."""
    from diffusers import DDPMScheduler
    from train.finetune_config import FLAGS
    from mem_analysis.presets import SD_SCHEDULER
    from mem_analysis.probes import probe_noise
    from mem_analysis.schedule import alpha_bar_from_scheduler

    generator = torch.Generator().manual_seed(1)
    latents = torch.randn(samples, 4, 64, 64, generator=generator)
    timesteps = FLAGS["probe_timesteps"][0]
    return dict(latents=latents, cond=torch.randn(samples, 77, 768, generator=generator),
                uncond=torch.randn(1, 77, 768, generator=generator), timesteps=timesteps,
                noise=probe_noise(range(samples), timesteps, latents.shape[1:], seed=0),
                alpha_bar=alpha_bar_from_scheduler(DDPMScheduler(**SD_SCHEDULER)),
                guidance_scales=FLAGS["probe_guidance_scales"][0], mu=latents.mean(0), chunk_size=64)


@pytest.mark.gpu
@gpu
def test_bf16_probe_metrics_agree_with_float32(sd15_unet):
    agreement = gpu_measure.probe_precision_agreement(sd15_unet, sd15_probe_inputs())
    for variant in ("bf16_autocast", "bf16_weights"):
        a = agreement[variant]
        print(f"{variant}: max loss rel diff {a['max_loss_rel']:.2e} (tolerance {gpu_measure.LOSS_RTOL}), "
              f"max k abs diff {a['max_k_abs']:.2e}, scaled {a['max_k_scaled']:.2e} (tolerance {gpu_measure.K_ATOL})")
        assert a["within_tolerance"], a
        assert a["max_loss_rel"] > 0  # bf16 really ran


@pytest.mark.gpu
@gpu
def test_sdpa_is_default_and_agrees_with_classic_attention(sd15_unet):
    from diffusers.models.attention_processor import AttnProcessor

    default = sd15_unet.attn_processors
    assert {type(p).__name__ for p in default.values()} == {"AttnProcessor2_0"}
    generator = torch.Generator().manual_seed(2)
    x = torch.randn(2, 4, 64, 64, generator=generator).cuda()
    hidden = torch.randn(2, 77, 768, generator=generator).cuda()
    t = torch.tensor([100, 800], device="cuda")
    with torch.no_grad(), gpu_measure.tf32(False, False):
        sdpa = sd15_unet(x, t, hidden).sample
        sd15_unet.set_attn_processor(AttnProcessor())
        try:
            classic = sd15_unet(x, t, hidden).sample
        finally:
            sd15_unet.set_attn_processor(default)
    relative = ((sdpa - classic).norm() / classic.norm()).item()
    print(f"SDPA vs classic attention, float32: relative difference {relative:.2e}")
    assert relative < 1e-4


@pytest.mark.gpu
@gpu
def test_finetune_bf16_on_cuda(tmp_path):
    """finetune.py on the tiny model in bf16 on the GPU: loss finite, probes written, final model saved."""
    from train import finetune

    model, data = tiny_study(tmp_path)
    extra = ["--channels_last", "--allow_tf32"]
    run = tmp_path / "run"
    try:
        status = finetune.main(["--pretrained_model_name_or_path", str(model), "--train_data_dir",
                                str(data), "--output_dir", str(run), "--train_batch_size", "4",
                                "--max_train_steps", "4", "--probe_steps", "2", "--checkpointing_steps", "4",
                                "--mixed_precision", "bf16", *extra])
    finally:
        reset_accelerate()
    assert status == 0
    rows = [json.loads(line) for line in (run / "probes.jsonl").read_text().splitlines()]
    assert sorted({row["step"] for row in rows}) == [0, 2, 4]
    assert all(torch.isfinite(torch.tensor(row["loss_cfg_7.5"])) for row in rows)
    assert (run / "checkpoint-4").is_dir() and (run / "model_index.json").is_file()
