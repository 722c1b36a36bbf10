"""The model-based rewards (CLIPScore, LAION aesthetic, HPSv2, PickScore, ImageReward), built tiny, loaded from disk.

Each reward is built from a tiny config of the real classes (open_clip CLIP, transformers CLIPModel / BLIP), saved to
tmp_path in the format a user downloads, and loaded back through the reward's public constructor. Scores are
compared with an independent computation that uses the libraries' own PIL/torchvision preprocessing.

Measured max-abs gap between reward_models._preprocess and the libraries' own transforms, in normalised
units (pixel gap / std; 1/255 in pixel units is ~0.015 here), over sizes 16..240 px, targets 32 and 224:
  - open_clip `preprocess` (PIL), square inputs and smooth inputs of any aspect ratio: <= 0.0163 (bicubic),
    <= 0.0150 (bilinear);
  - transformers CLIPImageProcessor (torchvision backend), any input: <= 0.0163; CLIPImageProcessorPil: as PIL.
All are tested at PRE_TOL = 0.02. The gap is PIL's uint8 rounding (0.5/255 after each resampling pass).
Exception, not tested: on non-square pixel noise Pillow 13 sometimes resamples height before width, and its
uint8 clipping of bicubic overshoot between the passes then differs by up to ~0.3 on isolated pixels.
Scores: equal to 1e-5 when no resize is needed; after resize within 5e-3 * max(1, |score|) (observed: CLIPScore
7e-4, HPS 1.4e-4, aesthetic 2e-5, PickScore 4e-3 on its +-7.4 scale).
"""
import json
import os

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image

PRE_TOL = 0.02
MEAN = (0.48145466, 0.4578275, 0.40821073)
STD = (0.26862954, 0.26130258, 0.27577711)
PROMPTS = ["a red cat", "a blue dog on the moon", "green", "the moon", "a cat"]


def _uint8(shape, seed, smooth=False):
    g = np.random.default_rng(seed)
    h, w = shape
    if not smooth:
        return g.integers(0, 256, (h, w, 3), dtype=np.uint8)
    yy, xx = np.mgrid[0:h, 0:w]
    ph = g.uniform(0, 6, 3)
    return np.stack([(np.sin(xx / 5.0 + p) * np.cos(yy / 7.0 - p) * 0.5 + 0.5) * 255 for p in ph], -1).round().astype(np.uint8)


def _to_tensor(arrays):
    return torch.stack([torch.from_numpy(a).permute(2, 0, 1) for a in arrays]).float() / 255


# --------------------------------------------------------------------------- tiny saved models


OPEN_CLIP_CFG = {
    "model_cfg": {"embed_dim": 16, "quick_gelu": True,
                  "vision_cfg": {"image_size": 32, "layers": 1, "width": 32, "patch_size": 8, "head_width": 16},
                  "text_cfg": {"context_length": 16, "vocab_size": 49408, "width": 32, "heads": 2, "layers": 1}},
    "preprocess_cfg": {"mean": list(MEAN), "std": list(STD), "interpolation": "bicubic", "resize_mode": "shortest"},
}


def _open_clip_folder(path, seed, weights=True):
    """An open_clip 'local-dir' folder: open_clip_config.json (+ open_clip_model.safetensors)."""
    import open_clip
    from safetensors.torch import save_file

    os.makedirs(path, exist_ok=True)
    with open(os.path.join(path, "open_clip_config.json"), "w") as f:
        json.dump(OPEN_CLIP_CFG, f)
    torch.manual_seed(seed)
    model = open_clip.create_model("local-dir:" + str(path))
    if weights:
        save_file({k: v.contiguous() for k, v in model.state_dict().items()},
                  os.path.join(path, "open_clip_model.safetensors"))
    return model.eval()


@pytest.fixture(scope="module")
def oc_dir(tmp_path_factory):
    d = tmp_path_factory.mktemp("tiny_open_clip")
    _open_clip_folder(d, seed=0)
    return str(d)


@pytest.fixture(scope="module")
def head_file(tmp_path_factory):
    torch.manual_seed(1)
    layers = torch.nn.Sequential(torch.nn.Linear(16, 1024), torch.nn.Dropout(0.2), torch.nn.Linear(1024, 128),
                                 torch.nn.Dropout(0.2), torch.nn.Linear(128, 64), torch.nn.Dropout(0.1),
                                 torch.nn.Linear(64, 16), torch.nn.Linear(16, 1))
    path = tmp_path_factory.mktemp("head") / "aesthetic-model.pth"
    torch.save({f"layers.{k}": v for k, v in layers.state_dict().items()}, path)
    return str(path)


@pytest.fixture(scope="module")
def hps_files(tmp_path_factory):
    """A config-only arch folder and an HPS-style checkpoint {'state_dict': ...} of other weights."""
    root = tmp_path_factory.mktemp("hps")
    _open_clip_folder(root / "arch", seed=0, weights=False)
    trained = _open_clip_folder(root / "scratch", seed=2, weights=False)
    ckpt = root / "HPS_v2.1_compressed.pt"
    torch.save({"state_dict": {k: v.half() for k, v in trained.state_dict().items()}}, ckpt)
    return str(root / "arch"), str(ckpt)


def _tiny_clip_tokenizer(path):
    """A CLIPTokenizer whose vocabulary is the lowercase letters (no merges): every word spells out."""
    from transformers import CLIPTokenizer

    vocab = {"<|startoftext|>": 0, "<|endoftext|>": 1}
    for c in "abcdefghijklmnopqrstuvwxyz":
        vocab[c] = len(vocab)
        vocab[c + "</w>"] = len(vocab)
    os.makedirs(path, exist_ok=True)
    with open(os.path.join(path, "vocab.json"), "w") as f:
        json.dump(vocab, f)
    with open(os.path.join(path, "merges.txt"), "w") as f:
        f.write("#version: 0.2\n")
    return CLIPTokenizer(os.path.join(path, "vocab.json"), os.path.join(path, "merges.txt"), model_max_length=16)


@pytest.fixture(scope="module")
def pick_dirs(tmp_path_factory):
    from transformers import CLIPConfig, CLIPImageProcessor, CLIPModel, CLIPProcessor

    root = tmp_path_factory.mktemp("pickscore")
    tok = _tiny_clip_tokenizer(str(root / "vocab"))
    cfg = CLIPConfig(
        text_config=dict(vocab_size=len(tok.get_vocab()), hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                         num_attention_heads=2, max_position_embeddings=16, bos_token_id=0, eos_token_id=1, pad_token_id=1),
        vision_config=dict(hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=2,
                           image_size=32, patch_size=8),
        projection_dim=16, logit_scale_init_value=2.0)
    torch.manual_seed(3)
    CLIPModel(cfg).eval().save_pretrained(root / "model")
    ip = CLIPImageProcessor(size={"shortest_edge": 32}, crop_size={"height": 32, "width": 32},
                            image_mean=list(MEAN), image_std=list(STD))
    CLIPProcessor(image_processor=ip, tokenizer=tok).save_pretrained(root / "processor")
    return str(root / "model"), str(root / "processor")


# ImageReward.pt names (BLIP's timm-style ViT) for transformers' BlipVisionModel names, to write a checkpoint in
# the published format. reward_models.image_reward maps them back; that mapping was also checked once against
# the original image-reward package's BLIP modules (outside this suite, which cannot install it).
_TO_BLIP_VIT = [(r"^embeddings\.class_embedding$", "cls_token"), (r"^embeddings\.position_embedding$", "pos_embed"),
                (r"^embeddings\.patch_embedding\.", "patch_embed.proj."),
                (r"^encoder\.layers\.(\d+)\.layer_norm(\d)\.", r"blocks.\1.norm\2."),
                (r"^encoder\.layers\.(\d+)\.self_attn\.qkv\.", r"blocks.\1.attn.qkv."),
                (r"^encoder\.layers\.(\d+)\.self_attn\.projection\.", r"blocks.\1.attn.proj."),
                (r"^encoder\.layers\.(\d+)\.mlp\.", r"blocks.\1.mlp."), (r"^post_layernorm\.", "norm.")]


@pytest.fixture(scope="module")
def ir_files(tmp_path_factory):
    """ImageReward.pt (+ med_config.json + a BERT tokenizer folder) for a tiny BLIP, and the modules themselves."""
    import re

    from transformers import BertTokenizer, BlipTextConfig, BlipTextModel, BlipVisionConfig, BlipVisionModel

    from reward_models.aesthetic import AestheticMLP

    root = tmp_path_factory.mktemp("image_reward")
    words = ["a", "red", "cat", "blue", "dog", "on", "the", "moon", "green"]
    (root / "tok").mkdir()
    (root / "tok" / "vocab.txt").write_text("\n".join(["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"] + words) + "\n")
    tok = BertTokenizer(str(root / "tok" / "vocab.txt"))
    tok.save_pretrained(root / "tok")
    med = {"hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 1, "num_attention_heads": 2,
           "max_position_embeddings": 40, "vocab_size": len(words) + 5, "hidden_act": "gelu", "layer_norm_eps": 1e-12,
           "pad_token_id": 0, "add_cross_attention": True, "encoder_width": 32}
    (root / "med_config.json").write_text(json.dumps(med))
    torch.manual_seed(4)
    vision = BlipVisionModel(BlipVisionConfig(hidden_size=32, intermediate_size=128, num_hidden_layers=1,
                                              num_attention_heads=2, image_size=32, patch_size=8, layer_norm_eps=1e-6))
    text = BlipTextModel(BlipTextConfig(vocab_size=med["vocab_size"], hidden_size=32, encoder_hidden_size=32,
                                        intermediate_size=64, num_hidden_layers=1, num_attention_heads=2,
                                        max_position_embeddings=40, pad_token_id=0, bos_token_id=2, sep_token_id=3),
                         add_pooling_layer=False)
    mlp = AestheticMLP(32)
    sd = {}
    for k, v in vision.state_dict().items():
        name = next(re.sub(p, r, k) for p, r in _TO_BLIP_VIT if re.match(p, k))
        sd["blip.visual_encoder." + name] = v
    sd.update({"blip.text_encoder." + k: v for k, v in text.state_dict().items()})
    sd.update({"mlp." + k: v for k, v in mlp.state_dict().items()})
    sd["blip.vision_proj.weight"] = torch.zeros(8, 32)  # unused BLIP parts are ignored
    torch.save(sd, root / "ImageReward.pt")
    return str(root / "ImageReward.pt"), str(root / "med_config.json"), str(root / "tok"), (vision, text, mlp, tok)


# --------------------------------------------------------------------------- the rewards and their references


def _build(kind, paths, **kw):
    from reward_models.aesthetic import LaionAesthetic
    from reward_models.clip_score import CLIPScore
    from reward_models.hps import HPSv2
    from reward_models.pickscore import PickScore

    if kind == "clip_score":
        return CLIPScore(paths["oc"], **kw)
    if kind == "aesthetic":
        return LaionAesthetic(paths["head"], clip_model=paths["oc"], **kw)
    if kind == "hps":
        return HPSv2(paths["hps"][1], arch=paths["hps"][0], **kw)
    if kind == "image_reward":
        from reward_models.image_reward import ImageReward

        ckpt, med, tok, _ = paths["ir"]
        return ImageReward(ckpt, med_config=med, tokenizer=tok, vision_heads=2, **kw)
    return PickScore(paths["pick"][0], paths["pick"][1], **kw)


def _reference(kind, paths, arrays, prompts):
    """The same score computed directly with open_clip / transformers and their own PIL preprocessing."""
    import open_clip

    pil = [Image.fromarray(a) for a in arrays]
    with torch.no_grad():
        if kind == "image_reward":  # ImageReward.score's steps, with its torchvision transform on PIL images
            from torchvision import transforms as T

            vision, text, mlp, tok = paths["ir"][3]
            pre = T.Compose([T.Resize(32, interpolation=T.InterpolationMode.BICUBIC), T.CenterCrop(32), T.ToTensor(),
                             T.Normalize(MEAN, STD)])
            emb = vision.eval()(pixel_values=torch.stack([pre(p) for p in pil])).last_hidden_state
            ids = tok(prompts, padding="max_length", truncation=True, max_length=35, return_tensors="pt")
            out = text.eval()(input_ids=ids.input_ids, attention_mask=ids.attention_mask, encoder_hidden_states=emb,
                              encoder_attention_mask=torch.ones(emb.shape[:2], dtype=torch.long)).last_hidden_state
            return (mlp.eval()(out[:, 0]) - 0.16717362830052426) / 1.0333394966054072
        if kind == "pickscore":
            from transformers import CLIPModel, CLIPProcessor

            model = CLIPModel.from_pretrained(paths["pick"][0]).eval()
            proc = CLIPProcessor.from_pretrained(paths["pick"][1])
            pix = proc(images=pil, return_tensors="pt")["pixel_values"]
            txt = proc(text=prompts, padding=True, truncation=True, max_length=16, return_tensors="pt")
            i = model.get_image_features(pixel_values=pix)
            t = model.get_text_features(input_ids=txt["input_ids"], attention_mask=txt["attention_mask"])
            i, t = [getattr(o, "pooler_output", o) for o in (i, t)]
            i, t = i / i.norm(dim=-1, keepdim=True), t / t.norm(dim=-1, keepdim=True)
            return model.logit_scale.exp() * (i * t).sum(-1)
        if kind == "hps":
            model, _, pre = open_clip.create_model_and_transforms("local-dir:" + paths["hps"][0])
            model.load_state_dict({k: v.float() for k, v in torch.load(paths["hps"][1], weights_only=True)["state_dict"].items()})
            tok = open_clip.get_tokenizer("local-dir:" + paths["hps"][0])
        else:
            model, _, pre = open_clip.create_model_and_transforms("local-dir:" + paths["oc"])
            tok = open_clip.get_tokenizer("local-dir:" + paths["oc"])
        model.eval()
        i = F.normalize(model.encode_image(torch.stack([pre(p) for p in pil])), dim=-1)
        if kind == "aesthetic":
            sd = torch.load(paths["head"], weights_only=True)
            x = i
            for j in (0, 2, 4, 6, 7):
                x = F.linear(x, sd[f"layers.{j}.weight"], sd[f"layers.{j}.bias"])
            return x[:, 0]
        t = F.normalize(model.encode_text(tok(prompts)), dim=-1)
        cos = (i * t).sum(-1)
        return cos if kind == "hps" else 2.5 * cos.clamp(min=0)


KINDS = ["clip_score", "aesthetic", "hps", "pickscore", "image_reward"]
RANGES = {"clip_score": (0.0, 2.5), "aesthetic": (-1e3, 1e3), "hps": (-1.0, 1.0), "pickscore": (-7.4, 7.4),
          "image_reward": (-1e3, 1e3)}


@pytest.fixture(scope="module")
def paths(oc_dir, head_file, hps_files, pick_dirs, ir_files):
    return {"oc": oc_dir, "head": head_file, "hps": hps_files, "pick": pick_dirs, "ir": ir_files}


@pytest.fixture(scope="module")
def rewards(paths):
    return {k: _build(k, paths) for k in KINDS}


@pytest.mark.parametrize("kind", KINDS)
def test_scores_shape_range_and_determinism(kind, rewards):
    r = rewards[kind]
    x = _to_tensor([_uint8((40, 40), s) for s in range(5)])
    a, b = r(x, PROMPTS), r(x, PROMPTS)
    assert a.shape == (5,) and a.dtype == torch.float32 and torch.isfinite(a).all()
    lo, hi = RANGES[kind]
    assert (a >= lo).all() and (a <= hi).all(), a
    assert torch.equal(a, b)
    assert not a.requires_grad


@pytest.mark.parametrize("kind", KINDS)
def test_equals_direct_library_computation(kind, rewards, paths):
    # At the model's own size preprocessing is only normalisation: the scores must agree to float precision.
    arrays = [_uint8((32, 32), 10 + s) for s in range(5)]
    torch.testing.assert_close(rewards[kind](_to_tensor(arrays), PROMPTS), _reference(kind, paths, arrays, PROMPTS),
                               atol=1e-5, rtol=1e-5)
    # Larger images go through resize + crop; the only gap left is PIL's uint8 rounding (see module docstring).
    for arrays in ([_uint8((48, 48), 20 + s) for s in range(3)], [_uint8((45, 61), 30 + s, smooth=True) for s in range(2)]):
        ours = rewards[kind](_to_tensor(arrays), PROMPTS[:len(arrays)])
        ref = _reference(kind, paths, arrays, PROMPTS[:len(arrays)])
        torch.testing.assert_close(ours, ref, atol=5e-3 * max(1.0, ref.abs().max().item()), rtol=0)


@pytest.mark.parametrize("kind", KINDS)
def test_gradients_wrt_images(kind, paths):
    kw = {"mode": "cosine"} if kind == "clip_score" else {}  # CLIPScore's max(cos, 0) has a kink at 0
    r = _build(kind, paths, dtype=torch.float64, differentiable=True, **kw)
    x = (0.2 + 0.6 * torch.rand(1, 3, 8, 8, dtype=torch.float64, generator=torch.Generator().manual_seed(0)))
    assert torch.autograd.gradcheck(lambda im: r.score(im, ["a cat"]), (x.requires_grad_(),), eps=1e-6, atol=1e-5)
    # Through the public call the graph reaches float32 inputs too.
    y = torch.rand(2, 3, 40, 40, requires_grad=True)
    r(y, ["a cat", "a dog"]).sum().backward()
    assert y.grad is not None and torch.isfinite(y.grad).all() and y.grad.abs().sum() > 0


@pytest.mark.parametrize("kind", KINDS)
def test_not_differentiable_returns_no_graph(kind, rewards):
    y = torch.rand(2, 3, 40, 40, requires_grad=True)
    out = rewards[kind](y, ["a cat", "a dog"])
    assert not out.requires_grad and out.grad_fn is None


@pytest.mark.parametrize("kind", KINDS)
def test_dtype_and_batch_size(kind, paths, rewards):
    x = _to_tensor([_uint8((40, 40), 40 + s) for s in range(5)])
    base = rewards[kind](x, PROMPTS)
    scale = max(1.0, base.abs().max().item())
    torch.testing.assert_close(_build(kind, paths, batch_size=2)(x, PROMPTS), base, atol=1e-5 * scale, rtol=1e-5)
    torch.testing.assert_close(_build(kind, paths, dtype=torch.float64, device="cpu")(x, PROMPTS), base,
                               atol=1e-4 * scale, rtol=1e-4)
    low = _build(kind, paths, dtype=torch.bfloat16)
    assert next(low.parameters()).dtype == torch.bfloat16
    out = low(x, PROMPTS)
    assert out.dtype == torch.float32
    torch.testing.assert_close(out, base, atol=0.1 * scale, rtol=0)


# --------------------------------------------------------------------------- preprocessing vs the libraries


@pytest.mark.parametrize("interp", ["bicubic", "bilinear"])
def test_preprocess_matches_open_clip_transform(interp):
    from open_clip.transform import PreprocessCfg, image_transform_v2

    from reward_models._preprocess import from_open_clip

    cfg = dict(size=32, mean=MEAN, std=STD, interpolation=interp, resize_mode="shortest")
    theirs, ours = image_transform_v2(PreprocessCfg(**cfg), is_train=False), from_open_clip(cfg)
    arrays = [_uint8((s, s), s) for s in (16, 33, 40, 64, 100)]
    arrays += [_uint8(hw, 7, smooth=True) for hw in ((48, 40), (37, 61), (20, 24), (100, 33))]
    for a in arrays:
        torch.testing.assert_close(ours(_to_tensor([a])), theirs(Image.fromarray(a))[None], atol=PRE_TOL, rtol=0)


def test_preprocess_matches_transformers_image_processors():
    from transformers import CLIPImageProcessor
    from transformers.models.clip.image_processing_pil_clip import CLIPImageProcessorPil

    from reward_models._preprocess import from_hf_image_processor

    kw = dict(size={"shortest_edge": 32}, crop_size={"height": 32, "width": 32}, image_mean=MEAN, image_std=STD)
    tv, pil = CLIPImageProcessor(**kw), CLIPImageProcessorPil(**kw)
    ours = from_hf_image_processor(tv)
    assert ours.config == from_hf_image_processor(pil).config
    noise_any_shape = [_uint8(hw, 3) for hw in ((48, 40), (37, 61), (20, 24), (100, 33), (33, 33))]
    for a in noise_any_shape:
        ref = torch.as_tensor(np.asarray(tv(images=Image.fromarray(a), return_tensors="pt")["pixel_values"]))
        torch.testing.assert_close(ours(_to_tensor([a])), ref, atol=PRE_TOL, rtol=0)
    for a in [_uint8((s, s), s) for s in (16, 40, 64)] + [_uint8((37, 61), 5, smooth=True)]:
        ref = torch.as_tensor(np.asarray(pil(images=Image.fromarray(a), return_tensors="pt")["pixel_values"]))
        torch.testing.assert_close(ours(_to_tensor([a])), ref, atol=PRE_TOL, rtol=0)


def test_preprocess_crop_rounding_follows_each_library():
    from reward_models._preprocess import ImagePreprocess, PreprocessConfig

    x = torch.arange(7.0).view(1, 1, 1, 7).expand(1, 3, 7, 7) / 10
    crop = dict(mean=(0.0,) * 3, std=(1.0,) * 3, crop=(4, 4))
    # (7 - 4) / 2 = 1.5: torchvision's CenterCrop rounds to 2, transformers floors to 1.
    assert ImagePreprocess(PreprocessConfig(**crop, crop_rounding="round"))(x)[0, 0, 0, 0] == pytest.approx(0.2)
    assert ImagePreprocess(PreprocessConfig(**crop, crop_rounding="floor"))(x)[0, 0, 0, 0] == pytest.approx(0.1)


# --------------------------------------------------------------------------- loading errors


def test_loading_errors_name_the_problem(tmp_path, paths):
    from reward_models.aesthetic import LaionAesthetic
    from reward_models.clip_score import CLIPScore
    from reward_models.hps import HPSv2
    from reward_models.image_reward import ImageReward
    from reward_models.pickscore import PickScore

    with pytest.raises(FileNotFoundError, match="does not exist"):
        CLIPScore(str(tmp_path / "missing"))
    with pytest.raises(FileNotFoundError, match="open_clip_config.json"):
        CLIPScore(str(tmp_path))
    _open_clip_folder(tmp_path / "noweights", seed=0, weights=False)
    with pytest.raises(FileNotFoundError, match="no weights"):
        CLIPScore(str(tmp_path / "noweights"))
    with pytest.raises(ValueError, match="unknown open_clip architecture"):
        CLIPScore("ViT-Q-99")
    with pytest.raises(ValueError, match="neither a file nor a known tag"):
        CLIPScore("ViT-B-32", pretrained="no-such-tag")
    with pytest.raises(ValueError, match="scale applies only"):
        CLIPScore(paths["oc"], mode="cosine", scale=3.0)
    with pytest.raises(FileNotFoundError, match="neither an existing"):
        LaionAesthetic(str(tmp_path / "head.pth"), clip_model=paths["oc"])
    wide = tmp_path / "wide.pth"
    torch.save({f"layers.{j}.{p}": torch.zeros(o, i) if p == "weight" else torch.zeros(o)
                for j, (i, o) in {0: (768, 1024), 2: (1024, 128), 4: (128, 64), 6: (64, 16), 7: (16, 1)}.items()
                for p in ("weight", "bias")}, wide)
    with pytest.raises(ValueError, match="768-d CLIP embeddings"):
        LaionAesthetic(str(wide), clip_model=paths["oc"])
    with pytest.raises(ValueError, match="does not fit open_clip architecture"):
        HPSv2(paths["hps"][1], arch="ViT-B-32")
    with pytest.raises(FileNotFoundError, match="HPS checkpoint"):
        HPSv2(str(tmp_path / "HPS_v2.pt"), arch=paths["hps"][0])
    with pytest.raises(FileNotFoundError, match="no transformers files"):
        PickScore(str(tmp_path), paths["pick"][1])
    ckpt, med, tok, _ = paths["ir"]
    with pytest.raises(FileNotFoundError, match="ImageReward checkpoint"):
        ImageReward(str(tmp_path / "ImageReward.pt"), med_config=med, tokenizer=tok)
    with pytest.raises(ValueError, match="not an ImageReward checkpoint"):
        ImageReward(paths["head"], med_config=med, tokenizer=tok)


def test_safetensors_checkpoints_load_too(tmp_path, paths, rewards):
    from safetensors.torch import save_file

    from reward_models.aesthetic import LaionAesthetic
    from reward_models.hps import HPSv2

    x = _to_tensor([_uint8((32, 32), s) for s in range(2)])
    head = torch.load(paths["head"], weights_only=True)
    save_file(head, tmp_path / "head.safetensors")
    torch.testing.assert_close(LaionAesthetic(str(tmp_path / "head.safetensors"), clip_model=paths["oc"])(x, PROMPTS[:2]),
                               rewards["aesthetic"](x, PROMPTS[:2]))
    sd = torch.load(paths["hps"][1], weights_only=True)["state_dict"]
    save_file({k: v.contiguous() for k, v in sd.items()}, tmp_path / "hps.safetensors")
    torch.testing.assert_close(HPSv2(str(tmp_path / "hps.safetensors"), arch=paths["hps"][0])(x, PROMPTS[:2]),
                               rewards["hps"](x, PROMPTS[:2]))
