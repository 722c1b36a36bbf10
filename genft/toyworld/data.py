"""The toy world's data: palette, real sklearn digits composed into 16x16 RGB images, captions and the prompt split."""
from __future__ import annotations

import functools
import re
from typing import NamedTuple, Sequence

import numpy as np
import torch
import torch.nn.functional as F

IMAGE_SIZE = 16
DIGITS: tuple[int, ...] = tuple(range(10))
# Well-separated named colours (RGB in [0,1]); the oracle snaps measured colours to the nearest one.
PALETTE: dict[str, tuple[float, float, float]] = {
    "red": (0.90, 0.10, 0.10),
    "green": (0.10, 0.75, 0.15),
    "blue": (0.15, 0.25, 0.95),
    "yellow": (0.95, 0.85, 0.10),
    "white": (0.95, 0.95, 0.95),
}
COLORS: tuple[str, ...] = tuple(PALETTE)
# Caption templates. Template 0 is the canonical one: held-out evaluation prompts always use it.
TEMPLATES: tuple[str, ...] = (
    "a {fg} {digit} on a {bg} background",
    "the digit {digit} in {fg} on {bg}",
    "a {digit} drawn in {fg} over a {bg} background",
)
HELDOUT_PER_DIGIT = 3  # 10 digits x 3 = 30 of the 200 (digit, fg, bg) combinations, 15%


class Combo(NamedTuple):
    """One point of the world: which digit, stroke (foreground) colour and background colour."""

    digit: int
    fg: str
    bg: str


def _check_combo(digit: int, fg: str, bg: str) -> None:
    """Raise a ValueError naming the bad field when (digit, fg, bg) is not in the world."""
    if isinstance(digit, bool) or not isinstance(digit, (int, np.integer)) or digit not in DIGITS:
        raise ValueError(f"digit must be an int in 0..9, got {digit!r}")
    for field, colour in (("fg", fg), ("bg", bg)):
        if colour not in PALETTE:
            raise ValueError(f"{field} colour must be one of {list(COLORS)}, got {colour!r}")
    if fg == bg:
        raise ValueError(f"fg and bg must differ (the digit would be invisible), got both {fg!r}")


def all_combos() -> list[Combo]:
    """All 10 x 5 x 4 = 200 (digit, fg, bg) combinations with fg != bg, in a fixed order."""
    return [Combo(d, fg, bg) for d in DIGITS for fg in COLORS for bg in COLORS if fg != bg]


@functools.lru_cache(maxsize=1)
def _split() -> tuple[tuple[Combo, ...], tuple[Combo, ...]]:
    """Deterministic split: each digit holds out 3 (fg, bg) pairs, cycling through an interleaved pair order."""
    n = len(COLORS)
    # Pairs ordered by colour offset so that consecutive runs are balanced over fg and bg colours.
    pairs = [(COLORS[i], COLORS[(i + k) % n]) for k in range(1, n) for i in range(n)]
    held = set()
    for d in DIGITS:
        for j in range(HELDOUT_PER_DIGIT):
            fg, bg = pairs[(d * HELDOUT_PER_DIGIT + j) % len(pairs)]
            held.add(Combo(d, fg, bg))
    combos = all_combos()
    train = tuple(c for c in combos if c not in held)
    heldout = tuple(c for c in combos if c in held)
    for name, values in (("digit", DIGITS), ("fg", COLORS), ("bg", COLORS)):
        seen = {getattr(c, name) for c in train}
        if set(values) - seen:
            raise RuntimeError(f"held-out split leaves {name} values {sorted(set(values) - seen)} out of training")
    return train, heldout


def train_combos() -> list[Combo]:
    """The (digit, fg, bg) combinations the base generator is trained on."""
    return list(_split()[0])


def heldout_combos() -> list[Combo]:
    """The fixed held-out combinations (about 15%), never seen in pretraining, used for evaluation."""
    return list(_split()[1])


def caption(digit: int, fg: str, bg: str, template: int = 0) -> str:
    """Caption a combination with one of the TEMPLATES (0 is the canonical evaluation template)."""
    _check_combo(digit, fg, bg)
    if not 0 <= template < len(TEMPLATES):
        raise ValueError(f"template must be in 0..{len(TEMPLATES) - 1}, got {template}")
    return TEMPLATES[template].format(digit=int(digit), fg=fg, bg=bg)


def train_prompts() -> list[str]:
    """Canonical captions of the training combinations."""
    return [caption(*c) for c in train_combos()]


def heldout_prompts() -> list[str]:
    """Canonical captions of the held-out combinations (the evaluation prompts)."""
    return [caption(*c) for c in heldout_combos()]


def _template_regex(template: str) -> re.Pattern[str]:
    """Turn a caption template into a full-match regex with named groups."""
    colours = "|".join(COLORS)
    pattern = re.escape(template).replace(r"\{digit\}", "{digit}").replace(r"\{fg\}", "{fg}").replace(r"\{bg\}", "{bg}")
    pattern = pattern.replace(r"\ ", " ").format(
        digit=r"(?P<digit>[0-9])", fg=f"(?P<fg>{colours})", bg=f"(?P<bg>{colours})"
    )
    return re.compile(pattern)


_REGEXES = tuple(_template_regex(t) for t in TEMPLATES)


def parse_prompt(text: str) -> Combo:
    """Parse a caption of this world back into (digit, fg, bg); raise ValueError on anything else."""
    if not isinstance(text, str):
        raise TypeError(f"prompt must be a str, got {type(text).__name__}")
    norm = " ".join(text.lower().split())
    for regex in _REGEXES:
        m = regex.fullmatch(norm)
        if m:
            combo = Combo(int(m["digit"]), m["fg"], m["bg"])
            if combo.fg == combo.bg:
                raise ValueError(f"prompt {text!r} names the same colour {combo.fg!r} for the digit and the background")
            return combo
    forms = "; ".join(repr(t) for t in TEMPLATES)
    raise ValueError(
        f"prompt {text!r} is not a caption of the toy world; use one of the forms {forms} "
        f"with digit 0-9 and colours {list(COLORS)}"
    )


def vocabulary() -> list[str]:
    """Every word (pre-token) that captions of this world can contain."""
    words: list[str] = []
    for t in TEMPLATES:
        for w in t.split():
            if not w.startswith("{") and w not in words:
                words.append(w)
    return words + [str(d) for d in DIGITS] + list(COLORS)


@functools.lru_cache(maxsize=1)
def _digits() -> tuple[torch.Tensor, torch.Tensor]:
    """The 1,797 real 8x8 sklearn digits as float [N,8,8] in [0,1] and int64 labels [N]."""
    from sklearn.datasets import load_digits

    d = load_digits()
    return torch.from_numpy(d.images / 16.0).float(), torch.from_numpy(d.target).long()


def real_digits() -> tuple[torch.Tensor, torch.Tensor]:
    """A copy of the real digits ([N,8,8] in [0,1]) and their labels, so callers cannot mutate the cache."""
    images, labels = _digits()
    return images.clone(), labels.clone()


def digit_masks(images8: torch.Tensor, shift: torch.Tensor | None = None) -> torch.Tensor:
    """Upsample [N,8,8] digits in [0,1] to [N,16,16] stroke masks, optionally shifted by (dy, dx) pixels each."""
    if images8.ndim != 3 or images8.shape[1:] != (8, 8):
        raise ValueError(f"images8 must have shape [N,8,8], got {tuple(images8.shape)}")
    m = F.interpolate(images8[:, None].float(), size=(IMAGE_SIZE, IMAGE_SIZE), mode="bilinear", align_corners=False)
    m = m[:, 0].clamp(0, 1)
    if shift is not None:
        pad = int(shift.abs().max().item()) if shift.numel() else 0
        if pad:
            padded = F.pad(m, (pad, pad, pad, pad))
            out = torch.empty_like(m)
            for i, (dy, dx) in enumerate(shift.tolist()):
                out[i] = padded[i, pad - dy : pad - dy + IMAGE_SIZE, pad - dx : pad - dx + IMAGE_SIZE]
            m = out
    return m


def compose(masks: torch.Tensor, fg: torch.Tensor, bg: torch.Tensor) -> torch.Tensor:
    """image = bg * (1 - m) + fg * m, from masks [N,H,W] and colours [N,3]; returns [N,3,H,W] in [0,1]."""
    m = masks[:, None]
    return (bg[:, :, None, None] * (1 - m) + fg[:, :, None, None] * m).clamp(0, 1)


def palette_tensor(names: Sequence[str]) -> torch.Tensor:
    """Colours of the named palette entries as float [N,3]."""
    return torch.tensor([PALETTE[n] for n in names], dtype=torch.float32)


def render(
    combos: Sequence[Combo | tuple[int, str, str]],
    generator: torch.Generator | None = None,
    augment: bool = True,
    indices: torch.Tensor | None = None,
    max_shift: int = 0,
) -> torch.Tensor:
    """Render combinations as [N,3,16,16] images in [0,1] from random real digits of the right class.

    `indices` picks specific sklearn digits (their labels must match); `augment` adds a stroke
    intensity jitter and a small colour jitter. `max_shift` > 0 also shifts each digit by up to that
    many pixels; it is off by default because a half-pixel shift at 8x8 costs the oracle's digit
    classifier about 10 points of accuracy.
    """
    if not 0 <= max_shift <= 2:
        raise ValueError(f"max_shift must be in 0..2 pixels, got {max_shift}")
    images, labels = _digits()
    combos = [Combo(*c) for c in combos]
    for c in combos:
        _check_combo(*c)
    n = len(combos)
    wanted = torch.tensor([c.digit for c in combos], dtype=torch.long)
    if indices is None:
        indices = torch.empty(n, dtype=torch.long)
        for d in wanted.unique().tolist():
            pool = (labels == d).nonzero().flatten()
            sel = (wanted == d).nonzero().flatten()
            indices[sel] = pool[torch.randint(len(pool), (len(sel),), generator=generator)]
    elif indices.shape != (n,) or not torch.equal(labels[indices], wanted):
        raise ValueError("indices must hold one sklearn digit index per combo, each with the combo's digit label")
    fg = palette_tensor([c.fg for c in combos])
    bg = palette_tensor([c.bg for c in combos])
    shift = torch.randint(-max_shift, max_shift + 1, (n, 2), generator=generator) if max_shift else None
    if augment:
        gain = 0.85 + 0.15 * torch.rand(n, 1, 1, generator=generator)
        fg = fg + 0.03 * (2 * torch.rand(n, 3, generator=generator) - 1)
        bg = bg + 0.03 * (2 * torch.rand(n, 3, generator=generator) - 1)
    masks = digit_masks(images[indices], shift)
    if augment:
        masks = masks * gain
    return compose(masks, fg.clamp(0, 1), bg.clamp(0, 1))


def sample_batch(
    batch_size: int,
    generator: torch.Generator | None = None,
    split: str = "train",
    augment: bool = True,
) -> tuple[torch.Tensor, list[Combo]]:
    """Draw `batch_size` random combinations from a split ("train", "heldout" or "all") and render them."""
    pools = {"train": train_combos, "heldout": heldout_combos, "all": all_combos}
    if split not in pools:
        raise ValueError(f"split must be one of {list(pools)}, got {split!r}")
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    pool = pools[split]()
    pick = torch.randint(len(pool), (batch_size,), generator=generator).tolist()
    combos = [pool[i] for i in pick]
    return render(combos, generator=generator, augment=augment), combos
