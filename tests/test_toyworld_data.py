"""Toy world data: composition, captions, the held-out split, prompt parsing and the tokenizer."""
import pytest
import torch

from genft.toyworld import data
from genft.toyworld.data import (
    COLORS,
    TEMPLATES,
    Combo,
    all_combos,
    caption,
    heldout_combos,
    heldout_prompts,
    parse_prompt,
    render,
    sample_batch,
    train_combos,
    train_prompts,
)
from genft.toyworld.tokenizer import MODEL_MAX_LENGTH, build_tokenizer, write_tokenizer_files


@pytest.fixture(scope="module")
def tokenizer(tmp_path_factory):
    return build_tokenizer(tmp_path_factory.mktemp("tok"))


def test_render_shapes_range_and_colours():
    g = torch.Generator().manual_seed(0)
    combos = [Combo(7, "red", "blue"), Combo(0, "white", "green")]
    x = render(combos, generator=g, augment=False)
    assert x.shape == (2, 3, 16, 16) and x.dtype == torch.float32
    assert x.min() >= 0 and x.max() <= 1
    # corners are pure background; the brightest stroke pixel is (close to) the stroke colour
    assert torch.allclose(x[0, :, 0, 0], data.palette_tensor(["blue"])[0])
    assert torch.allclose(x[1, :, 0, 0], data.palette_tensor(["green"])[0])
    red = data.palette_tensor(["red"])[0]
    assert ((x[0] - red[:, None, None]).norm(dim=0)).min() < 0.15


def test_render_is_seeded_and_augment_changes_pixels():
    a, ca = sample_batch(16, torch.Generator().manual_seed(3))
    b, cb = sample_batch(16, torch.Generator().manual_seed(3))
    assert ca == cb and torch.equal(a, b)
    x = render(ca, generator=torch.Generator().manual_seed(1), augment=True)
    y = render(ca, generator=torch.Generator().manual_seed(1), augment=False)
    assert not torch.equal(x, y) and x.min() >= 0 and x.max() <= 1


def test_render_rejects_bad_input():
    with pytest.raises(ValueError, match="fg colour"):
        render([(3, "purple", "red")])
    with pytest.raises(ValueError, match="must differ"):
        render([(3, "red", "red")])
    with pytest.raises(ValueError, match="digit"):
        render([(12, "red", "blue")])
    with pytest.raises(ValueError, match="split"):
        sample_batch(4, split="test")


def test_captions_name_all_three_attributes():
    for c in all_combos():
        for t in range(len(TEMPLATES)):
            text = caption(*c, template=t)
            assert str(c.digit) in text.split() and c.fg in text and c.bg in text
    assert caption(7, "red", "blue") == "a red 7 on a blue background"
    with pytest.raises(ValueError, match="template"):
        caption(7, "red", "blue", template=len(TEMPLATES))


def test_heldout_split_is_fixed_disjoint_and_covers_every_value():
    train, held = train_combos(), heldout_combos()
    assert len(all_combos()) == 200 and len(held) == 30 and len(train) == 170
    assert not set(train) & set(held)
    assert set(train) | set(held) == set(all_combos())
    assert held == heldout_combos()  # deterministic
    for name, values in (("digit", range(10)), ("fg", COLORS), ("bg", COLORS)):
        assert {getattr(c, name) for c in train} == set(values)
        assert {getattr(c, name) for c in held} == set(values)
    assert all(c.fg != c.bg for c in held)
    assert heldout_prompts() == [caption(*c) for c in held]  # canonical template only
    assert train_prompts() == [caption(*c) for c in train]


def test_parse_round_trip_and_normalisation():
    for c in all_combos():
        for t in range(len(TEMPLATES)):
            assert parse_prompt(caption(*c, template=t)) == c
    assert parse_prompt("  A Red 7 on a   BLUE background ") == (7, "red", "blue")


@pytest.mark.parametrize(
    "text, match",
    [
        ("a purple 7 on a blue background", "not a caption of the toy world"),
        ("a red 12 on a blue background", "not a caption"),
        ("a photo of a cat", "not a caption"),
        ("", "not a caption"),
        ("a red 7 on a red background", "same colour"),
    ],
)
def test_parse_rejects_text_outside_the_world(text, match):
    with pytest.raises(ValueError, match=match):
        parse_prompt(text)


def test_parse_rejects_non_strings():
    with pytest.raises(TypeError):
        parse_prompt(7)


def test_every_world_word_is_one_token(tokenizer):
    for word in data.vocabulary():
        assert len(tokenizer(word, add_special_tokens=False).input_ids) == 1, word


def test_no_caption_is_truncated_and_captions_get_distinct_ids(tokenizer):
    captions = [caption(*c, template=t) for c in all_combos() for t in range(len(TEMPLATES))]
    lengths = [len(ids) for ids in tokenizer(captions).input_ids]  # no truncation requested
    assert max(lengths) <= MODEL_MAX_LENGTH
    padded = tokenizer(captions, padding="max_length", max_length=MODEL_MAX_LENGTH, truncation=True).input_ids
    assert len({tuple(p) for p in padded}) == len(captions)
    empty = tokenizer([""], padding="max_length", max_length=MODEL_MAX_LENGTH).input_ids[0]
    assert tuple(empty) not in {tuple(p) for p in padded}


def test_tokenizer_loads_through_clip_tokenizer(tmp_path, tokenizer):
    from transformers import CLIPTokenizer

    write_tokenizer_files(tmp_path / "raw")  # only vocab.json + merges.txt
    raw = CLIPTokenizer.from_pretrained(str(tmp_path / "raw"))
    saved = CLIPTokenizer.from_pretrained(tokenizer.name_or_path)
    assert saved.model_max_length == MODEL_MAX_LENGTH
    for text in heldout_prompts()[:5] + [""]:
        assert raw(text).input_ids == saved(text).input_ids == tokenizer(text).input_ids
