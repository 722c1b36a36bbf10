"""The frozen reference network that KL and divergence terms compare the policy against.

Full fine-tuning keeps a frozen copy of the network. With LoRA the base weights never change, so the
reference is a *view* of the policy network instead: the same module called with its adapters
switched off (the pretrained model) or with a second, frozen "reference" adapter active (GARDO's
moving reference). That saves a whole copy of the network (about 5 GB for SD3.5-Medium's transformer in bf16).
peft has no "call with this adapter" context, so `AdapterReference` switches the adapters around
each call and puts back the active adapter and every `requires_grad` flag it found.
"""
from __future__ import annotations

import copy
from contextlib import contextmanager
from typing import Iterator, List, Optional, Tuple

import torch

from .lora import ADAPTER_NAME, has_lora

REFERENCE_ADAPTER = "reference"


class AdapterReference:
    """Calls the policy network as its reference: adapters off (`adapter=None`) or one named frozen adapter.

    Stands where a frozen copy would: it is called like the network, exposes the network as `.module`
    (so `pipelines` read its config and class through their usual unwrap), and yields its parameters
    (for the dtype). It owns no weights; nothing it does survives the call.
    """

    def __init__(self, policy: torch.nn.Module, adapter: Optional[str] = None):
        if not has_lora(policy):
            raise ValueError("AdapterReference needs a network with LoRA adapters (finetune=lora); "
                             "full fine-tuning keeps a frozen copy instead")
        self.module = policy
        self.adapter = adapter

    def parameters(self, recurse: bool = True) -> Iterator[torch.nn.Parameter]:
        return self.module.parameters(recurse)

    @property
    def config(self):
        return self.module.config

    @property
    def dtype(self) -> torch.dtype:
        return next(self.module.parameters()).dtype

    @property
    def device(self) -> torch.device:
        return next(self.module.parameters()).device

    def __call__(self, *args, **kwargs):
        with self.active():
            return self.module(*args, **kwargs)

    @contextmanager
    def active(self):
        """Inside: the network computes the reference (eval mode, no internal gradient checkpointing)."""
        net = self.module
        was_training = net.training
        # diffusers recomputes checkpointed blocks during backward, after this context has switched the
        # adapters back: a reference forward that keeps a graph (ROCM) must not be checkpointed.
        checkpointing = bool(getattr(net, "is_gradient_checkpointing", False)) and torch.is_grad_enabled()
        previous = list(net.active_adapters()) if self.adapter is not None else None
        with _requires_grad_kept(net):
            try:
                if checkpointing:
                    net.disable_gradient_checkpointing()
                net.train(False)
                if self.adapter is None:
                    net.disable_adapters()
                else:
                    net.set_adapter(self.adapter)
                yield net
            finally:
                if self.adapter is None:
                    net.enable_adapters()
                else:
                    net.set_adapter(previous)
                net.train(was_training)
                if checkpointing:
                    net.enable_gradient_checkpointing()

@contextmanager
def _requires_grad_kept(net: torch.nn.Module) -> Iterator[None]:
    """Put back every parameter's `requires_grad` on exit: peft's adapter switches flip them, and the
    optimiser's (and DDP's) view of what trains must not change."""
    flags: List[Tuple[torch.nn.Parameter, bool]] = [(p, p.requires_grad) for p in net.parameters()]
    try:
        yield
    finally:
        for p, flag in flags:
            p.requires_grad_(flag)


def make_reference(policy: torch.nn.Module, lora: bool):
    """The reference for a run: a view of the base under LoRA, else a frozen eval-mode deep copy of `policy`."""
    if lora:
        return AdapterReference(policy)
    return copy.deepcopy(policy).requires_grad_(False).eval()


def add_reference_adapter(reference: AdapterReference) -> None:
    """Give `reference` its own frozen adapter, a copy of the policy's trainable one, and make calls use it."""
    net = reference.module
    if REFERENCE_ADAPTER not in net.peft_config:
        with _requires_grad_kept(net):
            net.add_adapter(copy.deepcopy(net.peft_config[ADAPTER_NAME]), adapter_name=REFERENCE_ADAPTER)
            net.set_adapter(ADAPTER_NAME)  # add_adapter activates the new one; training stays on the policy's
        for p in reference_adapter_parameters(net).values():
            p.requires_grad_(False)
    reference.adapter = REFERENCE_ADAPTER
    copy_policy_adapter(net)


def _adapter_parameters(net: torch.nn.Module, adapter: str) -> dict:
    """Name (with the adapter's own name taken out) -> parameter of one adapter's LoRA weights."""
    marker = f".{adapter}."
    return {n.replace(marker, "."): p for n, p in net.named_parameters() if "lora_" in n and marker in n}


def reference_adapter_parameters(net: torch.nn.Module) -> dict:
    return _adapter_parameters(net, REFERENCE_ADAPTER)


@torch.no_grad()
def copy_policy_adapter(net: torch.nn.Module) -> None:
    """Reference adapter := the policy's adapter, weight for weight (GARDO's reference reset under LoRA)."""
    policy, ref = _adapter_parameters(net, ADAPTER_NAME), reference_adapter_parameters(net)
    if set(policy) != set(ref) or not policy:
        raise RuntimeError(f"the reference adapter does not mirror the policy's: {len(policy)} vs {len(ref)} tensors")
    for name, p in policy.items():
        ref[name].copy_(p)
