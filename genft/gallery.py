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


def reward_curve_png(records: List[Dict], out_path: Optional[Path] = None, title: Optional[str] = None) -> bytes:
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
    if title:
        ax.set_title(title, fontsize=9)
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


def _load_log(path: Path) -> List[Dict]:
    try:
        return [json.loads(line) for line in Path(path).read_text().splitlines() if line.strip()]
    except ValueError as e:
        raise ValueError(f"training log {str(path)!r} is not JSON lines ({e}); pass a run's log.jsonl") from e


def _metrics_from_evals(evals) -> Dict[str, Dict[str, Dict]]:
    return {label: {k: {**v, "kind": "reward"} for k, v in e["metrics"].items()} for label, _, e in evals}


def _metrics_table(table: Dict[str, Dict[str, Dict]], labels: Sequence[str]) -> List[str]:
    """<table id='metrics'>: one row per metric (first-seen order), one column per model; cells 'mean ± std'."""
    rows: Dict[str, str] = {}
    for label in labels:
        for name, m in table.get(label, {}).items():
            rows.setdefault(name, m.get("kind", ""))
    parts = ["<table class='metrics' id='metrics'><thead><tr><th>metric</th><th>kind</th>"]
    parts += [f"<th>{html.escape(label)}</th>" for label in labels]
    parts.append("</tr></thead><tbody>")
    for name, kind in rows.items():
        parts.append(f"<tr><td>{html.escape(name)}</td><td class='kind'>{html.escape(kind)}</td>")
        for label in labels:
            m = table.get(label, {}).get(name)
            if not m or m.get("mean") is None:
                parts.append("<td>–</td>")
            elif m.get("std") is None:
                parts.append(f"<td>{_fmt(m['mean'])}</td>")
            else:
                parts.append(f"<td>{_fmt(m['mean'])} ± {_fmt(m['std'])}</td>")
        parts.append("</tr>")
    parts.append("</tbody></table>")
    return parts


def build_gallery(
    columns: Sequence[Tuple[str, Path]],
    out_path: Path,
    title: str = "genft samples",
    log_path: Optional[Path] = None,
    notes: str = "",
    thumb_px: int = 96,
    metrics: Optional[Dict[str, Dict[str, Dict]]] = None,
    logs: Sequence[Tuple[str, Path]] = (),
) -> Path:
    """Write one HTML file comparing the evaluations in `columns` [(label, eval_dir), ...] prompt by prompt.

    `metrics` ({label: {metric: {"mean", "std" (None: no spread), "kind"}}}) replaces the table built from the
    evaluations' rewards; each of `logs` [(label, log.jsonl)] (and `log_path`) becomes a reward-curve plot.
    """
    evals = [(label, Path(d), _load_eval(Path(d))) for label, d in columns]
    if not evals:
        raise ValueError("columns is empty; give at least one (label, eval_dir) pair")
    labels = [label for label, _, _ in evals]
    if len(set(labels)) != len(labels):
        raise ValueError(f"column labels must be unique, got {labels}")
    table = metrics if metrics is not None else _metrics_from_evals(evals)
    parts = [f"<!doctype html><html><head><meta charset='utf-8'><title>{html.escape(title)}</title>", _STYLE, "</head><body>"]
    parts.append(f"<h1>{html.escape(title)}</h1>")
    if notes:
        parts.append(f"<p class='notes'>{html.escape(notes)}</p>")
    parts.append("<h2>Metrics</h2>")
    parts += _metrics_table(table, labels)

    curves = ([("training", Path(log_path))] if log_path is not None and Path(log_path).is_file() else []) + list(logs)
    shown = []
    for i, (label, path) in enumerate(curves):
        records = _load_log(Path(path))
        if records:
            name = "reward_curve.png" if i == 0 else f"reward_curve_{i}.png"
            png = reward_curve_png(records, Path(out_path).with_name(name), title=label if logs else None)
            shown.append(f"<img class='curve' alt='reward curve: {html.escape(label)}' src='{_data_uri(png)}'>")
    if shown:
        parts.append("<h2>Reward during training</h2>" + "".join(shown))

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
table.metrics td:first-child,table.metrics td.kind{text-align:left}
table.metrics td.kind{color:#777;font-size:12px}
.prompt{background:#fff;border:1px solid #ddd;border-radius:6px;padding:6px 12px;margin:10px 0;display:inline-block;vertical-align:top}
.prompt h3{margin:4px 0;font-size:14px}
.row{display:flex;gap:18px}.label{font-size:12px;color:#555}
.grid{display:flex;flex-wrap:wrap;gap:3px;max-width:420px}
img.sample{image-rendering:pixelated;border:1px solid #eee}
img.curve{max-width:640px}.notes{color:#444}
</style>"""
