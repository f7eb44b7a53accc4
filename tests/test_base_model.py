"""Base models written by data_scripts/make_base_model.py."""
from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from accelerate import init_empty_weights
from diffusers import AutoencoderKL, StableDiffusionPipeline, UNet2DConditionModel
from safetensors.torch import load_file

from data_scripts import make_base_model
from conftest import TINY_MODEL_ARGS
from mem_analysis.data import image_to_tensor, list_source_images, load_source_image, subsample
from mem_analysis.presets import build_pipeline
from mem_analysis.sd import encode_images, load_components

ROOT = Path(__file__).resolve().parents[1]


def pool_and_held_out(max_images: int, seed: int, held_out: int = 64) -> tuple[torch.Tensor, torch.Tensor]:
    """The fixture's VAE pool, and Twemoji images outside it (never seen by the VAE), as [-1, 1] pixels."""
    listed = list_source_images("twemoji")
    pool = subsample(listed, max_images, seed)
    names = {item.name for item in pool}
    unseen = [item for item in listed if item.name not in names][::37][:held_out]
    to_pixels = lambda items: torch.stack([image_to_tensor(load_source_image(i, 32)) for i in items])  # noqa: E731
    return to_pixels(pool), to_pixels(unseen)


def test_pipeline_loads_and_generates(tiny_model_dir):
    pipe = StableDiffusionPipeline.from_pretrained(tiny_model_dir, use_safetensors=True)
    assert pipe.safety_checker is None
    assert pipe.scheduler.config.steps_offset == 1 and pipe.scheduler.config.clip_sample is False
    out = pipe(["a red heart", "grinning face"], num_inference_steps=2, height=32, width=32,
               output_type="np", generator=torch.Generator().manual_seed(0))
    assert out.images.shape == (2, 32, 32, 3)
    assert list(tiny_model_dir.glob("*/*.safetensors")) and not list(tiny_model_dir.glob("*/*.bin"))
    components = load_components(str(tiny_model_dir))  # the project's own loading path
    assert components.unet.config.sample_size == 16 and components.vae.config.latent_channels == 4


def test_vae_reconstructs_unseen_images_better_than_the_mean_image(tiny_model_dir):
    vae = AutoencoderKL.from_pretrained(tiny_model_dir, subfolder="vae")
    pool, unseen = pool_and_held_out(max_images=128, seed=0)
    with torch.no_grad():
        reconstruction = (vae.decode(vae.encode(unseen).latent_dist.mean).sample + 1).div(2).clamp(0, 1)
    target = (unseen + 1) / 2
    mean_image = ((pool + 1) / 2).mean(0, keepdim=True).expand_as(target)
    vae_psnr = make_base_model.psnr(reconstruction, target).mean().item()
    baseline_psnr = make_base_model.psnr(mean_image, target).mean().item()
    print(f"unseen images: VAE PSNR {vae_psnr:.2f} dB, mean-image PSNR {baseline_psnr:.2f} dB")
    assert vae_psnr > baseline_psnr + 1.5
    # scaling_factor = 1/std of the pool latents: scaled latents have about unit variance
    assert encode_images(vae, pool).std().item() == pytest.approx(1.0, abs=0.1)
    assert vae.config.scaling_factor != 1.0


def test_psnr_matches_its_formula():
    target = torch.zeros(2, 3, 4, 4)
    prediction = torch.full((2, 3, 4, 4), 0.1)  # mse 0.01 -> 20 dB
    assert make_base_model.psnr(prediction, target).tolist() == pytest.approx([20.0, 20.0])


def test_same_seed_same_weights_other_seed_other_weights(tmp_path):
    short = ["--preset", "tiny", "--max_images", "16", "--vae_steps", "2", "--pretrain_unet_steps", "2",
             "--text_encoder_steps", "2", "--train_batch_size", "8"]
    for name, seed in (("a", 0), ("b", 0), ("c", 1)):
        make_base_model.main(["--output_dir", str(tmp_path / name), "--seed", str(seed), *short])
    files = sorted(p.relative_to(tmp_path / "a") for p in (tmp_path / "a").glob("*/*.safetensors"))
    assert len(files) == 3  # unet, vae, text_encoder
    for f in files:
        assert (tmp_path / "a" / f).read_bytes() == (tmp_path / "b" / f).read_bytes()
        assert (tmp_path / "a" / f).read_bytes() != (tmp_path / "c" / f).read_bytes()
    # VAE, UNet and text encoder were all trained
    untrained = build_pipeline("tiny", 0)
    trained = {name: load_file(tmp_path / "a" / name / "diffusion_pytorch_model.safetensors") for name in ("unet", "vae")}
    trained["text_encoder"] = load_file(next((tmp_path / "a" / "text_encoder").glob("*.safetensors")))
    for name, weights in trained.items():
        reference = getattr(untrained, name).state_dict()
        assert any(not torch.equal(weights[k], reference[k]) for k in weights), f"{name} was not trained"
    record = json.loads((tmp_path / "a" / "make_base_model.json").read_text())
    assert record["seed"] == 0 and record["vae_psnr_db"] > 0 and "unet_seconds" in record
    assert "text_encoder_seconds" in record and set(record["caption_separation"]["pool_held_out"]) == {"random",
                                                                                                      "trained"}


def test_sd15_shape_has_the_sd_v1_5_architecture(tmp_path):
    folder = tmp_path / "sd15"
    run = subprocess.run([sys.executable, str(ROOT / "data_scripts" / "make_base_model.py"), "--output_dir",
                          str(folder), "--preset", "sd15-shape", "--config_only"],
                         capture_output=True, text=True, cwd=ROOT)
    assert run.returncode == 0, run.stderr
    assert "configs only" in run.stdout
    assert not list(folder.rglob("*.safetensors")) and not list(folder.rglob("*.bin"))
    unet = UNet2DConditionModel.load_config(folder / "unet")
    expected = dict(sample_size=64, in_channels=4, out_channels=4, layers_per_block=2,
                    block_out_channels=[320, 640, 1280, 1280], cross_attention_dim=768, attention_head_dim=8,
                    down_block_types=["CrossAttnDownBlock2D"] * 3 + ["DownBlock2D"],
                    up_block_types=["UpBlock2D"] + ["CrossAttnUpBlock2D"] * 3, norm_num_groups=32,
                    act_fn="silu", center_input_sample=False, flip_sin_to_cos=True, freq_shift=0,
                    mid_block_type="UNetMidBlock2DCrossAttn", transformer_layers_per_block=1)
    assert {k: unet[k] for k in expected} == expected
    vae = AutoencoderKL.load_config(folder / "vae")
    assert vae["block_out_channels"] == [128, 256, 512, 512] and vae["scaling_factor"] == 0.18215
    text = json.loads((folder / "text_encoder" / "config.json").read_text())
    assert (text["hidden_size"], text["num_hidden_layers"], text["hidden_act"]) == (768, 12, "quick_gelu")
    index = json.loads((folder / "model_index.json").read_text())
    assert index["_class_name"] == "StableDiffusionPipeline" and index["unet"][1] == "UNet2DConditionModel"
    with init_empty_weights():  # parameter counts of SD v1.5 (UNet 859,520,964; VAE 83,653,863), no memory
        assert sum(p.numel() for p in UNet2DConditionModel.from_config(unet).parameters()) == 859_520_964
        assert sum(p.numel() for p in AutoencoderKL.from_config(vae).parameters()) == 83_653_863


def test_pool_can_leave_out_a_study_dataset(tiny_dataset_dir):
    study = {s["name"] for s in json.loads((tiny_dataset_dir / "manifest.json").read_text())["samples"]}
    args = make_base_model.parse_args(["--output_dir", "unused", "--max_images", "100000",
                                       "--exclude_dataset", str(tiny_dataset_dir)])
    pool = {item.name for item in make_base_model.pool_items(args)}
    assert len(study) == 48 and not pool & study
    assert len(pool) == len(list_source_images("twemoji")) - 48


def test_bad_inputs_give_one_line_errors_and_keep_existing_output(tmp_path):
    output = tmp_path / "existing"
    output.mkdir()
    (output / "keep.txt").write_text("precious")
    with pytest.raises(ValueError, match=r"not empty; pass --overwrite"):
        make_base_model.main(["--output_dir", str(output), *TINY_MODEL_ARGS])
    assert [p.name for p in output.iterdir()] == ["keep.txt"]
    with pytest.raises((ValueError, FileNotFoundError), match=r"source folder .*missing does not exist") as info:
        make_base_model.main(["--output_dir", str(tmp_path / "new"), "--image_source", str(tmp_path / "missing")])
    assert "\n" not in str(info.value)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["existing"]
