"""Precomputed prompt embeddings: same values, no re-encoding, keyed by encoder identity, atomic on-disk copy."""
import pytest
import torch
from torch.testing import assert_close

from _tiny import tiny_diffusion_pipeline
from genft.text_cache import TextEmbeddingCache, encoder_identity

PROMPTS = ["a red cat", "a blue dog", "the moon"]


class CountingEncoder:
    """Wraps a pipeline's encode_prompt and counts the prompts it is asked to encode."""

    def __init__(self, pipe):
        self.encode, self.prompts = pipe.encode_prompt, 0

    def __call__(self, prompts):
        self.prompts += len(prompts)
        return self.encode(prompts)


def test_same_embeddings_and_no_re_encoding():
    pipe = tiny_diffusion_pipeline()
    counter = CountingEncoder(pipe)
    cache = TextEmbeddingCache(counter, identity="tiny")
    assert cache.precompute(PROMPTS + [""]) == 4 and counter.prompts == 4
    for batch in (PROMPTS, ["the moon", "a red cat", "the moon"], [""] * 3):
        assert_close(cache(batch), pipe.encode_prompt(batch))
    assert counter.prompts == 4  # every later call was a hit
    cache(["a green cat"])  # a miss is encoded once, then cached
    cache(["a green cat", "a red cat"])
    assert counter.prompts == 5 and cache.encoded == 5


def test_rollouts_reuse_the_cache_and_sample_the_same():
    seeds = lambda: [torch.Generator().manual_seed(i) for i in range(3)]  # noqa: E731
    plain = tiny_diffusion_pipeline().rollout(PROMPTS, generator=seeds(), num_inference_steps=2, guidance_scale=3.0)
    pipe = tiny_diffusion_pipeline()
    counter = CountingEncoder(pipe)
    cache = TextEmbeddingCache(counter, identity="tiny").install(pipe)
    cache.precompute(PROMPTS + [""])
    for _ in range(3):
        traj = pipe.rollout(PROMPTS, generator=seeds(), num_inference_steps=2, guidance_scale=3.0)
    assert counter.prompts == 4  # three rollouts with CFG: no prompt (nor the empty negative) encoded again
    assert_close(traj.latents, plain.latents)
    assert_close(traj.prompt_embeds, plain.prompt_embeds)


def test_identity_follows_the_encoder():
    a, b = tiny_diffusion_pipeline(), tiny_diffusion_pipeline()
    ident = encoder_identity([a.text_encoder], [a.tokenizer], torch.float32)
    assert ident == encoder_identity([b.text_encoder], [b.tokenizer], torch.float32)
    assert ident == TextEmbeddingCache.for_pipeline(a).identity
    assert ident != encoder_identity([a.text_encoder], [a.tokenizer], torch.bfloat16)
    assert ident != encoder_identity([a.text_encoder, b.text_encoder], [a.tokenizer], torch.float32)  # a second encoder counts
    with torch.no_grad():
        next(b.text_encoder.parameters()).add_(1e-3)
    assert ident != encoder_identity([b.text_encoder], [b.tokenizer], torch.float32)


def test_on_disk_cache_round_trip(tmp_path):
    pipe = tiny_diffusion_pipeline()
    cache = TextEmbeddingCache.for_pipeline(pipe, tmp_path)
    cache.precompute(PROMPTS)
    path = cache.save()
    assert path.is_file() and path.parent.name == cache.identity
    assert [p.name for p in tmp_path.iterdir()] == [cache.identity]  # no temporary folder left behind
    counter = CountingEncoder(pipe)
    again = TextEmbeddingCache(counter, cache.identity, tmp_path)
    assert_close(again(PROMPTS), cache(PROMPTS))
    assert counter.prompts == 0
    # A file written under another encoder's name is refused, not silently reused.
    (tmp_path / "other").mkdir()
    path.rename(tmp_path / "other" / path.name)
    with pytest.raises(ValueError, match="delete it"):
        TextEmbeddingCache(counter, "other", tmp_path)
