"""The world's exact oracle (digit classifier on real digits + palette colours) and the soft ToyOracleReward."""
from __future__ import annotations

import functools
from dataclasses import dataclass
from typing import Sequence

import numpy as np
import torch
import torch.nn.functional as F

from reward_models._base import RewardModel, check_images

from .data import COLORS, IMAGE_SIZE, DIGITS, _digits, digit_masks, palette_tensor, parse_prompt

# Softmax temperature over squared RGB distances for soft colour matches. The closest two palette
# colours are 0.73 apart (squared), so an exact colour scores ~1 and a colour halfway between two
# palette entries scores ~0.5.
COLOUR_TEMPERATURE = 0.05
_GAMMA, _C = 0.001, 3.0  # RBF SVC on 0..16 features: ~99% on a random held-out third of the real digits


def _fit_classifier(indices: Sequence[int] | None = None):
    """Fit a calibrated RBF SVC on real sklearn digits (all of them unless `indices` is given); ~0.3 s."""
    from sklearn.calibration import CalibratedClassifierCV
    from sklearn.svm import SVC

    images, labels = _digits()
    # Fit on the features the oracle will see: the world's 16x16 masks pooled back to 8x8.
    x = _features(digit_masks(images)).numpy()
    y = labels.numpy()
    if indices is not None:
        idx = np.asarray(indices, dtype=np.int64)
        x, y = x[idx], y[idx]
    return CalibratedClassifierCV(SVC(gamma=_GAMMA, C=_C), ensemble=False, cv=5).fit(x, y)


def _features(masks16: torch.Tensor) -> torch.Tensor:
    """Classifier features from [N,16,16] masks in [0,1]: 2x2 average-pooled to 8x8 on sklearn's 0..16 scale."""
    return (F.avg_pool2d(masks16[:, None].float(), 2)[:, 0] * 16.0).reshape(len(masks16), -1).double()


@functools.lru_cache(maxsize=1)
def _default_classifier():
    """The classifier fitted on all 1,797 real digits, fitted once per process (deterministic)."""
    return _fit_classifier(None)


@dataclass
class OraclePrediction:
    """What the oracle reads off a batch: hard labels plus the probabilities behind them."""

    digit: torch.Tensor  # int64 [B]
    fg: list[str]
    bg: list[str]
    digit_probs: torch.Tensor  # float32 [B,10]
    fg_probs: torch.Tensor  # float32 [B,len(COLORS)]
    bg_probs: torch.Tensor  # float32 [B,len(COLORS)]
    masks8: torch.Tensor  # float32 [B,8,8], stroke mask on the 0..16 scale fed to the classifier


class OracleEvaluator:
    """Measures digit, stroke colour and background colour of 16x16 toy-world images exactly.

    The digit comes from an SVC fitted on the real sklearn digits at construction (no pickles); the
    colours come from the pixels: background = median of the border pixels, stroke = mean of the
    pixels at >= 80% of the largest distance from the background, each snapped to the nearest
    palette colour; the stroke mask is each pixel's projection onto the measured bg->fg line,
    pooled to 8x8 on sklearn's 0..16 scale for the classifier.
    """

    def __init__(self, fit_indices: Sequence[int] | None = None):
        self.classifier = _default_classifier() if fit_indices is None else _fit_classifier(fit_indices)
        self.palette = palette_tensor(COLORS)

    @staticmethod
    def _check(images: torch.Tensor) -> None:
        """Refuse batches that are not float [B,3,16,16]."""
        if not isinstance(images, torch.Tensor) or not images.is_floating_point():
            raise TypeError("images must be a float tensor [B,3,16,16] in [0,1]")
        if images.ndim != 4 or tuple(images.shape[1:]) != (3, IMAGE_SIZE, IMAGE_SIZE):
            raise ValueError(f"images must have shape [B,3,{IMAGE_SIZE},{IMAGE_SIZE}], got {tuple(images.shape)}")
        if images.shape[0] == 0:
            raise ValueError("images is an empty batch; pass at least one image")

    def _colour_probs(self, rgb: torch.Tensor) -> torch.Tensor:
        """Soft assignment of colours [B,3] to palette entries: softmax(-squared distance / T)."""
        d2 = ((rgb[:, None, :] - self.palette[None]) ** 2).sum(-1)
        return torch.softmax(-d2 / COLOUR_TEMPERATURE, dim=-1)

    @torch.no_grad()
    def predict(self, images: torch.Tensor) -> OraclePrediction:
        """Read digit, stroke colour and background colour off each image of a [B,3,16,16] batch."""
        self._check(images)
        x = images.detach().float().cpu().clamp(0, 1)
        b = x.shape[0]
        pix = x.flatten(2).transpose(1, 2)  # [B,256,3]
        border = torch.ones(IMAGE_SIZE, IMAGE_SIZE, dtype=torch.bool)
        border[1:-1, 1:-1] = False
        bg_rgb = x[:, :, border].median(dim=-1).values  # [B,3]
        dist = (pix - bg_rgb[:, None]).norm(dim=-1)  # [B,256]
        far = dist >= 0.8 * dist.max(dim=1, keepdim=True).values
        fg_rgb = (pix * far[..., None]).sum(1) / far.sum(1, keepdim=True).clamp_min(1)
        axis = fg_rgb - bg_rgb
        denom = (axis**2).sum(-1, keepdim=True).clamp_min(1e-4)
        mask = (((pix - bg_rgb[:, None]) * axis[:, None]).sum(-1) / denom).clamp(0, 1)
        feats = _features(mask.view(b, IMAGE_SIZE, IMAGE_SIZE))
        masks8 = feats.float().view(b, 8, 8)
        probs = self.classifier.predict_proba(feats.numpy())
        digit_probs = torch.zeros(b, len(DIGITS))
        digit_probs[:, torch.as_tensor(self.classifier.classes_)] = torch.from_numpy(probs).float()
        fg_probs, bg_probs = self._colour_probs(fg_rgb), self._colour_probs(bg_rgb)
        return OraclePrediction(
            digit=digit_probs.argmax(-1),
            fg=[COLORS[i] for i in fg_probs.argmax(-1).tolist()],
            bg=[COLORS[i] for i in bg_probs.argmax(-1).tolist()],
            digit_probs=digit_probs,
            fg_probs=fg_probs,
            bg_probs=bg_probs,
            masks8=masks8,
        )

    def evaluate(self, images: torch.Tensor, prompts: Sequence[str]) -> dict:
        """Per-attribute and all-attribute accuracy of `images` against their prompts, plus per-sample correctness.

        Returns floats `digit_acc`, `fg_acc`, `bg_acc`, `all_acc`, the count `n`, and bool tensors
        [B] `digit_correct`, `fg_correct`, `bg_correct`, `all_correct`.
        """
        check_images(images, prompts)
        targets = [parse_prompt(p) for p in prompts]
        pred = self.predict(images)
        digit_ok = pred.digit == torch.tensor([t.digit for t in targets], dtype=torch.long)
        fg_ok = torch.tensor([p == t.fg for p, t in zip(pred.fg, targets)], dtype=torch.bool)
        bg_ok = torch.tensor([p == t.bg for p, t in zip(pred.bg, targets)], dtype=torch.bool)
        all_ok = digit_ok & fg_ok & bg_ok
        out: dict = {"n": len(targets)}
        for name, ok in (("digit", digit_ok), ("fg", fg_ok), ("bg", bg_ok), ("all", all_ok)):
            out[f"{name}_acc"] = ok.float().mean().item() if len(targets) else float("nan")
            out[f"{name}_correct"] = ok
        return out


class ToyOracleReward(RewardModel):
    """Soft prompt alignment in [0,1]: mean of p(prompted digit), p(prompted stroke colour), p(prompted bg colour).

    Probabilities come from the oracle (calibrated SVC for the digit, softmax over palette distances
    for the colours), so the score is smooth enough for policy gradients. Not differentiable.
    """

    name = "toy_oracle"
    differentiable = False

    def __init__(self, oracle: OracleEvaluator | None = None, **kwargs):
        super().__init__(**kwargs)
        self.oracle = oracle if oracle is not None else OracleEvaluator()

    def score(self, images: torch.Tensor, prompts: Sequence[str]) -> torch.Tensor:
        """One float32 score per image in [0,1]; prompts must be captions of the toy world."""
        targets = [parse_prompt(p) for p in prompts]
        pred = self.oracle.predict(images)
        rows = torch.arange(len(targets))
        p_digit = pred.digit_probs[rows, torch.tensor([t.digit for t in targets], dtype=torch.long)]
        p_fg = pred.fg_probs[rows, torch.tensor([COLORS.index(t.fg) for t in targets], dtype=torch.long)]
        p_bg = pred.bg_probs[rows, torch.tensor([COLORS.index(t.bg) for t in targets], dtype=torch.long)]
        return ((p_digit + p_fg + p_bg) / 3).float().to(images.device)
