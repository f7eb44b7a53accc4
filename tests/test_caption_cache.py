"""Training inputs computed once (caption embeddings per distinct caption, pixels and VAE posteriors per row):
same values, same losses."""
from __future__ import annotations

from pathlib import Path

import pytest
import torch

from mem_analysis.sd import load_components, tokenize
from train import finetune
from train.finetune_data import CaptionEmbeddings, ImageLatents

ROOT = Path(__file__).resolve().parents[1]

pytestmark = pytest.mark.usefixtures("fresh_accelerate_state")


def test_cached_embeddings_equal_batch_encoding_and_encode_each_caption_once(tiny_model_dir):
    parts = load_components(str(tiny_model_dir))
    calls = []
    parts.text_encoder.register_forward_hook(lambda module, inputs, output: calls.append(inputs[0].shape[0]))
    captions = ["a red apple", "", "a cat face", "a red apple", "", "grinning face"]
    ids = tokenize(parts.tokenizer, captions)
    with torch.no_grad():
        expected = parts.text_encoder(ids, return_dict=False)[0]
    calls.clear()
    cache = CaptionEmbeddings(parts.text_encoder)
    first = cache(ids)
    second = cache(ids.flip(0))
    assert torch.equal(first, expected) and torch.equal(second, expected.flip(0))
    assert calls == [4]  # the 4 distinct captions, in one call; the second lookup encodes nothing
    assert torch.equal(CaptionEmbeddings(parts.text_encoder, cache=False)(ids), expected)


def test_cached_latents_equal_batch_sampling_and_encode_each_row_once(tiny_model_dir):
    """Sampling the stored posterior draws what encode_images(sample=True) of the batch draws, same generator."""
    from mem_analysis.sd import encode_images

    vae = load_components(str(tiny_model_dir)).vae
    calls = []
    vae.encoder.register_forward_hook(lambda module, inputs, output: calls.append(inputs[0].shape[0]))
    pixels = torch.rand(3, 3, 32, 32, generator=torch.Generator().manual_seed(0)) * 2 - 1
    rows = torch.tensor([7, 2, 9])
    batch = pixels[[0, 1, 0, 2]]  # row 7 twice in one batch
    batch_rows = rows[[0, 1, 0, 2]]
    expected = encode_images(vae, batch, torch.Generator().manual_seed(1), sample=True)
    calls.clear()
    cache = ImageLatents(vae)
    first = cache(batch, batch_rows, torch.Generator().manual_seed(1))
    second = cache(batch.flip(0), batch_rows.flip(0), torch.Generator().manual_seed(1))
    torch.testing.assert_close(first, expected, rtol=1e-5, atol=1e-5)
    assert calls == [3]  # the 3 distinct rows, in one call; the second lookup encodes nothing
    flipped = encode_images(vae, batch.flip(0), torch.Generator().manual_seed(1), sample=True)
    torch.testing.assert_close(second, flipped, rtol=1e-5, atol=1e-5)
    assert not torch.allclose(first[0], first[2])  # the same row drawn twice in a batch: two draws
    uncached = ImageLatents(vae, cache=False)(batch, batch_rows, torch.Generator().manual_seed(1))
    assert torch.equal(uncached, expected)


def train_losses(run_dir: Path) -> list[float]:
    """The `train/loss` scalars of a run, by step."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    events = EventAccumulator(str(run_dir / "logs" / "finetune"))
    events.Reload()
    return [event.value for event in sorted(events.Scalars("train/loss"), key=lambda e: e.step)]


@pytest.mark.parametrize("mitigations", [[], ["--text_embedding_noise", "0.1", "--mitigation_wen_threshold", "1.3"]],
                         ids=["plain", "noise_and_wen_filter"])
def test_training_with_cached_inputs_gives_the_same_losses(tiny_model_dir, tiny_dataset_dir, tmp_path, mitigations):
    """Also with embedding noise (drawn after the lookup) and Wen's filter (uses the looked-up embeddings)."""
    from accelerate.state import AcceleratorState, GradientState, PartialState

    losses = {}
    caches = {"cached": ["--cache_caption_embeddings", "--cache_train_pixels", "--cache_latents"],
              "encoded": ["--no-cache_caption_embeddings", "--no-cache_train_pixels", "--no-cache_latents"]}
    for name, flags in caches.items():
        run = tmp_path / name
        code = finetune.cli(["--config", str(ROOT / "configs" / "finetune_tiny.yaml"),
                             "--pretrained_model_name_or_path", str(tiny_model_dir),
                             "--train_data_dir", str(tiny_dataset_dir), "--output_dir", str(run),
                             "--max_train_steps", "5", "--probe_steps", "0", "--checkpointing_steps", "0",
                             "--logging_steps", "1", "--proportion_empty_prompts", "0.3", *flags, *mitigations])
        assert code == 0
        losses[name] = train_losses(run)
        AcceleratorState._reset_state(True)
        GradientState._reset_state()
        PartialState._reset_state()
    cached, encoded = losses.values()
    assert len(cached) == 5
    # posteriors encoded row by row, not in the batch: equal up to the convolutions' rounding
    assert cached == pytest.approx(encoded, rel=1e-5)


def test_cached_pixels_equal_decoded_ones_and_skip_decoding(tiny_model_dir, tiny_dataset_dir):
    from train.finetune_config import resolve_config
    from train.finetune_data import TrainExamples, load_splits

    args = resolve_config(["--pretrained_model_name_or_path", str(tiny_model_dir),
                           "--train_data_dir", str(tiny_dataset_dir), "--cache_train_pixels"])
    train, _ = load_splits(args)
    tokenizer = load_components(str(tiny_model_dir)).tokenizer
    cached, decoded = TrainExamples(train, tokenizer, 32, args), TrainExamples(train, tokenizer, 32, args)
    decoded.pixel_cache = None
    keys = [(row, epoch) for epoch in (0, 1) for row in (0, 5, len(train) - 1)]
    first = [cached[key] for key in keys]
    cached.split = None  # a second epoch must not read the dataset again
    again = [cached[key] for key in keys]
    for a, b, c in zip(first, again, (decoded[key] for key in keys)):
        assert torch.equal(a["pixel_values"], c["pixel_values"]) and torch.equal(b["pixel_values"], c["pixel_values"])
        assert torch.equal(a["input_ids"], c["input_ids"])
    flipped = resolve_config(["--pretrained_model_name_or_path", str(tiny_model_dir),
                              "--train_data_dir", str(tiny_dataset_dir), "--cache_train_pixels", "--random_flip"])
    assert TrainExamples(train, tokenizer, 32, flipped).pixel_cache is None  # augmented pixels are never cached


def test_random_caption_augmentation_keeps_no_augmented_caption_in_the_caches(tiny_model_dir, tiny_dataset_dir):
    """rand_word_add makes nearly every caption new: its token ids are not kept, and finetune turns the
    embedding cache off (bounded_captions); multiple_captions draws from a fixed set and keeps both."""
    from train.finetune_config import resolve_config
    from train.finetune_data import TrainExamples, bounded_captions, load_splits

    args = resolve_config(["--pretrained_model_name_or_path", str(tiny_model_dir), "--train_data_dir",
                           str(tiny_dataset_dir), "--caption_augmentation", "rand_word_add",
                           "--caption_augmentation_p", "1"])
    train, _ = load_splits(args)
    examples = TrainExamples(train, load_components(str(tiny_model_dir)).tokenizer, 32, args)
    examples[(0, 0)], examples[(0, 1)]
    assert examples.token_cache == {} and not bounded_captions(args)
    args.caption_augmentation = "multiple_captions"
    assert bounded_captions(args)
