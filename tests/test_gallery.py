"""The gallery is one self-contained HTML file: every image embedded and decodable, the table filled in."""
import base64
import io
import json
from html.parser import HTMLParser

import torch
from PIL import Image

from genft.evaluation import evaluate_pipeline
from genft.gallery import build_gallery
from reward_models import JpegCompressibility
from _tiny import tiny_diffusion_pipeline


class _Collect(HTMLParser):
    def __init__(self):
        super().__init__()
        self.imgs, self.cells = [], []
        self._in_td = False

    def handle_starttag(self, tag, attrs):
        if tag == "img":
            self.imgs.append(dict(attrs))
        self._in_td = tag == "td"

    def handle_data(self, data):
        if self._in_td:
            self.cells.append(data)


def test_gallery_embeds_every_image_and_metric(tmp_path):
    pipe = tiny_diffusion_pipeline()
    prompts = ["a red cat", "a blue dog"]
    reward = {"jpeg_compressibility": JpegCompressibility()}
    kw = dict(images_per_prompt=3, seed=0, num_inference_steps=3, guidance_scale=2.0, eta=1.0)
    before = evaluate_pipeline(pipe, prompts, reward, out_dir=tmp_path / "evals" / "before", **kw)
    again = evaluate_pipeline(pipe, prompts, reward, **kw)
    assert before["metrics"] == again["metrics"], "fixed-seed evaluation is not deterministic"
    with torch.no_grad():
        for p in pipe.unet.parameters():
            p.add_(0.05 * torch.randn_like(p))
    evaluate_pipeline(pipe, prompts, reward, out_dir=tmp_path / "evals" / "after", **kw)
    (tmp_path / "log.jsonl").write_text("\n".join(json.dumps(r) for r in [
        {"round": 0, "event": "eval", "eval/jpeg_compressibility": -0.7},
        {"round": 1, "reward_mean": -0.7, "reward_std": 0.01},
        {"round": 2, "reward_mean": -0.6, "reward_std": 0.01},
        {"round": 2, "event": "eval", "eval/jpeg_compressibility": -0.6},
    ]))
    out = build_gallery([("before", tmp_path / "evals" / "before"), ("after", tmp_path / "evals" / "after")],
                        tmp_path / "gallery.html", log_path=tmp_path / "log.jsonl", title="t")
    parser = _Collect()
    parser.feed(out.read_text())
    samples = [i for i in parser.imgs if "sample" in i.get("class", "")]
    assert len(samples) == 2 * len(prompts) * 3
    for img in parser.imgs:
        assert img["src"].startswith("data:image/png;base64,")
        Image.open(io.BytesIO(base64.b64decode(img["src"].split(",", 1)[1]))).verify()
    assert all("jpeg_compressibility=" in i["title"] for i in samples)
    assert any(i.get("class") == "curve" for i in parser.imgs)
    assert "jpeg_compressibility" in parser.cells and sum("±" in c for c in parser.cells) == 2
    assert (tmp_path / "reward_curve.png").is_file()
