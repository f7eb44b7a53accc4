"""train/finetune.py through the real `accelerate launch`: single process (with EMA), 2-process DDP
(with LoRA), 2-process DeepSpeed ZeRO-2, probe rows and TensorBoard scalars, kill -9 + resume == uninterrupted.

Runs are short (tiny model, batch 4, a few steps) and shared between tests by module fixtures.
"""
from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

ROOT = Path(__file__).resolve().parents[1]
ACCELERATE = str(Path(sys.executable).with_name("accelerate"))
COMMON = ["--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no"]
MODES = {
    "single": ([ACCELERATE, "launch", "--num_processes", "1", *COMMON], {}),
    "ddp": ([ACCELERATE, "launch", "--config_file", "configs/accelerate/multi_gpu.yaml", "--num_processes", "2",
             *COMMON], {"ACCELERATE_USE_CPU": "1"}),
    "zero2": ([ACCELERATE, "launch", "--config_file", "configs/accelerate/deepspeed_zero2.yaml",
               "--num_processes", "2", *COMMON], {}),
}
GUIDANCE = ["1.5", "3", "7.5"]
METRICS = (["loss_cond", "loss_uncond"] + [f"loss_cfg_{g}" for g in GUIDANCE]
           + ["k_cond", "k_uncond"] + [f"k_cfg_{g}" for g in GUIDANCE])
TIMESTEPS = [100, 500, 750, 900]  # configs/finetune_tiny.yaml
STEPS, EVERY = 6, 2

pytestmark = pytest.mark.slow


def command(mode: str, model, data, output_dir, *extra) -> tuple[list[str], dict]:
    """accelerate launch command line and environment of a short tiny run."""
    launcher, env = MODES[mode]
    threads = "1" if mode != "single" else os.environ.get("OMP_NUM_THREADS", "2")
    args = [*launcher, "train/finetune.py", "--config", "configs/finetune_tiny.yaml",
            "--pretrained_model_name_or_path", str(model), "--train_data_dir", str(data),
            "--output_dir", str(output_dir), "--max_train_steps", str(STEPS),
            "--checkpointing_steps", str(EVERY), "--probe_steps", str(EVERY), *map(str, extra)]
    return args, {**os.environ, "OMP_NUM_THREADS": threads, **env}


def launch(mode: str, model, data, output_dir, *extra) -> Path:
    """Run to completion; fail with the log tail otherwise."""
    args, env = command(mode, model, data, output_dir, *extra)
    done = subprocess.run(args, cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    return Path(output_dir)


def probe_rows(run: Path) -> list[dict]:
    """Rows of run/probes.jsonl."""
    return [json.loads(line) for line in (run / "probes.jsonl").read_text().splitlines()]


def unet_weights(folder: Path) -> dict:
    """UNet tensors of a diffusers unet/ folder."""
    return load_file(str(folder / "diffusion_pytorch_model.safetensors"))


@pytest.fixture(scope="module")
def runs(tiny_model_dir, tiny_dataset_dir, tmp_path_factory):
    """Lazily launched runs, each at most once per module: name -> run folder."""
    base, cache = tmp_path_factory.mktemp("finetune"), {}
    extra = {"single": ("single", "--use_ema", "--ema_decay", "0.9", "--validation_steps", "6",
                        "--validation_inference_steps", "2", "--num_validation_prompts", "2"),
             "ddp": ("ddp", "--use_lora", "--rank", "2"),  # LoRA adapters under DDP
             "zero2": ("zero2",)}

    def get(name: str) -> Path:
        if name not in cache:
            mode, *flags = extra[name]
            cache[name] = launch(mode, tiny_model_dir, tiny_dataset_dir, base / name, *flags)
        return cache[name]

    get.base, get.extra = base, extra
    return get


def test_single_process_run_writes_the_contract(runs, tiny_dataset_dir):
    import datasets
    import yaml
    from diffusers import UNet2DConditionModel

    run = runs("single")
    config = yaml.safe_load((run / "config.yaml").read_text())
    assert config["pretrained_model_name_or_path"] and config["use_ema"] is True and config["max_train_steps"] == STEPS
    assert sorted(p.name for p in run.glob("checkpoint-*")) == ["checkpoint-2", "checkpoint-4", "checkpoint-6"]
    state = json.loads((run / "checkpoint-4" / "training_state.json").read_text())
    assert state["global_step"] == 4
    trained = UNet2DConditionModel.from_pretrained(run / "checkpoint-4" / "unet")
    ema = UNet2DConditionModel.from_pretrained(run / "checkpoint-4" / "unet_ema")
    final = UNet2DConditionModel.from_pretrained(run / "unet")
    assert any(not torch.equal(a, b) for a, b in zip(trained.parameters(), ema.parameters()))
    # The final pipeline's UNet holds the EMA weights of the last step.
    final_ema = UNet2DConditionModel.from_pretrained(run / "checkpoint-6" / "unet_ema")
    assert all(torch.equal(a, b) for a, b in zip(final.parameters(), final_ema.parameters()))
    assert (run / "model_index.json").is_file() and (run / "vae").is_dir()

    probe = datasets.load_from_disk(str(tiny_dataset_dir))["probe"]
    dup_of = dict(zip(probe["sample_id"], probe["dup_factor"]))
    rows = probe_rows(run)
    assert all(list(row) == ["step", "sample_id", "dup_factor", "timestep", *METRICS] for row in rows)
    keys = [(r["step"], r["sample_id"], r["timestep"]) for r in rows]
    assert len(keys) == len(set(keys)) == len(range(0, STEPS + 1, EVERY)) * len(dup_of) * len(TIMESTEPS)
    assert {r["step"] for r in rows} == set(range(0, STEPS + 1, EVERY))
    assert all(r["dup_factor"] == dup_of[r["sample_id"]] for r in rows)
    assert all(torch.isfinite(torch.tensor([r[m] for m in METRICS])).all() for r in rows)


def test_probe_scalars_readable_with_event_accumulator(runs):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    run = runs("single")
    events = EventAccumulator(str(run / "logs" / "finetune"))
    events.Reload()
    rows = probe_rows(run)
    for dup in sorted({r["dup_factor"] for r in rows}):
        scalars = events.Scalars(f"probe/loss_cfg_7.5/dup_{dup}")
        assert [s.step for s in scalars] == list(range(0, STEPS + 1, EVERY))
        for s in scalars:
            values = [r["loss_cfg_7.5"] for r in rows if r["step"] == s.step and r["dup_factor"] == dup]
            assert s.value == pytest.approx(sum(values) / len(values), rel=1e-5)
        assert len(events.Scalars(f"probe_high/k_cfg_7.5/dup_{dup}")) == len(scalars)
    assert [s.step for s in events.Scalars("train/loss")] == list(range(1, STEPS + 1))
    assert "validation/0" in events.Tags()["images"]


def test_lora_run_saves_diffusers_lora_weights(runs, tiny_model_dir):
    from diffusers import StableDiffusionPipeline

    run = runs("ddp")
    for folder in (run / "checkpoint-6", run):
        lora = load_file(str(folder / "pytorch_lora_weights.safetensors"))
        assert lora and all(k.startswith("unet.") and "lora" in k for k in lora)
    assert not (run / "checkpoint-6" / "unet").exists()
    pipeline = StableDiffusionPipeline.from_pretrained(tiny_model_dir, safety_checker=None)
    pipeline.load_lora_weights(str(run / "checkpoint-6"))
    base, fused = unet_weights(tiny_model_dir / "unet"), unet_weights(run / "unet")
    assert base.keys() == fused.keys()
    changed = [k for k in base if not torch.equal(base[k], fused[k])]
    assert changed and all(".attn" in k and k.split(".")[-2] in ("to_q", "to_k", "to_v", "0") for k in changed)


@pytest.mark.parametrize("mode", ["ddp", "zero2"])
def test_two_process_runs_checkpoint_and_probe_like_one(runs, mode):
    from diffusers import UNet2DConditionModel

    run, single = runs(mode), runs("single")
    for step in (2, 4, 6):
        checkpoint = run / f"checkpoint-{step}"
        assert (checkpoint / "random_states_1.pkl").is_file()  # a second process really ran
        if mode == "ddp":  # a LoRA run
            assert load_file(str(checkpoint / "pytorch_lora_weights.safetensors"))
        else:
            UNet2DConditionModel.from_pretrained(checkpoint / "unet")
    if mode == "zero2":
        assert (run / "checkpoint-6" / "pytorch_model" / "zero_pp_rank_1_mp_rank_00_optim_states.pt").is_file()
    rows, reference = probe_rows(run), probe_rows(single)
    assert [(r["step"], r["sample_id"], r["timestep"]) for r in rows] == [
        (r["step"], r["sample_id"], r["timestep"]) for r in reference]
    # Same initial weights (LoRA starts as the identity) and fixed noise: step-0 probes gathered from
    # 2 shards equal the 1-process ones.
    for row, ref in zip(rows, reference):
        if row["step"] == 0:
            assert row["loss_cfg_7.5"] == pytest.approx(ref["loss_cfg_7.5"], rel=1e-4, abs=1e-5)
            assert row["k_cond"] == pytest.approx(ref["k_cond"], rel=1e-4, abs=1e-5)


def test_kill_and_resume_latest_equals_uninterrupted(runs, tiny_model_dir, tiny_dataset_dir):
    """kill -9 after checkpoint-2, then the same command with --resume_from_checkpoint latest."""
    reference = runs("single")
    run = runs.base / "killed"
    args, env = command("single", tiny_model_dir, tiny_dataset_dir, run, *runs.extra["single"][1:],
                        "--resume_from_checkpoint", "latest")
    process = subprocess.Popen(args, cwd=ROOT, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                               start_new_session=True)
    deadline = time.time() + 300
    while not (run / "checkpoint-2").is_dir() and process.poll() is None and time.time() < deadline:
        time.sleep(0.05)
    os.killpg(process.pid, signal.SIGKILL)
    process.wait()
    assert not (run / "model_index.json").exists(), "the run ended before it could be killed"
    launch("single", tiny_model_dir, tiny_dataset_dir, run, *runs.extra["single"][1:],
           "--resume_from_checkpoint", "latest")
    for name in ("unet", "checkpoint-6/unet", "checkpoint-6/unet_ema"):
        expected, got = unet_weights(reference / name), unet_weights(run / name)
        assert all(torch.equal(expected[k], got[k]) for k in expected), name
    assert probe_rows(run) == probe_rows(reference)


def test_ddp_wen_filter_with_a_fully_filtered_process_does_not_hang(tiny_model_dir, tiny_dataset_dir, tmp_path):
    """Threshold 0 filters every example with a caption (||e_c - e_0|| > 0) and keeps the caption-dropped
    ones (e_c = e_0): with one example per process, some steps have one process entirely filtered while
    the other trains. Both still run their backward, so DDP's all-reduce completes."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    run = launch("ddp", tiny_model_dir, tiny_dataset_dir, tmp_path / "wen", "--mitigation_wen_threshold", 0,
                 "--proportion_empty_prompts", 0.5, "--train_batch_size", 1, "--probe_steps", 0,
                 "--adam_weight_decay", 0)
    events = EventAccumulator(str(run / "logs" / "finetune")).Reload()
    fully = [s.value for s in events.Scalars("train/wen_fully_filtered_processes")]
    share = [s.value for s in events.Scalars("train/wen_filtered_share")]
    assert len(fully) == STEPS and 1.0 in fully  # a step where exactly one process had nothing to learn from
    assert all(s == pytest.approx(f / 2) for s, f in zip(share, fully))  # batch 1: share = fully filtered / 2
    base, trained = unet_weights(tiny_model_dir / "unet"), unet_weights(run / "unet")
    assert all(torch.isfinite(t).all() for t in trained.values())
    changed = [k for k in base if not torch.equal(base[k], trained[k])]
    assert bool(changed) == any(s < 1 for s in share)  # weights move once some process kept an example
