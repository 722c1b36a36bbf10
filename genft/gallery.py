"""A self-contained offline HTML gallery: side-by-side sample grids per prompt, reward curves, metrics table.

It only reads saved outputs (evals/<tag>/samples.json + images, log.jsonl); every image is embedded
as a data URI so the single file can be mailed or opened anywhere.
"""
from __future__ import annotations

import base64
import html
import io
import json
from pathlib import Path
from typing import Dict, List, Optional, Sequence, Tuple

from ._atomic import atomic_write_text


def _data_uri(png_bytes: bytes) -> str:
    return "data:image/png;base64," + base64.b64encode(png_bytes).decode("ascii")


def reward_curve_png(records: List[Dict], out_path: Optional[Path] = None) -> bytes:
    """Plot training reward per round (mean ± std) and evaluation means; returns PNG bytes (and writes them)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    train = [r for r in records if "reward_mean" in r]
    evals = [r for r in records if r.get("event") == "eval"]
    fig, ax = plt.subplots(figsize=(6, 3.4), dpi=110)
    if train:
        x = [r["round"] for r in train]
        m = [r["reward_mean"] for r in train]
        s = [r.get("reward_std", 0.0) for r in train]
        ax.plot(x, m, label="training reward (rollouts)", color="#1f77b4")
        ax.fill_between(x, [a - b for a, b in zip(m, s)], [a + b for a, b in zip(m, s)], alpha=0.2, color="#1f77b4")
    eval_keys = sorted({k for r in evals for k in r if k.startswith("eval/")})
    for key, colour in zip(eval_keys, ["#d62728", "#2ca02c", "#9467bd", "#ff7f0e"]):
        pts = [(r["round"], r[key]) for r in evals if key in r]
        ax.plot([p[0] for p in pts], [p[1] for p in pts], "o--", color=colour, label=f"held-out {key[5:]}")
    ax.set_xlabel("round")
    ax.set_ylabel("reward")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7)
    fig.tight_layout()
    buf = io.BytesIO()
    fig.savefig(buf, format="png")
    plt.close(fig)
    data = buf.getvalue()
    if out_path is not None:
        Path(out_path).write_bytes(data)
    return data


def _load_eval(eval_dir: Path) -> Dict:
    path = Path(eval_dir) / "samples.json"
    if not path.is_file():
        raise FileNotFoundError(f"{path} is missing; run an evaluation into {eval_dir} first")
    return json.loads(path.read_text())


def _fmt(x: float) -> str:
    return f"{x:.3f}"


def build_gallery(
    columns: Sequence[Tuple[str, Path]],
    out_path: Path,
    title: str = "genft samples",
    log_path: Optional[Path] = None,
    notes: str = "",
    thumb_px: int = 96,
) -> Path:
    """Write one HTML file comparing the evaluations in `columns` [(label, eval_dir), ...] prompt by prompt."""
    evals = [(label, Path(d), _load_eval(Path(d))) for label, d in columns]
    if not evals:
        raise ValueError("columns is empty; give at least one (label, eval_dir) pair")
    reward_names = sorted({k for _, _, e in evals for k in e["metrics"]})
    parts = [f"<!doctype html><html><head><meta charset='utf-8'><title>{html.escape(title)}</title>", _STYLE, "</head><body>"]
    parts.append(f"<h1>{html.escape(title)}</h1>")
    if notes:
        parts.append(f"<p class='notes'>{html.escape(notes)}</p>")

    parts.append("<h2>Metrics</h2><table class='metrics'><tr><th>reward</th>")
    parts += [f"<th>{html.escape(label)}</th>" for label, _, _ in evals]
    parts.append("</tr>")
    for name in reward_names:
        parts.append(f"<tr><td>{html.escape(name)}</td>")
        for _, _, e in evals:
            m = e["metrics"].get(name)
            parts.append(f"<td>{_fmt(m['mean'])} ± {_fmt(m['std'])}</td>" if m else "<td>–</td>")
        parts.append("</tr>")
    parts.append("</table>")

    if log_path is not None and Path(log_path).is_file():
        records = [json.loads(line) for line in Path(log_path).read_text().splitlines() if line.strip()]
        if records:
            png = reward_curve_png(records, Path(out_path).with_name("reward_curve.png"))
            parts.append(f"<h2>Reward during training</h2><img class='curve' alt='reward curve' src='{_data_uri(png)}'>")

    parts.append("<h2>Samples (fixed seeds, same noise in every column)</h2>")
    prompts: List[str] = list(dict.fromkeys(s["prompt"] for s in evals[0][2]["samples"]))
    for prompt in prompts:
        parts.append(f"<div class='prompt'><h3>{html.escape(prompt)}</h3><div class='row'>")
        for label, d, e in evals:
            parts.append(f"<div class='col'><div class='label'>{html.escape(label)}</div><div class='grid'>")
            for s in (s for s in e["samples"] if s["prompt"] == prompt):
                tip = "; ".join(f"{k}={v:.3f}" for k, v in s["scores"].items()) + f"; seed={s['seed']}"
                uri = _data_uri((d / s["file"]).read_bytes())
                parts.append(f"<img class='sample' style='width:{thumb_px}px' title='{html.escape(tip)}' alt='{html.escape(prompt)}' src='{uri}'>")
            parts.append("</div></div>")
        parts.append("</div></div>")
    parts.append("</body></html>")
    atomic_write_text(out_path, "".join(parts))
    return Path(out_path)


_STYLE = """<style>
body{font-family:system-ui,sans-serif;margin:24px;color:#222;background:#fafafa}
table.metrics{border-collapse:collapse;margin-bottom:16px}
table.metrics td,table.metrics th{border:1px solid #ccc;padding:4px 10px;text-align:right}
table.metrics td:first-child{text-align:left}
.prompt{background:#fff;border:1px solid #ddd;border-radius:6px;padding:6px 12px;margin:10px 0;display:inline-block;vertical-align:top}
.prompt h3{margin:4px 0;font-size:14px}
.row{display:flex;gap:18px}.label{font-size:12px;color:#555}
.grid{display:flex;flex-wrap:wrap;gap:3px;max-width:420px}
img.sample{image-rendering:pixelated;border:1px solid #eee}
img.curve{max-width:640px}.notes{color:#444}
</style>"""
