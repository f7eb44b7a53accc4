"""The figures of a checkpoint evaluation's report.md (matplotlib, Agg, PNGs written atomically): severity over
training, deviation against severity, the decomposition against both schedules, the probe losses, generated next
to training images, L_g per timestep, and the early-warning score over training."""
from __future__ import annotations

from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
import pandas as pd  # noqa: E402

from eval.tables import fmt_corr, last_checkpoint_rows  # noqa: E402
from mem_analysis import verdicts  # noqa: E402
from mem_analysis.decomposition import reference_schedule  # noqa: E402
from mem_analysis.io import atomic_path  # noqa: E402


def save_figure(fig, path: Path):
    """Save a PNG atomically and close the figure."""
    with atomic_path(path) as tmp:
        fig.savefig(tmp, dpi=110, bbox_inches="tight")
    plt.close(fig)


def by_dup_over_steps(ax, table: pd.DataFrame, column: str, label_fmt: str = "dup {}", style: str = "-o"):
    """Mean of a column per duplication factor against step."""
    for dup, rows in table.groupby("dup_factor"):
        mean = rows.groupby("checkpoint_step")[column].mean()
        ax.plot(mean.index, mean.values, style, label=label_fmt.format(dup), ms=3)


def draw_figures(eval_dir: Path, per_sample: pd.DataFrame, summary: dict, settings: dict) -> dict[str, str]:
    """Severity over training, deviation vs severity, the decomposition schedule, the probe losses and the
    generated images at the last checkpoint, under eval_dir/figures; returns {name: file name}."""
    fig_dir = eval_dir / "figures"
    fig_dir.mkdir(exist_ok=True)
    g = settings["guidance_scale"]
    table = per_sample[per_sample["guidance_scale"] == g]
    last, at_last = last_checkpoint_rows(per_sample, g)
    names = {}

    fig, ax = plt.subplots(figsize=(5, 3.5))
    by_dup_over_steps(ax, table, "severity")
    ax.axhline(settings["threshold"], color="grey", ls=":", label="threshold")
    ax.set(xlabel="training step", ylabel=f"severity ({settings['severity_backend']})", title=f"g = {g:g}")
    ax.legend(fontsize=7)
    save_figure(fig, fig_dir / "severity_over_training.png")
    names["severity"] = "severity_over_training.png"

    fig, axes = plt.subplots(1, 2, figsize=(9, 3.5))
    for ax, col in zip(axes, ("D_x", "D_T")):
        for dup, rows in at_last.groupby("dup_factor"):
            ax.scatter(rows["severity"], rows[col], s=14, label=f"dup {dup}")
        c = summary["checkpoints"][str(last)][f"{g:g}"]["correlations"][col]["pearson"]
        ax.set(xlabel="severity", ylabel=f"{col} (paper schedule)", title=f"step {last}: Pearson {fmt_corr(c)}")
        ax.title.set_fontsize(8)
    axes[0].legend(fontsize=7)
    save_figure(fig, fig_dir / "deviation_vs_severity.png")
    names["deviation"] = "deviation_vs_severity.png"

    curves = np.load(eval_dir / "curves" / f"step-{last}.npz")
    pick = curves["guidance_scale"] == g
    ids = curves["sample_id"][pick]
    sev = at_last.set_index("sample_id").loc[ids, "severity"].to_numpy()
    memorized, plain = ids[np.argmax(sev)], ids[np.argmin(sev)]
    fig, axes = plt.subplots(1, 2, figsize=(9, 3.5))
    ab = curves["alpha_bar"][pick][0]
    t = curves["timesteps"][pick][0]
    for ref, ls in (("paper", "--"), ("exact", ":")):
        w_x, w_T = reference_schedule(ab, reference=ref)
        axes[0].plot(t, w_x, "k" + ls, label=f"theory ({ref})")
        axes[1].plot(t, w_T, "k" + ls, label=f"theory ({ref})")
    for sid, name in ((memorized, "most memorized"), (plain, "least memorized")):
        k = np.where(ids == sid)[0][0]
        axes[0].plot(t, curves["w_x"][pick][k], label=f"{name} (id {sid})")
        axes[1].plot(t, curves["w_T"][pick][k], label=f"{name} (id {sid})")
    for ax, name in zip(axes, ("w_x", "w_T")):
        ax.set(xlabel="timestep t", ylabel=name, title=f"step {last}, g = {g:g}")
        ax.invert_xaxis()
        ax.legend(fontsize=7)
    save_figure(fig, fig_dir / "decomposition_schedule.png")
    names["schedule"] = "decomposition_schedule.png"

    fig, axes = plt.subplots(1, 2, figsize=(9, 3.5))
    for ax, window, title in ((axes[0], "", "all probe timesteps"), (axes[1], "_early", f"t >= {settings['high_noise_timestep']}")):
        by_dup_over_steps(ax, table, f"loss_cond{window}", "L_c dup {}", "-o")
        ax.set_prop_cycle(None)
        by_dup_over_steps(ax, table, f"loss_cfg{window}", f"L_g={g:g} dup {{}}", "--s")
        ax.set(xlabel="training step", ylabel="probe loss", title=title, yscale="log")
        ax.legend(fontsize=6)
    save_figure(fig, fig_dir / "losses_over_training.png")
    names["losses"] = "losses_over_training.png"

    generated = np.load(eval_dir / "images" / f"step-{last}.npz")
    training = np.load(eval_dir / "images" / "training.npz")
    train_of = {int(s): im for s, im in zip(training["sample_id"], training["images"])}
    order = at_last.sort_values("dup_factor", ascending=False)["sample_id"].tolist()[:16]
    gen_of = {int(s): im for s, im in zip(generated["sample_id"], generated["images"])}
    fig, axes = plt.subplots(2, len(order), figsize=(1.1 * len(order), 2.6), squeeze=False)
    for k, sid in enumerate(order):
        row = at_last[at_last["sample_id"] == sid].iloc[0]
        axes[0, k].imshow(train_of[sid])
        axes[1, k].imshow(gen_of[sid])
        axes[0, k].set_title(f"dup {row['dup_factor']}", fontsize=6)
        axes[1, k].set_title(f"sev {row['severity']:.2f}", fontsize=6)
        for ax in axes[:, k]:
            ax.axis("off")
    fig.suptitle(f"training image (top) and seed-0 generation (bottom), step {last}, g = {g:g}", fontsize=7)
    save_figure(fig, fig_dir / "generated_vs_training.png")
    names["images"] = "generated_vs_training.png"
    return names


def loss_curve_figure(eval_dir: Path, at_last: pd.DataFrame, settings: dict, last: int) -> str | None:
    """Per-timestep L_g (x0 and epsilon space) at the last checkpoint, memorized vs not (finding 1's curve)."""
    curves = np.load(eval_dir / "curves" / f"step-{last}.npz")
    g = settings["guidance_scale"]
    if "probe_loss_cfg_x0" not in curves:
        return None
    pick = curves["guidance_scale"] == g
    ids, t = curves["sample_id"][pick], curves["probe_timesteps"][pick][0]
    memorized = verdicts.memorized_labels(at_last.set_index("sample_id").loc[ids])
    fig, axes = plt.subplots(1, 2, figsize=(9, 3.5))
    for ax, key, space in ((axes[0], "probe_loss_cfg_x0", "x0 space: ||x - x0hat(e_g)||^2"),
                           (axes[1], "probe_loss_cfg", "epsilon space: ||eps - e_g||^2")):
        values = curves[key][pick]
        for group, name, color in ((memorized, "memorized", "C3"), (~memorized, "not memorized", "C0")):
            if group.any():
                ax.plot(t, values[group].T, color=color, alpha=0.25, lw=0.8)
                ax.plot(t, values[group].mean(0), color=color, lw=2, label=f"{name} (n = {int(group.sum())})")
        ax.axvspan(settings["high_noise_timestep"], t.max(), color="grey", alpha=0.1, label="finding-1 window")
        ax.set(xlabel="timestep t", ylabel=f"L_g, g = {g:g}", title=space, yscale="log")
        ax.title.set_fontsize(8)
        ax.legend(fontsize=6)
    save_figure(fig, eval_dir / "figures" / "loss_per_timestep.png")
    return "loss_per_timestep.png"
