"""Prompt embeddings computed once per prompt and reused by every rollout, optionally kept on disk.

Entries are keyed by the prompt text; the cache as a whole is keyed by the encoder's identity (its
class, config, tokenizer and a fingerprint of its weights, plus the output dtype), so a file
written for one encoder is never read for another. `install(pipeline)` routes the pipeline's
`encode_prompt` through the cache, so rollouts (and the empty negative prompt of CFG) hit it.
"""
from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Callable, Dict, List, Optional, Sequence, Union

import torch

from ._atomic import atomic_dir

_FILE = "embeddings.safetensors"


def encoder_identity(text_encoders: Sequence[torch.nn.Module], tokenizers: Sequence, out_dtype: torch.dtype) -> str:
    """A short hash naming the encoders: classes, configs, tokenizer vocabularies/lengths, weight fingerprints, output dtype."""
    h = hashlib.sha256()
    for enc in text_encoders:
        h.update(type(enc).__name__.encode())
        config = getattr(enc, "config", None)
        if config is not None:
            h.update(config.to_json_string(use_diff=False).encode() if hasattr(config, "to_json_string") else repr(config).encode())
        with torch.no_grad():  # per-tensor sums and shapes: cheap, and changes when any weight does
            for name, t in enc.state_dict().items():
                h.update(f"{name}{tuple(t.shape)}{t.dtype}{t.double().sum().item():.17g}".encode())
    for tok in tokenizers:
        h.update(f"{type(tok).__name__}|{len(tok)}|{tok.model_max_length}".encode())
    h.update(str(out_dtype).encode())
    return h.hexdigest()[:16]


class TextEmbeddingCache:
    """Prompt → embedding rows [L, D] for one text encoder; misses go to `encode` in one batch.

    `directory`: when given, `save()` writes `<directory>/<identity>/embeddings.safetensors`
    atomically and construction reads it back (onto `device`) if present.
    """

    def __init__(self, encode: Callable[[List[str]], torch.Tensor], identity: str,
                 directory: Optional[Union[str, Path]] = None, device: Union[str, torch.device] = "cpu"):
        self.encode_fn = encode
        self.device = torch.device(device)
        self.identity = identity
        self.directory = Path(directory) / identity if directory is not None else None
        self.rows: Dict[str, torch.Tensor] = {}
        self.encoded = 0  # prompts passed to the encoder (misses), for tests and logs
        if self.directory is not None and (self.directory / _FILE).is_file():
            self._load()

    @classmethod
    def for_pipeline(cls, pipeline, directory: Optional[Union[str, Path]] = None) -> "TextEmbeddingCache":
        """A cache over `pipeline.encode_prompt`, keyed by the identity of all its text encoders."""
        dtype = next(pipeline.unet.parameters()).dtype
        suffixes = ("", "_2", "_3")  # SDXL, SD3 and FLUX pipelines carry several encoders
        encoders = [e for e in (getattr(pipeline, f"text_encoder{s}", None) for s in suffixes) if e is not None]
        tokenizers = [t for t in (getattr(pipeline, f"tokenizer{s}", None) for s in suffixes) if t is not None]
        identity = encoder_identity(encoders, tokenizers, dtype)
        return cls(pipeline.encode_prompt, identity, directory, device=pipeline.device)

    def precompute(self, prompts: Sequence[str]) -> int:
        """Encode the prompts not cached yet (in one batch); returns how many were encoded."""
        missing = list(dict.fromkeys(p for p in prompts if p not in self.rows))
        if missing:
            out = self.encode_fn(missing)
            for p, row in zip(missing, out):
                self.rows[p] = row.detach().clone()
            self.encoded += len(missing)
        return len(missing)

    def __call__(self, prompts: Sequence[str]) -> torch.Tensor:
        """Embeddings [B, L, D] for `prompts` (a list), encoding only the misses."""
        if isinstance(prompts, str):
            raise TypeError("prompts must be a list of strings, not a single string")
        self.precompute(prompts)
        return torch.stack([self.rows[p] for p in prompts])

    def install(self, pipeline) -> "TextEmbeddingCache":
        """Route `pipeline.encode_prompt` through this cache (rollouts then reuse the cached rows)."""
        pipeline.encode_prompt = self
        return self

    def save(self) -> Optional[Path]:
        """Write the cache to disk atomically (no-op without a directory); returns the file."""
        if self.directory is None:
            return None
        from safetensors.torch import save_file

        prompts = list(self.rows)
        tensors = {str(i): self.rows[p].cpu().contiguous() for i, p in enumerate(prompts)}
        with atomic_dir(self.directory) as tmp:
            save_file(tensors, str(tmp / _FILE), metadata={"prompts": json.dumps(prompts), "identity": self.identity})
        return self.directory / _FILE

    def _load(self) -> None:
        from safetensors import safe_open

        path = self.directory / _FILE
        with safe_open(str(path), framework="pt") as f:
            meta = f.metadata() or {}
            if meta.get("identity") != self.identity:
                raise ValueError(f"text-embedding cache {str(path)!r} was written for encoder {meta.get('identity')!r}, "
                                 f"not {self.identity!r}; delete it")
            for i, p in enumerate(json.loads(meta["prompts"])):
                self.rows[p] = f.get_tensor(str(i)).to(self.device)
