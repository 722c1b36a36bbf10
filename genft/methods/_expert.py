"""FAIL's expert demonstrations: an image folder (optionally captioned) or a held-out stroke style of the toy world's real digits.

`expert_data` is a folder path or `toyworld:<style>`; `check_expert_data` refuses a bad value from
the config, before any model loads. Experts are sampled per prompt: a captioned folder (`img.png`
+ `img.txt`) and the toy world give prompt-paired experts, an uncaptioned folder random ones.
"""
from __future__ import annotations

from pathlib import Path
from typing import Dict, List, Optional, Sequence, Tuple

import torch
import torch.nn.functional as F

from ..config import ConfigError

TOYWORLD_PREFIX = "toyworld:"
#: stroke styles the toy bases never saw: real sklearn digits drawn bolder, thinner or slanted.
TOY_STYLES = ("bold", "thin", "italic")
IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".webp", ".bmp")


def folder_images(folder: Path) -> List[Path]:
    """Sorted image files directly in `folder`."""
    return sorted(p for p in folder.iterdir() if p.is_file() and p.suffix.lower() in IMAGE_SUFFIXES)


def check_expert_data(value: str, field: str = "expert_data") -> None:
    """Raise ConfigError naming the field, the value and the fix unless `value` is a usable expert source."""
    if not isinstance(value, str) or not value:
        raise ConfigError(f"{field}={value!r} is empty; give a folder of expert images or 'toyworld:<style>' "
                          f"with style one of {', '.join(TOY_STYLES)}")
    if value.startswith(TOYWORLD_PREFIX):
        style = value[len(TOYWORLD_PREFIX):]
        if style not in TOY_STYLES:
            raise ConfigError(f"{field}={value!r} names an unknown toy-world style {style!r}; use one of "
                              f"{', '.join(TOYWORLD_PREFIX + s for s in TOY_STYLES)}")
        return
    folder = Path(value).expanduser()
    if not folder.is_dir():
        raise ConfigError(f"{field}={value!r} does not exist or is not a folder; point {field} at a folder of expert "
                          f"images ({'/'.join(IMAGE_SUFFIXES)}) or use 'toyworld:<style>' ({', '.join(TOY_STYLES)})")
    if not folder_images(folder):
        raise ConfigError(f"{field}={value!r} holds no images ({'/'.join(IMAGE_SUFFIXES)}); put the expert "
                          f"demonstrations there (optionally with a same-named .txt caption each)")


# ----- the toy world's held-out styles ------------------------------------------------------------
def style_masks(masks: torch.Tensor, style: str) -> torch.Tensor:
    """Restyle [N,16,16] stroke masks in [0,1]: "bold" dilates (3x3 max), "thin" sharpens (m³), "italic" shears."""
    m = masks.float()
    if style == "bold":
        return F.max_pool2d(m[:, None], 3, stride=1, padding=1)[:, 0]
    if style == "thin":
        return m.pow(3)
    if style == "italic":
        n, h, w = m.shape
        theta = torch.tensor([[1.0, 0.35, 0.0], [0.0, 1.0, 0.0]]).expand(n, 2, 3)
        grid = F.affine_grid(theta, (n, 1, h, w), align_corners=False)
        return F.grid_sample(m[:, None], grid, align_corners=False, padding_mode="zeros")[:, 0].clamp(0, 1)
    raise ValueError(f"style must be one of {TOY_STYLES}, got {style!r}")


def render_style(combos: Sequence, style: str, generator: Optional[torch.Generator] = None) -> torch.Tensor:
    """Toy-world images [N,3,16,16] in [0,1] of `combos` (digit, fg, bg) from random real digits drawn in `style`."""
    from ..toyworld.data import Combo, _check_combo, _digits, compose, digit_masks, palette_tensor

    combos = [Combo(*c) for c in combos]
    for c in combos:
        _check_combo(*c)
    images, labels = _digits()
    wanted = torch.tensor([c.digit for c in combos], dtype=torch.long)
    indices = torch.empty(len(combos), dtype=torch.long)
    for d in wanted.unique().tolist():
        pool = (labels == d).nonzero().flatten()
        sel = (wanted == d).nonzero().flatten()
        indices[sel] = pool[torch.randint(len(pool), (len(sel),), generator=generator)]
    masks = style_masks(digit_masks(images[indices]), style)
    n = len(combos)
    gain = 0.85 + 0.15 * torch.rand(n, 1, 1, generator=generator)  # the same jitter as toyworld.data.render
    fg = palette_tensor([c.fg for c in combos]) + 0.03 * (2 * torch.rand(n, 3, generator=generator) - 1)
    bg = palette_tensor([c.bg for c in combos]) + 0.03 * (2 * torch.rand(n, 3, generator=generator) - 1)
    return compose(masks * gain, fg.clamp(0, 1), bg.clamp(0, 1))


# ----- expert sets ---------------------------------------------------------------------------------
class ExpertSet:
    """Expert images for a batch of prompts: `sample(prompts, size, generator)` -> (images [N,3,H,W] in [0,1], captions).

    `captions` lists each expert's own caption (equal to the asked prompt when one matches), or is
    None when the set has no captions. `captioned` says whether every expert has one.
    """

    captioned: bool = False

    def sample(self, prompts: Sequence[str], size: Tuple[int, int],
               generator: Optional[torch.Generator] = None) -> Tuple[torch.Tensor, Optional[List[str]]]:
        raise NotImplementedError


class ToyStyleExperts(ExpertSet):
    """The toy world's prompts rendered from real digits in a held-out stroke style (prompt-paired)."""

    captioned = True

    def __init__(self, style: str):
        if style not in TOY_STYLES:
            raise ValueError(f"style must be one of {TOY_STYLES}, got {style!r}")
        self.style = style

    def sample(self, prompts, size, generator=None):
        from ..toyworld.data import IMAGE_SIZE, parse_prompt

        if tuple(size) != (IMAGE_SIZE, IMAGE_SIZE):
            raise ValueError(f"toy-world experts are {IMAGE_SIZE}x{IMAGE_SIZE}, but the generator makes {tuple(size)} images; "
                             "use a toy-world base model or an image folder as expert_data")
        return render_style([parse_prompt(p) for p in prompts], self.style, generator), list(prompts)


class FolderExperts(ExpertSet):
    """Images of a folder, resized to the generator's size on first use; `<stem>.txt` captions pair them with prompts."""

    def __init__(self, folder, max_images: int = 0):
        self.files = folder_images(Path(folder))
        if max_images:
            self.files = self.files[:max_images]
        if not self.files:
            raise ValueError(f"expert folder {str(folder)!r} holds no images ({'/'.join(IMAGE_SUFFIXES)})")
        self.captions = [self._caption(f) for f in self.files]
        self.captioned = all(c is not None for c in self.captions)
        self._by_caption: Dict[str, List[int]] = {}
        for i, c in enumerate(self.captions):
            if c is not None:
                self._by_caption.setdefault(c, []).append(i)
        self._images: Dict[Tuple[int, int], torch.Tensor] = {}

    @staticmethod
    def _caption(path: Path) -> Optional[str]:
        side = path.with_suffix(".txt")
        return " ".join(side.read_text(encoding="utf-8").split()) if side.is_file() else None

    def images(self, size: Tuple[int, int]) -> torch.Tensor:
        """All expert images at `size` = (H, W), loaded once per size."""
        from ..features import load_images

        key = tuple(int(s) for s in size)
        if key not in self._images:
            self._images[key] = load_images(self.files, key)
        return self._images[key]

    def sample(self, prompts, size, generator=None):
        pool = self.images(size)
        picks = []
        for p in prompts:
            candidates = self._by_caption.get(" ".join(p.split()), None)
            if candidates:
                picks.append(candidates[int(torch.randint(len(candidates), (1,), generator=generator))])
            else:
                picks.append(int(torch.randint(len(self.files), (1,), generator=generator)))
        captions = [self.captions[i] for i in picks] if self.captioned else None
        return pool[torch.tensor(picks, dtype=torch.long)].clone(), captions


def build_expert_set(value: str, max_images: int = 0) -> ExpertSet:
    """The expert set for a checked `expert_data` value."""
    check_expert_data(value)
    if value.startswith(TOYWORLD_PREFIX):
        return ToyStyleExperts(value[len(TOYWORLD_PREFIX):])
    return FolderExperts(Path(value).expanduser(), max_images)
