"""The arena: runs (mitigations) and guidance schedules side by side, from each run's own eval tables.

    python eval/compare_runs.py RUN [RUN ...] --output_dir OUT [--bootstrap 1000]

Every `RUN/eval*/` folder holding per_sample.csv, settings.json and summary.json (written by
evaluate_checkpoints.py; one folder per guidance schedule) gives one row per (run, schedule), at the
run's last evaluated checkpoint and its headline guidance scale:
- memorization: per duplication factor the memorized fraction (mean over samples of the share of seeds
  labelled memorized, by the run's label: copies by default) with a 95% bootstrap interval over samples, the
  number of samples that became memorized and their median onset step (summary.json), and D_x_early;
- cost: the conditional probe loss `loss_cond` and the seeds' `diversity` of the never-duplicated
  (dup_factor 1) samples, mean with a 95% interval; and `mmd_pixels`, the unbiased MMD^2 (Gaussian
  kernel, bandwidth = median pairwise distance of the training images) between the generated images of
  the never-duplicated samples (the eval's seed-0 image, images/step-N.npz) and the dataset's unique
  training images, both average-pooled to 16 x 16 pixels in [0, 1]. No model is downloaded; with
  --feature_model (a TorchScript embedder the user supplies) also `frechet_features` (FID's formula,
  FID itself when the embedder is Inception's pool features) and `mmd_features` in its feature space.
Writes OUT/comparison.csv (one row per run and schedule), OUT/by_dup_factor.csv,
OUT/memorization_vs_cost.png and OUT/report.md; with Wen's filter, the share of training examples it
filtered (mean over logged steps of train/wen_filtered_share in the run's TensorBoard events), per duplication
factor (`wen_filtered_<F>x`, from the runs logs/finetune/dup_F) over the whole run and after the median onset
of the most duplicated samples in the unmitigated run (`wen_filtered_<F>x_after_onset`, from step
`wen_onset_step`: the unmitigated run's, else the run's own).
"""
from __future__ import annotations

import argparse
import json
import math
import os
import shutil
import sys
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
import pandas as pd  # noqa: E402
import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402

from eval.tables import fmt, last_checkpoint_rows  # noqa: E402
from mem_analysis.cli import run_command  # noqa: E402
from mem_analysis.data import load_study_dataset  # noqa: E402
from mem_analysis.io import atomic_path, replace_marked_block, write_text_atomic  # noqa: E402
from mem_analysis.run import read_config  # noqa: E402
from mem_analysis.severity import embed_images, load_sscd  # noqa: E402
from mem_analysis.stats import frechet_distance, mean_interval, median_distance, mmd_squared  # noqa: E402

MITIGATION_FLAGS = {"mitigation_wen_threshold": None, "mitigation_wen_thresholds": None, "caption_augmentation": None, "text_embedding_noise": 0.0,
                    "dedup_sampling": False}
POOLED_SIZE = 16
WEN_TARGET = (0.5, 0.05)  # Wen's filter does its job: >= half the top-factor rows, <= 5 % of 1x rows after onset


class CompareError(Exception):
    """Bad input: reported as one line, exit status 2."""


def parse_args(argv=None):
    """Command-line flags."""
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("runs", nargs="+", help="train/finetune.py output folders, each evaluated (RUN/eval*/)")
    p.add_argument("--output_dir", required=True, help="folder for the table, figure and report.md")
    p.add_argument("--bootstrap", type=int, default=1000, help="bootstrap resamples of the intervals")
    p.add_argument("--feature_model", default=None,
                   help="TorchScript image embedder (e.g. a CLIP or Inception image tower, ImageNet-normalized "
                        "input): adds the Frechet distance and MMD^2 in its feature space")
    p.add_argument("--feature_size", type=int, default=224, help="input size of --feature_model")
    p.add_argument("--publish", default=None,
                   help="also copy the outputs to this folder (data_scripts/arena.sh: docs/arena)")
    p.add_argument("--readme", default=None, help="with --publish: put the main table into this README's arena block")
    return p.parse_args(argv)


def mitigation_label(config: dict) -> str:
    """The run's training-time mitigations as flag=value, or 'none'."""
    parts = []
    for flag, off in MITIGATION_FLAGS.items():
        value = config.get(flag, off)
        if value != off and value is not None:
            extra = f" p={config.get('caption_augmentation_p')}" if flag == "caption_augmentation" else ""
            parts.append(flag if value is True else f"{flag}={value}{extra}")
    return ", ".join(parts) or "none"


def eval_folders(run: Path) -> list[Path]:
    """The run's evaluation folders (each with per_sample.csv, settings.json, summary.json)."""
    needed = ("per_sample.csv", "settings.json", "summary.json")
    found = sorted(f for f in run.glob("eval*") if f.is_dir() and all((f / n).is_file() for n in needed))
    if not found:
        raise CompareError(f"{run} has no evaluated folder (eval*/ with {', '.join(needed)}); "
                           "run eval/evaluate_checkpoints.py --run_dir on it first")
    return found


def pooled_pixels(images: np.ndarray) -> np.ndarray:
    """(N, H, W, 3) uint8 -> (N, 3 * 16 * 16) float64 in [0, 1], average-pooled to 16 x 16."""
    x = torch.from_numpy(np.asarray(images)).permute(0, 3, 1, 2).double() / 255.0
    return F.adaptive_avg_pool2d(x, POOLED_SIZE).flatten(1).numpy()


def training_images(dataset: str, cache: dict) -> np.ndarray:
    """The dataset's unique training images, (N, H, W, 3) uint8 (cached per dataset)."""
    if dataset not in cache:
        try:
            train = load_study_dataset(dataset)["train"]
        except (FileNotFoundError, ValueError) as err:
            raise CompareError(f"cannot open the training set {dataset} named in settings.json ({err})") from None
        _, first = np.unique(np.asarray(train["sample_id"]), return_index=True)
        cache[dataset] = np.stack([np.asarray(im.convert("RGB"))
                                   for im in train.select(sorted(first.tolist()))["image"]])
    return cache[dataset]


def model_features(images: np.ndarray, model, size: int) -> np.ndarray:
    """(N, H, W, 3) uint8 -> (N, D) descriptors of the feature model."""
    pixels = torch.from_numpy(np.asarray(images)).permute(0, 3, 1, 2).float() / 255.0
    return embed_images(pixels, model, size).double().numpy()


def interval(values, n_boot: int) -> dict:
    """{'mean', 'low', 'high'} of the values (95% bootstrap over the values)."""
    mean, low, high = mean_interval(values, n_boot)
    return dict(mean=mean, low=low, high=high)


def compare_one(run: Path, folder: Path, n_boot: int, cache: dict, feature=None) -> tuple[dict, list[dict]]:
    """The comparison row of one (run, eval folder) and its per-duplication-factor rows."""
    settings = json.loads((folder / "settings.json").read_text())
    summary = json.loads((folder / "summary.json").read_text())
    config = read_config(run) if (run / "config.yaml").is_file() else {}
    table = pd.read_csv(folder / "per_sample.csv")
    step, last = last_checkpoint_rows(table, settings["guidance_scale"])
    table = table[table["guidance_scale"] == settings["guidance_scale"]]
    onset = pd.DataFrame(summary["onset"].values())
    timeline = table["checkpoint_step"].nunique() > 1  # an onset step needs checkpoints before the last
    row = dict(run=run.name, mitigation=mitigation_label(config),
               schedule=settings.get("guidance_schedule", "constant"),
               eval_dir=str(folder), guidance_scale=settings["guidance_scale"], step=step,
               max_train_steps=config.get("max_train_steps"), seeds=len(settings["seeds"]))
    by_dup = []
    for dup, rows in last.groupby("dup_factor"):
        frac = interval(rows["memorized_fraction"].to_numpy(float), n_boot)
        onsets = onset[onset["dup_factor"] == dup]["onset_step"].dropna().astype(float)
        entry = dict(run=run.name, schedule=row["schedule"], dup_factor=int(dup), n_samples=len(rows),
                     memorized_fraction=frac["mean"], ci_low=frac["low"], ci_high=frac["high"],
                     severity=float(rows["severity"].mean()), D_x_early=float(rows["D_x_early"].mean()),
                     crossed=int(len(onsets)),
                     median_onset_step=float(onsets.median()) if len(onsets) and timeline else math.nan)
        by_dup.append(entry)
        row.update({f"memorized_{dup}x": frac["mean"], f"memorized_{dup}x_low": frac["low"],
                    f"memorized_{dup}x_high": frac["high"], f"D_x_early_{dup}x": entry["D_x_early"],
                    f"crossed_{dup}x": entry["crossed"], f"median_onset_{dup}x": entry["median_onset_step"]})
    never = last[last["dup_factor"] == 1]
    for column in ("loss_cond", "diversity"):
        cost = interval(never[column].to_numpy(float), n_boot)
        row.update({f"{column}_1x": cost["mean"], f"{column}_1x_low": cost["low"], f"{column}_1x_high": cost["high"]})
    row.update(generated_distance(folder, step, set(never["sample_id"]), settings["dataset"], cache, feature))
    logdir = run / config.get("logging_dir", "logs") / "finetune"
    row["wen_filtered_share"] = training_series(logdir, "train/wen_filtered_share").mean()
    return row, by_dup


def top_fractions(row, top: int) -> pd.Series:
    """Per top-factor sample (sample_id), the memorized fraction at the row's step and guidance scale."""
    table = pd.read_csv(Path(row["eval_dir"]) / "per_sample.csv")
    pick = ((table["guidance_scale"] == row["guidance_scale"]) & (table["checkpoint_step"] == row["step"])
            & (table["dup_factor"] == top))
    return table[pick].set_index("sample_id")["memorized_fraction"].astype(float)


def add_differences(comparison: pd.DataFrame, top: int, n_boot: int) -> pd.DataFrame:
    """`memorized_<top>x_vs_none` (+ `_low`, `_high`): the mean over the top-factor samples of (this run's memorized
    fraction - the unmitigated run's under the same schedule), the same probe samples in both, with a 95% bootstrap
    interval resampling the samples (paired: each resampled sample brings both of its values)."""
    comparison = comparison.copy()
    column = f"memorized_{top}x_vs_none"
    for schedule, rows in comparison.groupby("schedule"):
        reference = rows[rows["mitigation"] == "none"]
        if reference.empty:
            continue
        base = top_fractions(reference.iloc[0], top)
        for index, row in rows.iterrows():
            own = top_fractions(row, top)
            common = own.index.intersection(base.index)
            diff = interval((own[common] - base[common]).to_numpy(float), n_boot)
            comparison.loc[index, [column, column + "_low", column + "_high"]] = [diff["mean"], diff["low"],
                                                                               diff["high"]]
    return comparison


def training_series(logdir: Path, tag: str) -> pd.Series:
    """A training scalar of the run's TensorBoard events by step (empty when not logged)."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    if not logdir.is_dir():
        return pd.Series(dtype=float)
    events = EventAccumulator(str(logdir), size_guidance={"scalars": 0}).Reload()
    if tag not in events.Tags().get("scalars", []):
        return pd.Series(dtype=float)
    return pd.Series({event.step: event.value for event in events.Scalars(tag)}, dtype=float).sort_index()


def wen_shares_by_factor(run: Path) -> dict[int, pd.Series]:
    """Per duplication factor F, train/wen_filtered_share by step from the run's logs/finetune/dup_F."""
    config = read_config(run) if (run / "config.yaml").is_file() else {}
    root = run / config.get("logging_dir", "logs") / "finetune"
    shares = {int(d.name[4:]): training_series(d, "train/wen_filtered_share") for d in sorted(root.glob("dup_*"))
              if d.name[4:].isdigit()}
    return {f: v for f, v in shares.items() if len(v)}


def add_wen_shares(comparison: pd.DataFrame, runs: list[Path], top: int) -> pd.DataFrame:
    """`wen_filtered_<F>x` (mean over logged steps) and `wen_filtered_<F>x_after_onset` (steps >= `wen_onset_step`,
    the median onset of the top-factor samples in the unmitigated run under constant guidance, else in the run
    itself) for every run that logged Wen's filter."""
    comparison = comparison.copy()
    reference = comparison[(comparison["mitigation"] == "none") & (comparison["schedule"] == "constant")]
    reference_onset = reference[f"median_onset_{top}x"].dropna()
    for run in runs:
        shares = wen_shares_by_factor(run)
        pick = comparison["run"] == run.name
        if not shares:
            continue
        own = comparison.loc[pick & (comparison["schedule"] == "constant"), f"median_onset_{top}x"].dropna()
        onset = float(reference_onset.iloc[0]) if len(reference_onset) else (float(own.iloc[0]) if len(own)
                                                                             else math.nan)
        comparison.loc[pick, "wen_onset_step"] = onset
        for factor, series in shares.items():
            comparison.loc[pick, f"wen_filtered_{factor}x"] = series.mean()
            late = series[series.index >= onset] if math.isfinite(onset) else series.iloc[:0]
            comparison.loc[pick, f"wen_filtered_{factor}x_after_onset"] = late.mean() if len(late) else math.nan
    return comparison


def generated_distance(folder: Path, step: int, sample_ids: set, dataset: str, cache: dict, feature=None) -> dict:
    """Distances between the never-duplicated samples' generated images at `step` and the unique training
    images: `mmd_pixels` (16 x 16 pooled pixels) and, with `feature` = (model, size), `frechet_features`
    and `mmd_features`; `mmd_n_generated` images were compared."""
    out = dict(mmd_pixels=math.nan, mmd_n_generated=0)
    path = folder / "images" / f"step-{step}.npz"
    if not path.is_file():
        return out
    saved = np.load(path)
    pick = np.isin(saved["sample_id"], sorted(sample_ids))
    out["mmd_n_generated"] = int(pick.sum())
    if pick.sum() < 2:
        return out
    generated, training = saved["images"][pick], training_images(dataset, cache)
    if (dataset, "pixels") not in cache:
        pooled = pooled_pixels(training)
        cache[dataset, "pixels"] = pooled, median_distance(pooled)
    pooled, bandwidth = cache[dataset, "pixels"]
    out["mmd_pixels"] = mmd_squared(pooled_pixels(generated), pooled, bandwidth)
    if feature is not None:
        model, size = feature
        if (dataset, "features") not in cache:
            features = model_features(training, model, size)
            cache[dataset, "features"] = features, median_distance(features)
        reference, bandwidth = cache[dataset, "features"]
        ours = model_features(generated, model, size)
        out.update(frechet_features=frechet_distance(ours, reference),
                   mmd_features=mmd_squared(ours, reference, bandwidth))
    return out


def with_ci(row, column: str, digits: int = 3) -> str:
    """'mean [low, high]' from the column and its _low/_high companions."""
    return f"{fmt(row[column], digits)} [{fmt(row[column + '_low'], digits)}, {fmt(row[column + '_high'], digits)}]"


def figure(comparison: pd.DataFrame, top: int, path: Path) -> None:
    """Memorized fraction of the most duplicated images against each cost, one point per run and schedule."""
    costs = [("loss_cond_1x", "probe loss L_c, never-duplicated"), ("diversity_1x", "diversity, never-duplicated"),
             ("mmd_pixels", "MMD^2 generated vs training (pixels)")]
    fig, axes = plt.subplots(1, len(costs), figsize=(5 * len(costs), 4))
    y = comparison[f"memorized_{top}x"]
    err = np.vstack([y - comparison[f"memorized_{top}x_low"], comparison[f"memorized_{top}x_high"] - y])
    for ax, (column, name) in zip(axes, costs):
        for schedule, marker in zip(sorted(comparison["schedule"].unique()), "os^vD"):
            pick = (comparison["schedule"] == schedule).to_numpy()
            ax.errorbar(comparison[column][pick], y[pick], yerr=err[:, pick], fmt=marker, capsize=3, label=schedule)
        for _, r in comparison.iterrows():
            ax.annotate(r["run"], (r[column], r[f"memorized_{top}x"]), fontsize=7, xytext=(3, 3),
                        textcoords="offset points")
        ax.set_xlabel(name)
        ax.set_ylabel(f"memorized fraction, {top}x images")
        ax.legend(fontsize=7)
    fig.tight_layout()
    tmp = path.with_name(f".{path.stem}.tmp.png")
    fig.savefig(tmp, dpi=110)
    plt.close(fig)
    os.replace(tmp, path)


def main_table(lines: list[str]) -> list[str]:
    """The report's first table: its lines from the header row to the first line that is not a row."""
    start = next(i for i, line in enumerate(lines) if line.startswith("| run | mitigation"))
    end = next((i for i in range(start, len(lines)) if not lines[i].startswith("|")), len(lines))
    return lines[start:end]


def vs_none(row, top: int) -> str:
    """'-0.250 [-0.400, -0.100]': the change of the top-factor memorized fraction against the unmitigated run."""
    column = f"memorized_{top}x_vs_none"
    if not math.isfinite(row.get(column, math.nan)) or row["mitigation"] == "none":
        return "-"
    return f"{row[column]:+.3f} [{fmt(row[column + '_low'])}, {fmt(row[column + '_high'])}]"


def wen_cell(row, top: int) -> str:
    """'0.620 / 0.040': the shares of top-factor and 1x rows Wen's filter removed after onset ('n/a' without it)."""
    values = [row.get(f"wen_filtered_{f}x_after_onset", math.nan) for f in (top, 1)]
    return " / ".join(fmt(v) for v in values)


def wen_lines(comparison: pd.DataFrame, factors: list[int]) -> list[str]:
    """Wen's filter per duplication factor: the share of training rows it removed, over the run and after onset."""
    columns = [f"wen_filtered_{d}x" for d in factors if f"wen_filtered_{d}x" in comparison]
    if not columns:
        return []
    filtered = comparison[comparison[columns].notna().any(axis=1)].drop_duplicates("run")
    lines = ["", "Wen's filter: share of the training rows of each duplication factor whose loss it removed (means of "
             "train/wen_filtered_share/dup_F over the logged steps), over the whole run / from the onset step on "
             "(the median onset of the most duplicated samples in the unmitigated run, else in the run itself). "
             "Rows whose caption was dropped for CFG have e_c = e_0 and are never filtered.", "",
             f"Target: at least {WEN_TARGET[0]:g} of the {max(factors)}x rows and at most {WEN_TARGET[1]:g} of the "
             "1x rows removed after onset.", "",
             "| run | onset step | " + " | ".join(f"{d}x" for d in factors) + " | target met |",
             "|---|---|" + "---|" * len(factors) + "---|"]
    for _, r in filtered.iterrows():
        cells = [f"{fmt(r.get(f'wen_filtered_{d}x', math.nan))} / {fmt(r.get(f'wen_filtered_{d}x_after_onset', math.nan))}"
                 for d in factors]
        top, never = (r.get(f"wen_filtered_{d}x_after_onset", math.nan) for d in (max(factors), 1))
        met = "n/a" if not (math.isfinite(top) and math.isfinite(never)) else \
            "yes" if top >= WEN_TARGET[0] and never <= WEN_TARGET[1] else "no"
        lines.append(f"| {r['run']} | {fmt(r.get('wen_onset_step', math.nan), 0)} | " + " | ".join(cells)
                     + f" | {met} |")
    return lines


def report_lines(comparison: pd.DataFrame, by_dup: pd.DataFrame, top: int) -> list[str]:
    """report.md: how it was measured, the main table and the per-factor table."""
    factors = sorted(by_dup["dup_factor"].unique())
    first = comparison.iloc[0]
    lines = ["# Mitigations compared", "",
             f"Each row: one run (training-time mitigation) evaluated under one guidance schedule, at its last "
             f"checkpoint, g = {first['guidance_scale']:g}, {first['seeds']} seeds. Memorized fraction: mean over "
             "samples of the share of seeds labelled memorized (each run's label in its settings.json: copies of "
             "the paired training image by default, docs/science.md M6), 95% bootstrap interval over samples; "
             "`vs none`: the mean change against the unmitigated run under the same schedule over the same samples, "
             "95% interval resampling the samples (paired). "
             "Costs on the never-duplicated samples: conditional probe loss L_c and seeds' diversity (mean "
             "[95% interval]); MMD^2 = unbiased squared maximum mean discrepancy, Gaussian kernel with the "
             "median-distance bandwidth of the training images, between generated images (one seed per "
             f"never-duplicated sample) and the unique training images, both average-pooled to "
             f"{POOLED_SIZE}x{POOLED_SIZE} pixels (lower = closer to the training distribution). Every number "
             "is read from the run's own per_sample.csv, summary.json and images/. The median onset step needs "
             "the checkpoints' timeline: an eval of the last checkpoint alone (data_scripts/arena.sh evaluates "
             "delayed guidance so) shows n/a.", "",
             f"| run | mitigation | schedule | step | memorized {top}x | vs none | crossed {top}x (median onset) | "
             f"D_x early {top}x | L_c 1x | diversity 1x | MMD^2 (n) | Wen filtered {top}x / 1x after onset |",
             "|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for _, r in comparison.iterrows():
        lines.append(f"| {r['run']} | {r['mitigation']} | {r['schedule']} | {r['step']} | "
                     f"{with_ci(r, f'memorized_{top}x')} | {vs_none(r, top)} | {r[f'crossed_{top}x']} "
                     f"({fmt(r[f'median_onset_{top}x'], 0)}) | {fmt(r[f'D_x_early_{top}x'])} | "
                     f"{with_ci(r, 'loss_cond_1x', 4)} | {with_ci(r, 'diversity_1x')} "
                     f"| {fmt(r['mmd_pixels'], 4)} ({r['mmd_n_generated']}) | {wen_cell(r, top)} |")
    lines += wen_lines(comparison, factors)
    if "frechet_features" in comparison:
        lines += ["", "In the feature space of --feature_model (generated never-duplicated vs unique training images):",
                  "", "| run | schedule | Frechet distance | MMD^2 |", "|---|---|---|---|"]
        lines += [f"| {r['run']} | {r['schedule']} | {fmt(r['frechet_features'])} | {fmt(r['mmd_features'], 4)} |"
                  for _, r in comparison.iterrows()]
    lines += ["", "![memorization against cost](memorization_vs_cost.png)", "",
              "Memorized fraction per duplication factor (95% interval):", "",
              "| run | schedule | " + " | ".join(f"{d}x" for d in factors) + " |", "|---|---|" + "---|" * len(factors)]
    for (run, schedule), rows in by_dup.groupby(["run", "schedule"], sort=False):
        cells = {int(r["dup_factor"]): f"{fmt(r['memorized_fraction'])} [{fmt(r['ci_low'])}, {fmt(r['ci_high'])}]"
                 for _, r in rows.iterrows()}
        lines.append(f"| {run} | {schedule} | " + " | ".join(cells.get(d, "n/a") for d in factors) + " |")
    return lines


PUBLISHED = ("report.md", "comparison.csv", "by_dup_factor.csv", "memorization_vs_cost.png")


def publish(out: Path, docs: Path, readme: str | None, table: list[str]) -> None:
    """The outputs copied to `docs`; the main table (with a link to the report) into the README's arena block."""
    for name in PUBLISHED:
        with atomic_path(docs / name) as tmp:
            shutil.copyfile(out / name, tmp)
    if readme:
        replace_marked_block(readme, "arena", "\n".join(table) + f"\n\nFull report: [{docs}/report.md]({docs}/report.md).\n")


def main(args) -> Path:
    runs = [Path(r) for r in args.runs]
    missing = [str(r) for r in runs if not r.is_dir()]
    if missing:
        raise CompareError(f"run folder(s) {', '.join(missing)} do not exist")
    if args.readme and (not args.publish or not Path(args.readme).is_file()
                        or Path(args.readme).read_text().count("<!-- arena:start -->") != 1):
        raise CompareError(f"--readme {args.readme} needs --publish and one <!-- arena:start --> / <!-- arena:end --> "
                           "block")
    rows, by_dup, cache = [], [], {}
    try:
        feature = (load_sscd(args.feature_model), args.feature_size) if args.feature_model else None
    except (FileNotFoundError, ValueError) as err:
        raise CompareError(f"--feature_model: {str(err).splitlines()[0]}") from None
    for run in runs:
        for folder in eval_folders(run):
            row, dup_rows = compare_one(run, folder, args.bootstrap, cache, feature)
            rows.append(row)
            by_dup += dup_rows
    comparison, by_dup = pd.DataFrame(rows), pd.DataFrame(by_dup)
    top = int(by_dup["dup_factor"].max())
    comparison = add_differences(add_wen_shares(comparison, runs, top), top, args.bootstrap)
    out = Path(args.output_dir)
    out.mkdir(parents=True, exist_ok=True)
    write_text_atomic(out / "comparison.csv", comparison.to_csv(index=False))
    write_text_atomic(out / "by_dup_factor.csv", by_dup.to_csv(index=False))
    figure(comparison, top, out / "memorization_vs_cost.png")
    lines = report_lines(comparison, by_dup, top)
    write_text_atomic(out / "report.md", "\n".join(lines) + "\n")
    print(f"wrote {out}/comparison.csv, by_dup_factor.csv, memorization_vs_cost.png and report.md")
    if args.publish:
        publish(out, Path(args.publish), args.readme, main_table(lines))
        print(f"published to {args.publish}" + (f" and {args.readme}" if args.readme else ""))
    return out


def cli(argv=None) -> int:
    """Entry point: bad input is one line on stderr and exit status 2."""
    return run_command(lambda given: main(parse_args(given)) and 0, "compare_runs.py", argv, bad_input=(CompareError,))


if __name__ == "__main__":
    sys.exit(cli())
