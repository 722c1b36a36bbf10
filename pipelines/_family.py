"""Which generator family a saved diffusers pipeline belongs to, read from its config files only.

The trainer uses this to refuse a method that cannot drive the model (e.g. ROCM on a model with no
consistency sampler) before any weights are loaded.
"""
from __future__ import annotations

import json
from pathlib import Path
from typing import Optional

FAMILIES = ("diffusion", "flow", "consistency", "one_step", "mirror")

# Scheduler class -> family. Diffusion pipelines ship many schedulers; rollouts re-use their betas in DDIM.
_SCHEDULER_FAMILY = {
    "DDIMScheduler": "diffusion",
    "DDPMScheduler": "diffusion",
    "PNDMScheduler": "diffusion",
    "EulerDiscreteScheduler": "diffusion",
    "EulerAncestralDiscreteScheduler": "diffusion",
    "DPMSolverMultistepScheduler": "diffusion",
    "LMSDiscreteScheduler": "diffusion",
    "UniPCMultistepScheduler": "diffusion",
    "LCMScheduler": "consistency",
    "TCDScheduler": "consistency",
    "FlowMatchEulerDiscreteScheduler": "flow",
    "FlowMatchHeunDiscreteScheduler": "flow",
}


def detect_family(model: str) -> Optional[str]:
    """The family of a local diffusers folder (from model_index.json / scheduler config), or None if unknown.

    Hub ids are not resolved here (that would download); None means "not checked".
    """
    root = Path(model)
    if not root.is_dir():
        return None
    index = root / "model_index.json"
    if index.is_file():
        try:
            family = json.loads(index.read_text()).get("genft_family")
        except ValueError:
            family = None
        if family in FAMILIES:
            return family
    sched = root / "scheduler" / "scheduler_config.json"
    if not sched.is_file():
        return None
    try:
        name = json.loads(sched.read_text()).get("_class_name")
    except ValueError:
        return None
    return _SCHEDULER_FAMILY.get(name)
