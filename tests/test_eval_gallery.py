"""`genft eval` end to end on a tiny saved model and checkpoint; refusals before sampling; trackers; features."""
import base64
import csv
import io
import json
import sys
import types
from html.parser import HTMLParser

import numpy as np
import pytest
import torch
from PIL import Image

import genft.models
from genft.checkpoint import save_checkpoint
from genft.cli import main
from genft.config import ConfigError
from genft.evaluation import sample_grid
from genft.features import PixelFeatures, ToyOracleFeatures, load_features
from genft.metrics import frechet_distance_features
from genft.tracking import CSVTracker, RunLog, Tracker, check_tracker, make_tracker
from _tiny import tiny_diffusion_pipeline

PROMPTS = "a red cat\na blue dog\n"


def make_eval_inputs(root):
    """A tiny model folder, a perturbed checkpoint in run/checkpoints/final with run/log.jsonl, reference PNGs, prompts."""
    pipe = tiny_diffusion_pipeline()
    pipe.save_pretrained(root / "model")
    with torch.no_grad():
        for p in pipe.unet.parameters():
            p.add_(0.2 * torch.randn_like(p))
    ckpt = root / "run" / "checkpoints" / "final"
    save_checkpoint(ckpt, pipe.unet, torch.optim.SGD(pipe.unet.parameters(), lr=0.1), {},
                    {"round": 2, "config": {"model": str(root / "model"), "reward": "jpeg_compressibility",
                                            "eval_rewards": ["jpeg_incompressibility"]}})
    (root / "run" / "log.jsonl").write_text("\n".join(json.dumps(r) for r in [
        {"round": 1, "reward_mean": -0.7, "reward_std": 0.01}, {"round": 2, "reward_mean": -0.6, "reward_std": 0.02},
        {"round": 2, "event": "eval", "eval/jpeg_compressibility": -0.6}]))
    (root / "ref").mkdir()
    rng = np.random.default_rng(0)
    for i in range(6):
        Image.fromarray(rng.integers(0, 255, (8, 8, 3), dtype=np.uint8)).save(root / "ref" / f"{i}.png")
    (root / "prompts.txt").write_text(PROMPTS)
    return ckpt


def eval_args(root, out, *extra):
    return ["eval", "--checkpoints", str(root / "run" / "checkpoints" / "final"), "--prompts", str(root / "prompts.txt"),
            "--images-per-prompt", "2", "--steps", "2", "--features", "pixels", "--reference", str(root / "ref"),
            "--out", str(out), "--no-progress", "--device", "cpu", *extra]


@pytest.fixture(scope="module")
def inputs(tmp_path_factory):
    root = tmp_path_factory.mktemp("eval")
    make_eval_inputs(root)
    return root


class _Imgs(HTMLParser):
    def __init__(self):
        super().__init__()
        self.imgs, self.rows = [], 0

    def handle_starttag(self, tag, attrs):
        if tag == "img":
            self.imgs.append(dict(attrs))
        self.rows += tag == "tr"


def test_eval_writes_gallery_json_csv_with_fixed_seeds(inputs, capsys):
    out = inputs / "out"
    # rewards, held-out rewards and the model come from the checkpoint's training config
    assert main(eval_args(inputs, out)) == 0
    assert "gallery:" in capsys.readouterr().out
    summary = json.loads((out / "metrics.json").read_text())
    labels = [m["label"] for m in summary["models"]]
    assert labels == ["base", "run/final"]
    kinds = {k: v["kind"] for k, v in summary["metrics"]["base"].items()}
    assert kinds == {"jpeg_compressibility": "reward", "jpeg_incompressibility": "held-out reward",
                     "diversity": "diversity (within prompt)", "frechet_distance": "Fréchet distance to real data"}
    for row in summary["metrics"].values():
        assert all(np.isfinite(m["mean"]) for m in row.values())
        assert row["diversity"]["mean"] > 0 and row["frechet_distance"]["std"] is None
    with (out / "metrics.csv").open() as f:
        rows = list(csv.DictReader(f))
    assert len(rows) == 2 * 4 and {r["model"] for r in rows} == set(labels)
    fd = next(r for r in rows if r["model"] == "base" and r["metric"] == "frechet_distance")
    assert float(fd["mean"]) == pytest.approx(summary["metrics"]["base"]["frechet_distance"]["mean"]) and fd["std"] == ""

    per_image = json.loads((out / "samples.json").read_text())
    assert len(per_image) == 2 * 2 * 2 and all("jpeg_compressibility" in s["scores"] for s in per_image)
    seeds = {lab: [s["seed"] for s in per_image if s["model"] == lab] for lab in labels}
    assert seeds["base"] == seeds["run/final"], "models must see the same noise"
    pix = {lab: [np.asarray(Image.open(out / s["file"])) for s in per_image if s["model"] == lab] for lab in labels}
    assert not np.array_equal(pix["base"][0], pix["run/final"][0]), "the checkpoint's weights were not loaded"
    assert Image.open(out / "evals" / "base" / "grid.png").size[0] > 64

    parser = _Imgs()
    parser.feed((out / "gallery.html").read_text())
    samples = [i for i in parser.imgs if "sample" in i.get("class", "")]
    assert len(samples) == len(per_image) and all("jpeg_compressibility=" in i["title"] for i in samples)
    for img in parser.imgs:
        Image.open(io.BytesIO(base64.b64decode(img["src"].split(",", 1)[1]))).verify()
    assert sum(i.get("class") == "curve" for i in parser.imgs) == 1  # the run's log.jsonl, found beside checkpoints/
    assert parser.rows == 1 + 4


def _no_model(*a, **k):
    raise AssertionError("a model was loaded before the inputs were checked")


@pytest.mark.parametrize("extra, needle", [
    (["--checkpoints", "does/not/exist"], "--checkpoints 'does/not/exist' is not a folder"),
    (["--rewards", "no_such_reward"], "--rewards: unknown reward 'no_such_reward'"),
    (["--heldout-rewards", "toy_oracle_accuracy"], "--prompts"),
    (["--logs", "missing.jsonl"], "--logs 'missing.jsonl'"),
    (["--labels", "only-one"], "--labels gives 1 names for 2 models"),
    (["--features", "nope"], "--features: unknown features 'nope'"),
    (["--reference", "no_dir"], "--reference"),
    (["--reward-options", "{clip_score: {}}"], "--reward-options names ['clip_score']"),
])
def test_bad_inputs_are_refused_before_any_model_loads(inputs, tmp_path, monkeypatch, capsys, extra, needle):
    monkeypatch.setattr(genft.models, "load_pipeline", _no_model)
    args = eval_args(inputs, tmp_path / "out")
    if extra[0] == "--checkpoints":
        args[args.index("--checkpoints") + 1] = extra[1]
        extra = []
    assert main(args + extra) == 2
    assert needle in capsys.readouterr().err
    assert not (tmp_path / "out").exists()


def test_corrupt_checkpoint_is_refused(tmp_path, monkeypatch, capsys):
    monkeypatch.setattr(genft.models, "load_pipeline", _no_model)
    ckpt = make_eval_inputs(tmp_path)
    weights = next((ckpt / "unet").glob("*.safetensors"))
    data = bytearray(weights.read_bytes())
    data[-1] ^= 0xFF
    weights.write_bytes(bytes(data))
    assert main(eval_args(tmp_path, tmp_path / "out")) == 2
    assert "--checkpoints" in (err := capsys.readouterr().err) and "does not match" in err


def test_checkpoint_of_another_model_is_refused_before_sampling(tmp_path, monkeypatch, capsys):
    import genft.evaluation
    from diffusers import UNet2DConditionModel

    make_eval_inputs(tmp_path)
    other = UNet2DConditionModel(sample_size=8, in_channels=3, out_channels=3, layers_per_block=1, block_out_channels=(8, 16),
                                 down_block_types=("DownBlock2D", "DownBlock2D"), up_block_types=("UpBlock2D", "UpBlock2D"),
                                 cross_attention_dim=16, norm_num_groups=8)
    ckpt = tmp_path / "other"
    save_checkpoint(ckpt, other, torch.optim.SGD(other.parameters(), lr=0.1), {}, {"round": 1})
    monkeypatch.setattr(genft.evaluation, "evaluate_pipeline", _no_model)
    args = eval_args(tmp_path, tmp_path / "out")
    args[args.index("--checkpoints") + 1] = str(ckpt)
    assert main(args + ["--model", str(tmp_path / "model"), "--rewards", "jpeg_compressibility"]) == 2
    assert "was not trained from this --model" in capsys.readouterr().err


# ----- trackers --------------------------------------------------------------------------------
def test_csv_tracker_grows_header_and_keeps_rows_on_resume(tmp_path):
    t = make_tracker("csv", tmp_path)
    t.log({"reward_mean": 0.5}, step=1)
    t.log({"reward_mean": 0.6, "kl": 0.1}, step=2)
    t.close()
    t2 = CSVTracker(tmp_path)  # a resumed run appends
    t2.log({"reward_mean": 0.7}, step=3)
    with (tmp_path / "tracker.csv").open() as f:
        rows = list(csv.DictReader(f))
    assert [r["step"] for r in rows] == ["1", "2", "3"] and rows[1]["kl"] == "0.1" and rows[0]["kl"] == ""


def test_runlog_forwards_records_to_the_tracker(tmp_path):
    seen = []

    class Spy(Tracker):
        def log(self, record, step):
            seen.append((step, dict(record)))

    log = RunLog(tmp_path, tracker=make_tracker(Spy(), tmp_path))
    log.log({"round": 3, "reward_mean": 1.0})
    log.close()
    assert seen == [(3, {"round": 3, "reward_mean": 1.0})] and log.records() == [{"round": 3, "reward_mean": 1.0}]


def test_wandb_is_imported_only_when_chosen(tmp_path, monkeypatch):
    calls = []
    run = types.SimpleNamespace(log=lambda data, step: calls.append((step, data)), finish=lambda: calls.append("finish"))
    monkeypatch.setitem(sys.modules, "wandb", types.SimpleNamespace(init=lambda **kw: run))
    t = make_tracker("wandb", tmp_path, {"lr": 1e-5})
    t.log({"round": 1, "reward_mean": 0.5, "event": "eval", "ok": True}, step=1)
    t.close()
    assert calls == [(1, {"round": 1.0, "reward_mean": 0.5}), "finish"]


@pytest.mark.parametrize("name", ["tensorboard", "wandb"])
def test_missing_tracker_package_is_a_clear_error(name, monkeypatch):
    monkeypatch.setitem(sys.modules, name, None)  # import fails as if not installed
    with pytest.raises(ConfigError, match=f"pip install {name}"):
        check_tracker(name)
    with pytest.raises(ConfigError, match="valid: none, csv, tensorboard, wandb"):
        check_tracker("mlflow")


def test_tensorboard_tracker_writes_events_when_installed(tmp_path):
    pytest.importorskip("tensorboard")
    t = make_tracker("tensorboard", tmp_path)
    t.log({"round": 1, "reward_mean": 0.5}, step=1)
    t.close()
    assert list((tmp_path / "tensorboard").glob("events.out.tfevents.*"))


def test_train_with_csv_tracker_writes_tracker_rows_and_sample_grids(tmp_path):
    from genft.loading import load_config
    from genft.trainer import Trainer

    (tmp_path / "p.txt").write_text(PROMPTS)
    cfg = load_config(None, method="dpok", reward="jpeg_compressibility", eval_rewards=[], prompts=str(tmp_path / "p.txt"),
                      eval_prompts=str(tmp_path / "p.txt"), output_dir=str(tmp_path / "run"), num_rounds=2, eval_every=1,
                      prompts_per_round=2, samples_per_prompt=2, num_inference_steps=2, p_step=1, gradient_accumulation=1,
                      p_batch_size=4, progress=False, eval_images_per_prompt=1, device="cpu", tracker="csv")
    Trainer(cfg, pipeline=tiny_diffusion_pipeline()).train()
    with (tmp_path / "run" / "tracker.csv").open() as f:
        rows = list(csv.DictReader(f))
    assert [r["step"] for r in rows if r.get("reward_mean")] == ["1", "2"]
    for tag in ("before", "round_00001", "after"):
        assert Image.open(tmp_path / "run" / "evals" / tag / "grid.png").size == (2 * 2 + 64, 3 * 2 + 2 * 64)


# ----- grids and features ----------------------------------------------------------------------
def test_sample_grid_layout():
    grid = sample_grid(torch.rand(6, 3, 16, 16), rows=3, min_cell_px=32, pad=1)
    assert grid.size == (2 * 32 + 3, 3 * 32 + 4)
    with pytest.raises(ValueError, match="rows"):
        sample_grid(torch.rand(5, 3, 8, 8), rows=2)


def test_features_registry_and_shapes():
    x = torch.rand(5, 3, 16, 16)
    assert load_features("pixels", size=4)(x).shape == (5, 48)
    assert isinstance(load_features(PixelFeatures()), PixelFeatures)
    with pytest.raises(ValueError, match="valid: clip, dino, pixels, toy_oracle"):
        load_features("inception")
    with pytest.raises(ValueError, match="do not take options"):
        load_features("pixels", colour=True)


def test_toy_oracle_features_separate_real_from_collapsed_or_blurred_data():
    from genft.toyworld import heldout_combos, render

    combos = heldout_combos() * 4
    feats = ToyOracleFeatures()
    g = lambda s: torch.Generator().manual_seed(s)  # noqa: E731
    a, b = feats(render(combos, generator=g(0))), feats(render(combos, generator=g(1)))
    collapsed = feats(render([(0, c.fg, c.bg) for c in combos], generator=g(2)))  # every prompt drawn as a 0
    blurred = feats(torch.nn.functional.avg_pool2d(render(combos, generator=g(3)), 3, 1, 1))
    assert a.shape == (len(combos), 84)
    floor = frechet_distance_features(a, b)
    assert floor < 0.2 * frechet_distance_features(a, collapsed) and floor < 0.2 * frechet_distance_features(a, blurred)


def test_toy_stroke_features_read_the_handwriting_not_the_ink():
    """Blobs that hide the handwriting read as *more* diverse in the oracle's read-out, and as less in the unit stroke mask."""
    from genft.metrics import diversity_within_prompt
    from genft.toyworld import heldout_combos, render
    from genft.toyworld.data import PALETTE, caption
    from genft.toyworld.ink import INK_SIGMA

    combos = [c for c in heldout_combos()[:6] for _ in range(8)]
    prompts = [caption(*c) for c in combos]
    images = render(combos, generator=torch.Generator().manual_seed(0))
    fg = torch.tensor([PALETTE[c.fg] for c in combos])[:, :, None, None]
    ink = torch.exp(-((images - fg) ** 2).sum(1, keepdim=True) / (2 * INK_SIGMA**2))
    for _ in range(3):
        ink = torch.nn.functional.max_pool2d(ink, 3, 1, 1)
    blobs = images * (1 - ink) + fg * ink
    strokes, oracle = load_features("toy_strokes"), ToyOracleFeatures()
    f = strokes(images)
    assert f.shape == (len(combos), 64)
    torch.testing.assert_close(f, torch.nn.functional.normalize(oracle(images)[:, 20:], dim=1))
    div = lambda feats, x: diversity_within_prompt(feats(x), prompts)["mean"]  # noqa: E731
    assert div(oracle, blobs) > div(oracle, images) + 0.2
    assert div(strokes, blobs) < div(strokes, images) - 0.03
    same = images[:1].expand(8, -1, -1, -1)
    assert diversity_within_prompt(strokes(same), prompts[:8])["mean"] == pytest.approx(0.0, abs=1e-3)


def test_clip_features_from_a_local_open_clip_folder(tmp_path):
    open_clip = pytest.importorskip("open_clip")
    from safetensors.torch import save_file

    cfg = {"model_cfg": {"embed_dim": 16, "vision_cfg": {"image_size": 32, "layers": 1, "width": 32, "patch_size": 8,
                                                         "head_width": 16},
                         "text_cfg": {"context_length": 16, "vocab_size": 49408, "width": 32, "heads": 2, "layers": 1}},
           "preprocess_cfg": {"mean": [0.5] * 3, "std": [0.5] * 3, "interpolation": "bicubic", "resize_mode": "shortest"}}
    (tmp_path / "open_clip_config.json").write_text(json.dumps(cfg))
    torch.manual_seed(0)
    model = open_clip.create_model("local-dir:" + str(tmp_path))
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, str(tmp_path / "open_clip_model.safetensors"))
    f = load_features("clip", model=str(tmp_path))(torch.rand(3, 3, 8, 8))
    assert f.shape == (3, 16) and torch.allclose(f.norm(dim=1), torch.ones(3), atol=1e-5)


def test_dino_features_from_a_saved_tiny_backbone(tmp_path):
    """The hub-id path on a tiny DINOv2 saved with its image processor: the embedding is the model's own pooled output
    after the processor's resize, crop and normalisation, unit length."""
    from transformers import BitImageProcessor, Dinov2Config, Dinov2Model

    torch.manual_seed(0)
    model = Dinov2Model(Dinov2Config(hidden_size=32, num_hidden_layers=1, num_attention_heads=2, intermediate_size=64,
                                     image_size=28, patch_size=14)).eval()
    model.save_pretrained(tmp_path)
    proc = BitImageProcessor(size={"shortest_edge": 32}, crop_size={"height": 28, "width": 28}, do_center_crop=True,
                             image_mean=[0.485, 0.456, 0.406], image_std=[0.229, 0.224, 0.225], do_convert_rgb=False)
    proc.save_pretrained(tmp_path)
    images = torch.rand(3, 3, 16, 16)
    f = load_features("dino", model=str(tmp_path))(images)
    assert f.shape == (3, 32) and torch.allclose(f.norm(dim=1), torch.ones(3), atol=1e-5)
    pixels = proc(images=[im.permute(1, 2, 0).numpy() for im in images], return_tensors="pt", do_rescale=False)["pixel_values"]
    with torch.no_grad():
        expected = torch.nn.functional.normalize(model(pixel_values=pixels).pooler_output, dim=-1)
    torch.testing.assert_close(f, expected, atol=5e-3, rtol=0)  # torch resize vs the processor's PIL resize


def test_eval_on_a_tiny_toy_world_reports_oracle_accuracy_and_frechet(tmp_path):
    """A toy-world folder gets the toy defaults: toy_oracle features, toy renders as real data, oracle per attribute."""
    from genft.toyworld import PretrainConfig, pretrain

    tiny = dict(text_hidden_size=16, text_layers=1, contrastive_steps=2, contrastive_batch_size=16, unet_channels=(8, 16),
                unet_steps=2, batch_size=4, warmup_steps=1, eval_images_per_prompt=0, eval_inference_steps=2)
    world = pretrain(tmp_path / "world", PretrainConfig(**tiny), progress=False)
    assert main(["eval", "--model", str(world), "--max-prompts", "3", "--images-per-prompt", "2", "--steps", "2",
                 "--out", str(tmp_path / "ev"), "--no-progress", "--device", "cpu"]) == 0
    summary = json.loads((tmp_path / "ev" / "metrics.json").read_text())
    row = summary["metrics"]["base"]
    assert {"toy_oracle", "toy_oracle_accuracy", "oracle_accuracy/digit", "oracle_accuracy/all", "diversity",
            "frechet_distance"} <= set(row)
    assert row["toy_oracle_accuracy"]["kind"] == "held-out reward"
    assert row["oracle_accuracy/all"]["mean"] == pytest.approx(row["toy_oracle_accuracy"]["mean"])
    floor = summary["settings"]["real_vs_real_frechet_distance"]
    assert summary["settings"]["features"] == "toy_oracle" and 0 <= floor < row["frechet_distance"]["mean"]


@pytest.mark.slow
def test_eval_toyworld_checkpoint_reports_oracle_accuracy_and_frechet(tmp_path, pretrained_toy_world):
    """The issue's command on the real toy world (the session's shared pretraining)."""
    from genft.demo import demo_config
    from genft.trainer import Trainer

    cfg = demo_config(str(tmp_path / "run"), num_rounds=1, progress=False, eval_max_prompts=2, device="cpu")
    Trainer(cfg).train()
    assert main(["eval", "--model", "toyworld", "--checkpoints", str(tmp_path / "run" / "checkpoints" / "final"),
                 "--prompts", "toyworld:heldout", "--rewards", "toy_oracle", "--heldout-rewards", "toy_oracle_accuracy",
                 "--max-prompts", "4", "--images-per-prompt", "4", "--steps", "10", "--seed", "0", "--out", str(tmp_path / "ev"),
                 "--logs", str(tmp_path / "run" / "log.jsonl"), "--no-progress", "--device", "cpu"]) == 0
    m = json.loads((tmp_path / "ev" / "metrics.json").read_text())["metrics"]
    for row in m.values():
        assert {"toy_oracle", "toy_oracle_accuracy", "oracle_accuracy/all", "diversity", "frechet_distance"} <= set(row)
        assert row["oracle_accuracy/all"]["mean"] == pytest.approx(row["toy_oracle_accuracy"]["mean"])
