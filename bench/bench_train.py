"""Overhead of train/finetune.py against a bare training loop, and the share of time spent in probes.

    python bench/bench_train.py [--steps 20] [--rounds 3] [--batch 8] [--threads 2]

One process, same tiny model, data, batch and threads for every figure:
1. per-step time of finetune.py with probes and checkpoints off (wall-time gaps between its
   per-step TensorBoard events: whole loop iterations), against a bare loop over the same batches: VAE encode,
   text encode, UNet forward + backward, AdamW step (target ratio <= 1.05); and the same run reading the
   loss back to the host every step (`--logging_steps 1`, as the loop did on every micro-step before)
   against the default `--logging_steps 10` (a CPU executes eagerly, so little change is expected there);
2. the time of one probe pass of finetune.py (all probe samples x timesteps x guidance, timed
   around its `run_probes`), as a share of training time at the default probe interval
   (target <= 5%);
3. the early warning's cost per probe step (scoring, warnings.jsonl, timed around its
   `EarlyWarningLog` call) against that probe pass: the first call includes the one-off
   simulation of the alarm threshold for the run's null size.
"""
from __future__ import annotations

import argparse
import statistics
import tempfile
import time
from pathlib import Path

import torch


def reset_accelerate() -> None:
    """Fresh accelerate singletons, as in a new process."""
    from accelerate.state import AcceleratorState, GradientState, PartialState

    AcceleratorState._reset_state(True)
    GradientState._reset_state()
    PartialState._reset_state()


def step_times_from_events(run: Path) -> list[float]:
    """Seconds per optimizer step of a run: wall-time gaps between its `train/loss` events over the steps between."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    events = EventAccumulator(str(run / "logs" / "finetune"))
    events.Reload()
    scalars = events.Scalars("train/loss")
    return [(b.wall_time - a.wall_time) / (b.step - a.step) for a, b in zip(scalars, scalars[1:])]


def bare_loop(model_dir: Path, data_dir: Path, steps: int, batch: int) -> list[float]:
    """Seconds per step of the minimal loop on the same rows, with the same loss and optimizer settings."""
    import torch.nn.functional as F
    from mem_analysis.data import image_to_tensor, load_study_dataset, resize_and_crop
    from mem_analysis.sd import load_components, tokenize

    parts = load_components(str(model_dir))
    train = load_study_dataset(data_dir)["train"]
    resolution = train[0]["image"].size[0]
    unet, scheduler = parts.unet.train(), parts.noise_scheduler
    optimizer = torch.optim.AdamW(unet.parameters(), lr=1e-4, weight_decay=1e-2)
    generator = torch.Generator().manual_seed(0)
    times = []
    for step in range(steps):
        start = time.perf_counter()
        rows = [train[(step * batch + i) % len(train)] for i in range(batch)]
        pixels = torch.stack([image_to_tensor(resize_and_crop(r["image"], resolution)) for r in rows])
        ids = tokenize(parts.tokenizer, [r["text"] for r in rows])
        with torch.no_grad():
            latents = parts.vae.encode(pixels).latent_dist.sample(generator) * parts.vae.config.scaling_factor
            hidden = parts.text_encoder(ids)[0]
        noise = torch.randn(latents.shape, generator=generator)
        t = torch.randint(0, scheduler.config.num_train_timesteps, (batch,), generator=generator)
        loss = F.mse_loss(unet(scheduler.add_noise(latents, noise, t), t, hidden).sample, noise)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(unet.parameters(), 1.0)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        times.append(time.perf_counter() - start)
    return times


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--steps", type=int, default=20, help="steps per loop and round")
    parser.add_argument("--rounds", type=int, default=3, help="alternations of bare loop and finetune.py")
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--warmup", type=int, default=5, help="steps left out of each median")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)

    from data_scripts import build_duplicated_dataset
    from mem_analysis.presets import build_pipeline
    from train import finetune
    from train.finetune_config import FLAGS

    work = Path(tempfile.mkdtemp(prefix="bench_train_"))
    model_dir, data_dir = work / "model", work / "data"
    build_pipeline("tiny", seed=0).save_pretrained(model_dir)
    build_duplicated_dataset.main(["--output_dir", str(data_dir), "--source", "twemoji", "--max_images", "48",
                                   "--dup_factors", "1,4,8", "--samples_per_factor", "2", "--resolution", "32",
                                   "--seed", "0"])
    common = ["--pretrained_model_name_or_path", str(model_dir), "--train_data_dir", str(data_dir),
              "--train_batch_size", str(args.batch), "--checkpointing_steps", "0", "--mixed_precision", "no"]

    # Rounds alternate the two loops so that a change in machine load hits both alike.
    bare, script, deferred = [], [], []
    for round_index in range(args.rounds):
        bare += bare_loop(model_dir, data_dir, args.steps, args.batch)[args.warmup:]
        for logging_steps, times in ((1, script), (10, deferred)):
            run = work / f"noprobe{round_index}_log{logging_steps}"
            finetune.main([*common, "--output_dir", str(run), "--max_train_steps", str(args.steps),
                           "--probe_steps", "0", "--logging_steps", str(logging_steps)])
            reset_accelerate()
            # With logging_steps 10 each gap covers 10 steps, all of them past the warm-up.
            times += step_times_from_events(run)[args.warmup // logging_steps:]

    probe_times, run_probes = [], finetune.run_probes

    def timed_run_probes(*a, **k):
        start = time.perf_counter()
        rows = run_probes(*a, **k)
        probe_times.append(time.perf_counter() - start)
        return rows

    finetune.run_probes = timed_run_probes
    warning_times, warn_call = [], finetune.EarlyWarningLog.__call__

    def timed_warning(self, rows):
        start = time.perf_counter()
        out = warn_call(self, rows)
        warning_times.append(time.perf_counter() - start)
        return out

    finetune.EarlyWarningLog.__call__ = timed_warning
    probe_every = 5
    finetune.main([*common, "--output_dir", str(work / "probe"), "--max_train_steps", str(3 * probe_every),
                   "--probe_steps", str(probe_every)])
    reset_accelerate()
    finetune.run_probes = run_probes
    finetune.EarlyWarningLog.__call__ = warn_call

    default_interval = FLAGS["probe_steps"][0]
    step_s, bare_s, probe_s = statistics.median(script), statistics.median(bare), statistics.median(probe_times)
    share = probe_s / (probe_s + default_interval * step_s)
    n_probe = 8 * len(FLAGS["probe_timesteps"][0])
    print(f"tiny model, batch {args.batch}, {args.threads} threads, {args.rounds} rounds x {args.steps} steps "
          f"(medians, {args.warmup} warm-up steps left out per round)")
    print(f"  finetune.py step, probes off, loss read every step: {step_s * 1e3:8.2f} ms   (mean {statistics.mean(script) * 1e3:.2f})")
    print(f"  bare loop step               : {bare_s * 1e3:8.2f} ms   (mean {statistics.mean(bare) * 1e3:.2f})")
    print(f"  ratio finetune / bare        : {step_s / bare_s:8.3f}    (target <= 1.05)")
    deferred_s = statistics.median(deferred)
    print(f"  finetune.py step, loss read every 10 steps: {deferred_s * 1e3:8.2f} ms; ratio to reading every "
          f"step {deferred_s / step_s:.3f}")
    print(f"  one probe pass ({n_probe} sample x timestep pairs, {len(FLAGS['probe_guidance_scales'][0])} "
          f"guidance scales): {probe_s * 1e3:.1f} ms = {probe_s / step_s:.1f} training steps")
    print(f"  probe share at default probe_steps={default_interval}: {100 * share:.2f} %   (target <= 5%)")
    warning_s = statistics.median(warning_times[1:])
    print(f"  early warning per probe step : {warning_s * 1e3:.2f} ms = {100 * warning_s / probe_s:.2f} % of a probe "
          f"pass (first call, threshold simulation included: {warning_times[0] * 1e3:.1f} ms)")


if __name__ == "__main__":
    main()
