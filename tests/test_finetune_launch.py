"""train/finetune.py through the real `accelerate launch`: single process (with EMA), 2-process DDP
(with LoRA), 2-process DeepSpeed ZeRO-2, probe rows and TensorBoard scalars, kill -9 + resume == uninterrupted;
two nodes on this machine (two launches, `--num_machines 2`, one process each, gloo over 127.0.0.1) sharing
the output folder or each with its own (`--save_on_each_node`), stopped, resumed and evaluated like one node.

Runs are short (tiny model, batch 4, a few steps) and shared between tests by module fixtures.
"""
from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from conftest import built_once
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
           + ["loss_cond_x0", "loss_uncond_x0"] + [f"loss_cfg_{g}_x0" for g in GUIDANCE]
           + ["k_cond", "k_uncond"] + [f"k_cfg_{g}" for g in GUIDANCE]
           + ["k_cond_uncentred", "k_uncond_uncentred"] + [f"k_cfg_{g}_uncentred" for g in GUIDANCE]
           + ["text_magnitude"])
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


def warning_rows(run: Path) -> list[dict]:
    """Rows of run/warnings.jsonl."""
    return [json.loads(line) for line in (run / "warnings.jsonl").read_text().splitlines()]


def unet_weights(folder: Path) -> dict:
    """UNet tensors of a diffusers unet/ folder."""
    return load_file(str(folder / "diffusion_pytorch_model.safetensors"))


@pytest.fixture(scope="module")
def runs(tiny_model_dir, tiny_dataset_dir, tmp_path_factory):
    """Lazily launched runs, each at most once per test run (conftest.built_once: shared by the xdist workers):
    name -> run folder."""
    base, cache = tmp_path_factory.mktemp("finetune"), {}
    extra = {"single": ("single", "--use_ema", "--ema_decay", "0.9", "--validation_steps", "6",
                        "--validation_inference_steps", "2", "--num_validation_prompts", "2"),
             "ddp": ("ddp", "--use_lora", "--rank", "2"),  # LoRA adapters under DDP
             "zero2": ("zero2",)}

    def get(name: str) -> Path:
        if name not in cache:
            mode, *flags = extra[name]
            cache[name] = built_once(tmp_path_factory, f"launch-{name}",
                                     lambda folder: launch(mode, tiny_model_dir, tiny_dataset_dir, folder, *flags))
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
    # the x0-space loss is the epsilon-space loss over SNR_t (science.md identity), row by row
    from diffusers import DDPMScheduler

    from mem_analysis import alpha_bar_from_scheduler, snr

    snr_t = snr(alpha_bar_from_scheduler(DDPMScheduler.from_pretrained(run, subfolder="scheduler")))
    for key in ("loss_cond", "loss_uncond", "loss_cfg_7.5"):
        eps_space, x0_space = (torch.tensor([r[k] for r in rows], dtype=torch.float64) for k in (key, f"{key}_x0"))
        torch.testing.assert_close(x0_space * snr_t[[r["timestep"] for r in rows]], eps_space, rtol=1e-3, atol=1e-6)

    # Early warning: one row per probe step and sample, equal to scoring the whole probes.jsonl afterwards.
    from mem_analysis.early_warning import score_run

    warnings = warning_rows(run)
    assert [(w["step"], w["sample_id"]) for w in warnings] == sorted({(r["step"], r["sample_id"]) for r in rows})
    assert all({"step", "sample_id", "dup_factor", "score", "alarm"} <= set(w) for w in warnings)
    assert all(w["dup_factor"] == dup_of[w["sample_id"]] for w in warnings)
    assert all(isinstance(w["score"], float) and isinstance(w["alarm"], bool) for w in warnings)
    assert warnings == score_run(rows, config["warning_fpr"], config["high_noise_timestep"])


def test_probe_scalars_readable_with_event_accumulator(runs):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    run = runs("single")
    logs = run / "logs" / "finetune"
    events = EventAccumulator(str(logs))
    events.Reload()
    rows = probe_rows(run)
    factors = sorted({r["dup_factor"] for r in rows})
    # one TensorBoard run per duplication factor, all with the same tags: one card per quantity, a line per factor
    assert sorted(p.name for p in logs.iterdir() if p.is_dir()) == sorted(f"dup_{dup}" for dup in factors)
    for dup in factors:
        factor_events = EventAccumulator(str(logs / f"dup_{dup}"))
        factor_events.Reload()
        scalars = factor_events.Scalars("probe/loss_cfg_7.5")
        assert [s.step for s in scalars] == list(range(0, STEPS + 1, EVERY))
        for s in scalars:
            values = [r["loss_cfg_7.5"] for r in rows if r["step"] == s.step and r["dup_factor"] == dup]
            assert s.value == pytest.approx(sum(values) / len(values), rel=1e-5)
        assert len(factor_events.Scalars("probe_high/k_cfg_7.5")) == len(scalars)
        assert [s.step for s in factor_events.Scalars("warning/score")] == list(range(0, STEPS + 1, EVERY))
        assert len(factor_events.Scalars("warning/alarm_fraction")) == len(range(0, STEPS + 1, EVERY))
    assert not any(tag.startswith(("probe", "warning/score")) for tag in events.Tags()["scalars"])
    assert [s.step for s in events.Scalars("train/loss")] == list(range(2, STEPS + 1, 2))  # logging_steps 2
    assert "validation/0" in events.Tags()["images"]
    assert "warning/top_samples/text_summary" in events.Tags()["tensors"]


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
    assert warning_rows(run) == warning_rows(reference)  # each warning once, as the uninterrupted run wrote it


def test_ddp_wen_filter_with_a_fully_filtered_process_does_not_hang(tiny_model_dir, tiny_dataset_dir, tmp_path):
    """Threshold 0 filters every example with a caption (||e_c - e_0|| > 0) and keeps the caption-dropped
    ones (e_c = e_0): with one example per process, some steps have one process entirely filtered while
    the other trains. Both still run their backward, so DDP's all-reduce completes."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    run = launch("ddp", tiny_model_dir, tiny_dataset_dir, tmp_path / "wen", "--mitigation_wen_threshold", 0,
                 "--proportion_empty_prompts", 0.5, "--train_batch_size", 1, "--probe_steps", 0,
                 "--adam_weight_decay", 0, "--logging_steps", 1)
    events = EventAccumulator(str(run / "logs" / "finetune")).Reload()
    fully = [s.value for s in events.Scalars("train/wen_fully_filtered_processes")]
    share = [s.value for s in events.Scalars("train/wen_filtered_share")]
    assert len(fully) == STEPS and 1.0 in fully  # a step where exactly one process had nothing to learn from
    assert all(s == pytest.approx(f / 2) for s, f in zip(share, fully))  # batch 1: share = fully filtered / 2
    base, trained = unet_weights(tiny_model_dir / "unet"), unet_weights(run / "unet")
    assert all(torch.isfinite(t).all() for t in trained.values())
    changed = [k for k in base if not torch.equal(base[k], trained[k])]
    assert bool(changed) == any(s < 1 for s in share)  # weights move once some process kept an example


def free_port() -> int:
    """A TCP port free on the loopback interface now."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def launch_nodes(args_of_rank, env: dict, logs: Path) -> None:
    """Start one `accelerate launch` per node (machine_rank 0 and 1) at once; both must succeed."""
    logs.mkdir(parents=True, exist_ok=True)
    processes = []
    for rank in (0, 1):
        with open(logs / f"node{rank}.log", "w") as log:
            processes.append(subprocess.Popen(args_of_rank(rank), cwd=ROOT, env=env, stdout=log,
                                              stderr=subprocess.STDOUT))
    try:
        codes = [process.wait(timeout=600) for process in processes]
    finally:
        for process in processes:
            process.kill()
    tails = "".join((logs / f"node{rank}.log").read_text()[-3000:] for rank in (0, 1))
    assert codes == [0, 0], tails


def on_two_nodes(launcher: list[str], mode: str, port: int) -> callable:
    """The launcher's arguments for node `rank` of 2, one process each, rendezvous on 127.0.0.1:port."""
    def for_rank(rank: int) -> list[str]:
        args = list(launcher)
        where = args.index("--num_machines")
        args[where + 1: where + 2] = ["2", "--machine_rank", str(rank), "--main_process_ip", "127.0.0.1",
                                      "--main_process_port", str(port)]
        if mode == "zero2":  # accelerate's default multi-node DeepSpeed launcher is pdsh over ssh
            args[where:where] = ["--deepspeed_multinode_launcher", "standard"]
        return args
    return for_rank


def train_on_two_nodes(mode: str, model, data, output_dirs: tuple[Path, Path], *extra) -> None:
    """finetune.py on two nodes; node r writes to output_dirs[r] (the same folder when the nodes share one)."""
    port = free_port()
    per_node = [command(mode, model, data, folder, *extra) for folder in output_dirs]

    def args_of_rank(rank):
        return on_two_nodes(per_node[rank][0], mode, port)(rank)

    launch_nodes(args_of_rank, per_node[0][1], output_dirs[0].parent / f"{output_dirs[0].name}-logs")


def checkpoint_files(checkpoint: Path) -> list[str]:
    """Relative paths of the files of a checkpoint folder."""
    return sorted(str(p.relative_to(checkpoint)) for p in checkpoint.rglob("*") if p.is_file())


def trained_weights(folder: Path, mode: str) -> dict:
    """The trained tensors a run or checkpoint folder holds: LoRA adapters (ddp) or the UNet (zero2)."""
    return load_file(str(folder / "pytorch_lora_weights.safetensors")) if mode == "ddp" else unet_weights(folder / "unet")


def assert_same_weights(a: dict, b: dict) -> None:
    """Equal tensors under the same names."""
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


@pytest.fixture(scope="module")
def two_node_runs(runs, tiny_model_dir, tiny_dataset_dir, tmp_path_factory):
    """Lazily, once per test run: mode -> a run trained on two nodes sharing its folder, stopped after checkpoint-4,
    then resumed."""
    cache = {}

    def train(mode: str, run: Path) -> None:
        flags = runs.extra[mode][1:]
        train_on_two_nodes(mode, tiny_model_dir, tiny_dataset_dir, (run, run), *flags, "--max_train_steps", 4)
        assert not (run / "checkpoint-6").exists() and (run / "checkpoint-4").is_dir()
        train_on_two_nodes(mode, tiny_model_dir, tiny_dataset_dir, (run, run), *flags,
                           "--resume_from_checkpoint", "latest")

    def get(mode: str) -> Path:
        if mode not in cache:
            cache[mode] = built_once(tmp_path_factory, f"two-nodes-{mode}", lambda run: train(mode, run))
        return cache[mode]
    return get


@pytest.mark.parametrize("mode", ["ddp", "zero2"])
def test_two_nodes_sharing_a_folder_train_checkpoint_and_resume_like_one_node(runs, two_node_runs, mode):
    run, reference = two_node_runs(mode), runs(mode)
    for step in (2, 4, 6):
        checkpoint = run / f"checkpoint-{step}"
        # Complete and written once: the same files as the one-node run's, no leftover temporary folder.
        assert checkpoint_files(checkpoint) == checkpoint_files(reference / f"checkpoint-{step}")
        assert json.loads((checkpoint / "training_state.json").read_text())["num_processes"] == 2
        assert_same_weights(trained_weights(checkpoint, mode), trained_weights(reference / f"checkpoint-{step}", mode))
    assert not list(run.glob("*.tmp"))
    assert_same_weights(trained_weights(run, mode), trained_weights(reference, mode))
    assert probe_rows(run) == probe_rows(reference)


def test_two_node_sharded_evaluation_equals_one_process(runs, two_node_runs, tmp_path):
    """Evaluation sharded over two nodes, of the run trained on two nodes, equals one process evaluating
    the one-node run (evaluation is plain data parallel whatever trained the run; DDP's run here)."""
    import numpy as np
    import pandas as pd

    evaluate = ["eval/evaluate_checkpoints.py", "--checkpoints", "6", "--num_seeds", "2", "--num_inference_steps",
                "2", "--bootstrap", "20"]
    two_nodes, one = tmp_path / "two_nodes", tmp_path / "one"
    launcher, _ = MODES["ddp"]  # evaluation is plain data parallel whatever trained the run
    port = free_port()
    launch_nodes(lambda rank: [*on_two_nodes(launcher, "ddp", port)(rank), *evaluate, "--run_dir",
                               str(two_node_runs("ddp")), "--output_dir", str(two_nodes), "--logging_dir",
                               str(two_nodes / "tb")],
                 {**os.environ, "OMP_NUM_THREADS": "1", "ACCELERATE_USE_CPU": "1"}, tmp_path / "logs")
    done = subprocess.run([sys.executable, *evaluate, "--run_dir", str(runs("ddp")), "--output_dir", str(one),
                           "--logging_dir", str(one / "tb")],
                          cwd=ROOT, env={**os.environ, "OMP_NUM_THREADS": "1"}, capture_output=True, text=True,
                          timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    for table in ("per_seed.csv", "per_sample.csv"):
        a, b = pd.read_csv(one / table), pd.read_csv(two_nodes / table)
        assert list(a.columns) == list(b.columns) and len(a) == len(b) > 0
        numeric = a.select_dtypes("number").columns
        np.testing.assert_allclose(b[numeric].to_numpy(float), a[numeric].to_numpy(float), rtol=1e-3, atol=1e-4)


def test_save_on_each_node_writes_a_checkpoint_per_node_and_resumes(runs, tiny_model_dir, tiny_dataset_dir):
    """ZeRO-2 on two nodes that share no folder: each node's first process writes its own checkpoints
    (its optimizer shard, its random states, and the model states DeepSpeed needs to resume)."""
    reference = runs("zero2")
    nodes = (runs.base / "zero2-node0", runs.base / "zero2-node1")
    train_on_two_nodes("zero2", tiny_model_dir, tiny_dataset_dir, nodes, "--save_on_each_node", "--max_train_steps", 4)
    for rank, node in enumerate(nodes):
        files = checkpoint_files(node / "checkpoint-4")
        assert {"training_state.json", "unet/diffusion_pytorch_model.safetensors", f"random_states_{rank}.pkl",
                "pytorch_model/mp_rank_00_model_states.pt",
                f"pytorch_model/zero_pp_rank_{rank}_mp_rank_00_optim_states.pt"} <= set(files)
        assert f"random_states_{1 - rank}.pkl" not in files  # the other node's state is on the other node
    train_on_two_nodes("zero2", tiny_model_dir, tiny_dataset_dir, nodes, "--save_on_each_node",
                       "--resume_from_checkpoint", "latest")
    for node in nodes:
        assert_same_weights(unet_weights(node / "unet"), unet_weights(reference / "unet"))
        assert_same_weights(unet_weights(node / "checkpoint-6" / "unet"), unet_weights(reference / "checkpoint-6" / "unet"))
    assert probe_rows(nodes[0]) == probe_rows(reference) and not (nodes[1] / "probes.jsonl").exists()
