"""eval/evaluate_prompts.py: prompt sets on a tiny run trained in the test (real subprocesses and launches).

Prompt files are written from the run's own dataset (data_scripts/write_prompt_sets.py): captions of its
most duplicated images (8x in the shared tiny dataset), captions of Twemoji never seen in training, and the
probe captions, in each format.
"""
from __future__ import annotations

import json
import sys
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from conftest import ACCELERATE, run, run_script

from mem_analysis.prompts import PromptFileError, read_prompts

ROOT = Path(__file__).resolve().parents[1]
SCRIPT = ROOT / "eval" / "evaluate_prompts.py"
ARGS = ["--num_seeds", "2", "--num_inference_steps", "4", "--bootstrap", "50", "--batch_size", "16"]
M1_TO_M7 = ("severity", "memorized_fraction", "loss_cond", "loss_cfg", "loss_cfg_early", "k_cfg", "k_cfg_early",
            "D_x", "D_x_early", "D_T", "D_x_exact", "D_x_final", "wen_magnitude", "diversity", "collapse_early",
            "cos_diff_x_early", "sev_pixel_cosine", "sev_ssim", "sev_nn_identity", "sev_latent_cosine",
            "similarity_fraction", "k0_first", "kc_first", "kg_first", "k0_gauss", "kc_gauss_early")


def write_formats(folder: Path, stem: str, prompts: list[str]) -> dict[str, Path]:
    """The same prompts as .txt, .jsonl (caption), .csv (prompt, beside another column) and .parquet (text)."""
    folder.mkdir(parents=True, exist_ok=True)
    files = {fmt: folder / f"{stem}.{fmt}" for fmt in ("txt", "jsonl", "csv", "parquet")}
    files["txt"].write_text("\n".join(prompts) + "\n\n")
    files["jsonl"].write_text("".join(json.dumps({"caption": p, "index": i}) + "\n" for i, p in enumerate(prompts)))
    pd.DataFrame({"id": range(len(prompts)), "Prompt": prompts}).to_csv(files["csv"], index=False)
    pd.DataFrame({"text": prompts, "overfit_type": "MV"}).to_parquet(files["parquet"])
    return files


@pytest.fixture(scope="module")
def prompt_files(tiny_dataset_dir, tmp_path_factory) -> dict:
    """{'duplicated' | 'unseen' | 'probe': {format: path}} written from the tiny dataset."""
    from data_scripts import write_prompt_sets

    from mem_analysis.data import load_study_dataset

    sets = write_prompt_sets.prompt_sets(tiny_dataset_dir, max_prompts=3)
    duplicated = sets[max(sets, key=lambda name: int(name[3:]) if name.startswith("dup") else 0)]
    unseen = sets["unseen"]
    probe = load_study_dataset(tiny_dataset_dir)["probe"]
    folder = tmp_path_factory.mktemp("prompts")
    return {name: write_formats(folder, name, prompts)
            for name, prompts in (("duplicated", duplicated), ("unseen", unseen), ("probe", list(probe["text"])))}


def evaluate(out, *args, launcher=(sys.executable,), check=True):
    """One evaluate_prompts run into `out`."""
    return run([*launcher, SCRIPT, "--output_dir", out, *ARGS, *args], check=check)


@pytest.fixture(scope="module")
def with_references(trained_run, prompt_files, tmp_path_factory) -> dict:
    """checkpoint-4 on the probe captions (parquet) and unseen captions (csv), references = the run's dataset;
    evaluate_checkpoints on the same checkpoint and seeds."""
    work = tmp_path_factory.mktemp("prompt_eval")
    sets = ["--prompts", f"probe={prompt_files['probe']['parquet']}",
            "--prompts", f"unseen={prompt_files['unseen']['csv']}"]
    from eval import evaluate_checkpoints, evaluate_prompts

    # both in this process (the scripts' cli): test_two_processes_equal_one launches the 2-process one
    run_script(evaluate_prompts.cli, ["--output_dir", work / "one", *ARGS, "--run_dir", trained_run, "--checkpoint",
                                      "4", *sets])
    run_script(evaluate_checkpoints.cli, ["--run_dir", trained_run, "--output_dir", work / "ckpt", "--logging_dir",
                                          work / "tb", "--checkpoints", "4", *ARGS])
    return dict(work=work, sets=sets, out=work / "one", model=trained_run)


def read(out: Path, name: str) -> pd.DataFrame:
    return pd.read_csv(out / name, keep_default_na=False, na_values=[""], dtype={"prompt": str})


def test_each_format_gives_the_same_prompts(prompt_files, tmp_path):
    for name, files in prompt_files.items():
        read_back = {fmt: read_prompts(path) for fmt, path in files.items()}
        assert len(set(map(tuple, read_back.values()))) == 1, name
        assert len(read_back["txt"]) >= 2
    path = prompt_files["probe"]["csv"]
    assert read_prompts(path, column="Prompt", max_prompts=3) == read_prompts(path)[:3]
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"caption": "a"}\n{"caption": "b"\n')
    with pytest.raises(PromptFileError, match=rf"^{bad} line 2: not JSON"):
        read_prompts(bad)
    with pytest.raises(PromptFileError, match="has no column 'caption'"):
        read_prompts(prompt_files["probe"]["csv"], column="caption")
    empty_cell = tmp_path / "cells.csv"
    empty_cell.write_text("caption\nfirst\n\"\"\n")
    with pytest.raises(PromptFileError, match=rf"^{empty_cell} line 3: the prompt is empty"):
        read_prompts(empty_cell)
    (tmp_path / "empty.txt").write_text("\n\n")
    with pytest.raises(PromptFileError, match="holds no prompts"):
        read_prompts(tmp_path / "empty.txt")


def test_tables_hold_every_prompt_and_seed(with_references, prompt_files):
    out = with_references["out"]
    per_seed, per_prompt = read(out, "per_seed.csv"), read(out, "per_prompt.csv")
    want = {("probe", p) for p in read_prompts(prompt_files["probe"]["txt"])}
    want |= {("unseen", p) for p in read_prompts(prompt_files["unseen"]["txt"])}
    assert set(zip(per_prompt.prompt_set, per_prompt.prompt)) == want and len(per_prompt) == len(want)
    assert len(per_seed) == 2 * len(want) and per_seed.groupby(["prompt_set", "prompt"]).seed.nunique().eq(2).all()
    for column in ("wen_magnitude_first", "wen_magnitude", "D_x_final", "D_x_final_early", "diversity", "sev_self"):
        assert per_prompt[column].notna().all(), column
    pd.testing.assert_frame_equal(pd.read_parquet(out / "per_prompt.parquet"), per_prompt, check_dtype=False)
    from mem_analysis.sd import load_components, tokens_cut

    tokenizer = load_components(with_references["model"]).tokenizer
    assert per_prompt.prompt_tokens_cut.tolist() == tokens_cut(tokenizer, per_prompt.prompt.tolist())
    summary = json.loads((out / "summary.json").read_text())
    assert set(summary["sets"]) == {"probe", "unseen"} and summary["sets"]["unseen"]["n_with_reference"] == 0
    assert summary["detection"]["probe vs unseen"]["wen_magnitude_first"]["direction"] == "higher"  # stated in advance
    assert summary["settings"]["unmatched"] == {"probe": 0, "unseen": 3}
    text = (out / "report.md").read_text()
    for figure in ("curves_by_set.png", "scores_by_set.png", "deviation_vs_severity.png"):
        assert (out / "figures" / figure).stat().st_size > 1000 and f"figures/{figure}" in text


def test_references_give_severity_against_the_paired_image(with_references):
    """Matched prompts: severity = mean over seeds of the headline back end against the reference;
    unmatched prompts: no reference-based value, the reference-free ones only."""
    per_seed, per_prompt = read(with_references["out"], "per_seed.csv"), read(with_references["out"], "per_prompt.csv")
    probe, unseen = per_prompt[per_prompt.prompt_set == "probe"], per_prompt[per_prompt.prompt_set == "unseen"]
    assert probe.reference.all() and not unseen.reference.any()
    means = per_seed.groupby(["prompt_set", "prompt"]).sev_pixel_cosine.mean()
    np.testing.assert_allclose(probe.severity, means.loc[list(zip(probe.prompt_set, probe.prompt))], rtol=1e-9)
    assert not np.allclose(probe.severity, probe.sev_self)  # against the reference, not among the seeds
    for column in ("severity", "D_x", "loss_cfg", "k_cfg_early", "cos_c_x_early", "k0_first", "memorized_fraction"):
        assert probe[column].notna().all() and unseen[column].isna().all(), column
    assert (probe.label == "copy").all()  # matched prompts: the copy label against the reference pool
    copies = per_seed.groupby(["prompt_set", "prompt"])["copy"].mean()
    np.testing.assert_allclose(probe.memorized_fraction, copies.loc[list(zip(probe.prompt_set, probe.prompt))])


def test_checkpoint_gives_the_same_values_as_evaluate_checkpoints(with_references, tiny_dataset_dir):
    from mem_analysis.data import load_study_dataset

    ckpt = pd.read_csv(with_references["work"] / "ckpt" / "per_sample.csv")
    ckpt = ckpt[ckpt.checkpoint_step == 4].set_index("sample_id")
    mine = read(with_references["out"], "per_prompt.csv")
    mine = mine[mine.prompt_set == "probe"].set_index("sample_id")
    probe = load_study_dataset(tiny_dataset_dir)["probe"]
    assert dict(zip(mine.index, mine.prompt)) == dict(zip(probe["sample_id"], probe["text"]))
    for column in M1_TO_M7:
        np.testing.assert_allclose(mine.loc[ckpt.index, column], ckpt[column], rtol=1e-4, atol=1e-6, err_msg=column)


def test_two_processes_equal_one(with_references, trained_run, tmp_path):
    out = tmp_path / "two"
    evaluate(out, "--run_dir", trained_run, "--checkpoint", "4", *with_references["sets"],
             launcher=ACCELERATE + ["--multi_gpu", "--num_processes", "2"])
    for table in ("per_seed.csv", "per_prompt.csv"):
        a, b = read(with_references["out"], table), read(out, table)
        assert list(a.columns) == list(b.columns) and a[["prompt_set", "prompt"]].equals(b[["prompt_set", "prompt"]])
        numeric = a.select_dtypes("number").columns
        np.testing.assert_allclose(b[numeric].to_numpy(float), a[numeric].to_numpy(float), rtol=1e-3, atol=1e-4)


def test_reference_free_severity_and_rerun_skips_done_prompts(trained_run, prompt_files, tmp_path, capsys,
                                                             fresh_accelerate_state):
    """No --references with a pipeline folder: severity = each seed's SSIM to the other seeds, the
    decomposition on each seed's own latent; a rerun with more prompts evaluates only the new ones.
    (In-process, to spare two interpreter starts.)"""
    from eval import evaluate_prompts

    out = tmp_path / "free"
    argv = ["--output_dir", str(out), *ARGS, "--model", str(trained_run),
            "--prompts", f"duplicated={prompt_files['duplicated']['txt']}",
            "--prompts", f"unseen={prompt_files['unseen']['jsonl']}"]
    assert evaluate_prompts.cli(argv + ["--max_prompts", "1"]) == 0
    first = read(out, "per_prompt.csv")
    capsys.readouterr()
    assert evaluate_prompts.cli(argv) == 0
    assert "skipping 2 prompts already evaluated" in capsys.readouterr().out
    table = read(out, "per_prompt.csv")
    assert len(table) == len(read_prompts(prompt_files["duplicated"]["txt"])) + 3
    pd.testing.assert_frame_equal(table.merge(first[["prompt_set", "prompt"]])[first.columns], first)
    assert not table.reference.any()
    np.testing.assert_allclose(table.severity, table.sev_ssim)
    np.testing.assert_allclose(table.severity, table.sev_self)
    np.testing.assert_allclose(table.D_x_early, table.D_x_final_early)
    assert "loss_cfg" not in table and "k_cfg_early" not in table  # M1/M2 need a reference latent
    assert "k0_first" not in table and "copy" not in read(out, "per_seed.csv")
    assert (table.label == "similarity").all()  # no training pool: the similarity label, said so
    np.testing.assert_allclose(table.memorized_fraction, table.similarity_fraction)
    assert "label `similarity`: reference-free" in (out / "report.md").read_text()
    summary = json.loads((out / "summary.json").read_text())
    assert summary["severity_kind"].startswith("reference-free")


def test_bad_input_gives_one_line_errors(prompt_files, tmp_path, capsys):
    from eval import evaluate_prompts as ev

    good = f"a={prompt_files['probe']['txt']}"
    cases = [(["--model", str(tmp_path / "nowhere"), "--prompts", good], "does not exist"),
             (["--model", str(tmp_path), "--prompts", f"a={tmp_path / 'none.txt'}"], "does not exist"),
             (["--model", str(tmp_path), "--prompts", good, "--prompt_column", "x"], None),
             (["--model", str(tmp_path), "--prompts", f"a={prompt_files['probe']['csv']}", "--prompt_column", "x"],
              "has no column 'x'"),
             (["--model", str(tmp_path)], "at least one prompt set")]
    (tmp_path / "empty.txt").write_text("")
    cases.append((["--model", str(tmp_path), "--prompts", f"a={tmp_path / 'empty.txt'}"], "holds no prompts"))
    (tmp_path / "latin1.txt").write_bytes("a cat\nun caf\u00e9\n".encode("latin-1"))
    (tmp_path / "latin1.jsonl").write_bytes('{"caption": "a"}\n{"caption": "caf\u00e9"}\n'.encode("latin-1"))
    (tmp_path / "cut.jsonl").write_text('{"caption": "a"}\n{"caption": "b"\n')
    for name, message in (("latin1.txt", "latin1.txt line 2: not UTF-8 text (byte 0xe9 at column 7)"),
                          ("latin1.jsonl", "latin1.jsonl line 2: not UTF-8 text (byte 0xe9 at column 17)"),
                          ("cut.jsonl", "cut.jsonl line 2: not JSON (Expecting ',' delimiter at column 16)")):
        cases.append((["--model", str(tmp_path), "--prompts", f"a={tmp_path / name}"], message))
    for argv, message in cases:
        code = ev.cli(argv + ["--output_dir", str(tmp_path / "out")])
        err = capsys.readouterr().err
        assert code == 2 and err.startswith("evaluate_prompts.py: error: ") and err.count("\n") == 1, (argv, err)
        if message:
            assert message in err, (argv, err)
    assert not (tmp_path / "out").exists()


def test_prompts_past_the_text_encoders_window_are_counted(tiny_model_dir):
    """The tiny tokenizer is character-level: a prompt of n characters is n + 2 tokens (start, end), so a window
    of 77 cuts n - 75 of them."""
    from mem_analysis.sd import cut_prompts_line, load_components, tokens_cut
    from train.finetune_data import long_captions_line

    tokenizer = load_components(tiny_model_dir).tokenizer
    prompts = ["a cat", "x" * 75, "y" * 76, "z" * 10_000]
    assert tokenizer.model_max_length == 77 and tokens_cut(tokenizer, prompts) == [0, 0, 1, 10_000 - 75]
    assert cut_prompts_line(tokenizer, prompts[:2], "prompts") is None
    assert cut_prompts_line(tokenizer, prompts + prompts, "prompts") == (
        "2 of 4 prompts are longer than the text encoder's 77-token window and are cut: 1 to 9925 tokens each "
        "(9926 in all) are never seen")
    split = {"text": ["a cat", ["y" * 76, "a cat"], "y" * 76]}  # a list cell: several captions of one image
    assert long_captions_line(tokenizer, split, "text").startswith("1 of 2 distinct training captions are longer")
