"""A report (report.build_report's dict) written out: report.json (every figure), report.md (for
a pull request), report.html (one self-contained file: plots inlined as base64 PNG, no network,
readable from phone width up) and each plot as PNG."""

from __future__ import annotations

import base64
import html
import io
import json
import math
from pathlib import Path

GATE_NOTE = ("Bundles that were gated at export: the gate's figures against float (manifest parity.versus_float) "
             "beside this report's at the same held-out positions; the gate feeds the first positions in prefill "
             "chunks, the report one token per call.")
SHORT_NAMES = {"linear_attn": "deltanet", "self_attn": "attn", "weight": ""}


def short(name: str) -> str:
    """layers.3.self_attn.q_proj.weight -> L3 attn.q_proj: fits a plot's axis."""
    parts = [SHORT_NAMES.get(part, part) for part in name.split(".") if SHORT_NAMES.get(part, part)]
    if parts[0] == "layers":
        return f"L{parts[1]} " + ".".join(parts[2:])
    return ".".join(parts)


def measured(report: dict) -> list[dict]:
    return [row for row in report["artifacts"] if row["status"] == "measured"]


# --- plots


def _figure(width: float, height: float):
    import matplotlib

    matplotlib.use("Agg")  # files only: no display on a build machine
    import matplotlib.pyplot as plt

    plt.rcParams.update({"font.size": 11, "axes.titlesize": 12, "axes.labelsize": 11})
    return plt, plt.figure(figsize=(width, height), dpi=100)


def _png(plt, figure) -> bytes:
    buffer = io.BytesIO()
    figure.tight_layout()
    figure.savefig(buffer, format="png")
    plt.close(figure)
    return buffer.getvalue()


def plot_quality(report: dict) -> bytes:
    """Perplexity and mean KL against float, one row per measured artifact (dots, not bars: a
    perplexity axis does not start at 0)."""
    rows = measured(report)
    plt, figure = _figure(7, 2.2 + 0.6 * len(rows))
    names = [row["name"] for row in rows]
    top, bottom = figure.subplots(2, 1, sharey=True)
    top.scatter([row["perplexity"] for row in rows], names, color="#4c72b0", zorder=3)
    for value in sorted({row["float_perplexity"] for row in rows}):
        top.axvline(value, color="black", linestyle="--", linewidth=1)
    top.set_xlabel("perplexity on the evaluation text (dashed: the float model)")
    bottom.scatter([row["mean_kl"] for row in rows], names, color="#dd8452", zorder=3)
    bottom.set_xscale("log")
    bottom.set_xlabel("mean KL vs float (nats per token, log scale)")
    for axes in (top, bottom):
        axes.grid(axis="x", alpha=0.3)
        axes.set_ylim(len(rows) - 0.5, -0.5)
        axes.margins(x=0.08)
    return _png(plt, figure)


def plot_snr(report: dict) -> bytes | None:
    """Output SNR of every quantized tensor, one marker per plan, in model order."""
    plans = {name: plan for name, plan in report["plans"].items() if plan["tensors"]}
    if not plans:
        return None
    names = list(dict.fromkeys(t["name"] for plan in plans.values() for t in plan["tensors"]))
    plt, figure = _figure(7, 1.4 + 0.22 * len(names))
    axes = figure.subplots()
    markers = "os^Dv<>p"
    for i, (plan_name, plan) in enumerate(plans.items()):
        figures = {t["name"]: t["snr_db"] for t in plan["tensors"]}
        rows = [k for k, name in enumerate(names) if name in figures and math.isfinite(figures[name])]
        axes.scatter([figures[names[k]] for k in rows], rows, marker=markers[i % len(markers)], label=plan_name, s=28)
    axes.set_yticks(range(len(names)), [short(name) for name in names], fontsize=8)
    axes.set_ylim(len(names) - 0.5, -0.5)
    axes.set_xlabel("output SNR vs float (dB; higher is better)")
    axes.grid(axis="x", alpha=0.3)
    axes.xaxis.set_label_position("top")
    axes.xaxis.tick_top()
    axes.legend(loc="upper center", bbox_to_anchor=(0.5, -0.01), ncol=min(len(plans), 4), fontsize=9)
    return _png(plt, figure)


def plot_drift(report: dict) -> bytes | None:
    """Per plan: logits KL and recurrent-state relative error (mean over linear-attention layers,
    band from the best to the worst layer) against context length."""
    plans = {name: plan["drift"] for name, plan in report["plans"].items() if plan["drift"]}
    if not plans:
        return None
    plt, figure = _figure(7, 3.4)
    kl_axes, state_axes = figure.subplots(1, 2)
    for name, drift in plans.items():
        lengths = drift["lengths"]
        kl_axes.plot(lengths, drift["mean_kl"], marker="o", label=name)
        per_layer = list(zip(*drift["state_relative_error"].values()))
        line, = state_axes.plot(lengths, [sum(v) / len(v) for v in per_layer], marker="o", label=name)
        state_axes.fill_between(lengths, [min(v) for v in per_layer], [max(v) for v in per_layer],
                                color=line.get_color(), alpha=0.15)
    for axes in (kl_axes, state_axes):
        axes.set_xscale("log", base=2)
        axes.set_yscale("log")
        axes.set_xlabel("context length (tokens)")
        axes.grid(alpha=0.3)
    kl_axes.set_ylabel(f"mean KL vs float (nats / token, last {next(iter(plans.values()))['kl_positions']})")
    state_axes.set_ylabel("recurrent state relative error")
    state_axes.legend(fontsize=8)
    figure.suptitle("drift, measured in eager with each plan", fontsize=11)
    return _png(plt, figure)


def plots(report: dict) -> dict[str, bytes]:
    """File name -> PNG, for the plots this report has data for."""
    made = {"quality.png": plot_quality(report) if measured(report) else None,
            "snr.png": plot_snr(report), "drift.png": plot_drift(report)}
    return {name: png for name, png in made.items() if png is not None}


# --- tables, shared by markdown and HTML

PLOT_CAPTIONS = {
    "quality.png": "Perplexity on the evaluation text and mean KL against the float model, through each artifact's runtime",
    "snr.png": "Output SNR of each quantized tensor on its own (float input, quantized weight), in eager",
    "drift.png": "Logits KL and recurrent-state error as the context grows, in eager with each plan",
}


def _departures(row: dict) -> str:
    return ", ".join("same" if t["first_departure"] is None else str(t["first_departure"]) for t in row["transcripts"])


def artifact_table(report: dict) -> tuple[list[str], list[list[str]]]:
    header = ["artifact", "runtime", "size (MiB)", "perplexity", "float ppl", "mean KL (nats)", "top-1",
              f"greedy departs at (of {report['transcript']['tokens']})"]
    rows = []
    for row in report["artifacts"]:
        if row["status"] == "refused":
            rows.append([row["name"], "refused"] + [""] * (len(header) - 2))
            continue
        rows.append([row["name"], row["runtime"], f"{row['artifact_bytes'] / 2**20:.2f}", f"{row['perplexity']:.3f}",
                     f"{row['float_perplexity']:.3f}", f"{row['mean_kl']:.2e}", f"{row['top1_agreement']:.3f}",
                     _departures(row)])
    return header, rows


def refusals(report: dict) -> list[str]:
    return [f"{row['name']}: {row['reason']}" for row in report["artifacts"] if row["status"] == "refused"]


def manifest_table(report: dict) -> tuple[list[str], list[list[str]]] | None:
    """The export gate's figures (bundles that were gated) beside this report's at the same positions."""
    rows = []
    for row in measured(report):
        gate, here = row.get("manifest_versus_float"), row.get("at_gate_positions")
        if gate and here:
            rows.append([row["name"], str(here["positions"]), f"{gate['mean_kl']:.2e}", f"{here['mean_kl']:.2e}",
                         f"{gate['top1_agreement']:.3f}", f"{here['top1_agreement']:.3f}"])
    header = ["artifact", "positions", "gate mean KL", "report mean KL", "gate top-1", "report top-1"]
    return (header, rows) if rows else None


def snr_table(plan: dict, worst: int = 8) -> tuple[list[str], list[list[str]]]:
    ranked = sorted(plan["tensors"], key=lambda t: t["snr_db"])[:worst]
    return ["tensor", "bits", "group", "SNR (dB)"], [
        [t["name"], str(t["bits"]), str(t["group_size"]), f"{t['snr_db']:.1f}"] for t in ranked]


def drift_table(plan: dict) -> tuple[list[str], list[list[str]]]:
    drift = plan["drift"]
    header = ["context (tokens)", "mean KL (nats)"] + [f"{layer} state err" for layer in drift["state_relative_error"]]
    rows = [[str(n), f"{drift['mean_kl'][i]:.2e}"] + [f"{errors[i]:.4f}" for errors in drift["state_relative_error"].values()]
            for i, n in enumerate(drift["lengths"])]
    return header, rows


def intro(report: dict) -> list[str]:
    refused = sum(row["status"] == "refused" for row in report["artifacts"])
    return [
        f"{len(measured(report))} artifacts measured, {refused} combinations refused, in {report['wall_seconds']:.0f} s.",
        (f"Evaluation text: {report['eval']['text']}, its first {report['eval']['tokens']} tokens, fed one token per "
         f"call through each artifact's runtime in windows of up to {report['eval']['window']} (each a fresh "
         "sequence); the float model is fed the same tokens the same way in eager. KL is KL(float || artifact)."),
        (f"Greedy transcript check: {len(report['transcript']['prompts'])} fixed prompts continued "
         f"{report['transcript']['tokens']} tokens; the figure is the index of the first token where the artifact's "
         "greedy continuation departs from the float model's (same: none does)."),
        f"Per-tensor SNR and drift: {report['drift_measured_in']}; each plan is shared by every backend that encodes it.",
    ]


# --- markdown


def _md_table(table: tuple[list[str], list[list[str]]]) -> str:
    header, rows = table

    def escape(cell: str) -> str:
        return cell.replace("|", "\\|").replace("\n", " ")

    lines = ["| " + " | ".join(header) + " |", "|" + " --- |" * len(header)]
    lines += ["| " + " | ".join(escape(cell) for cell in row) + " |" for row in rows]
    return "\n".join(lines)


def to_markdown(report: dict, plot_names: list[str]) -> str:
    parts = ["# Quantization report", "\n\n".join(intro(report)), "## Artifacts", _md_table(artifact_table(report))]
    if refusals(report):
        parts.append("Refused:\n\n" + "\n".join(f"- {line}" for line in refusals(report)))
    gate = manifest_table(report)
    if gate:
        parts += [GATE_NOTE, _md_table(gate)]
    parts += [f"![{PLOT_CAPTIONS[name]}]({name})\n\n*{PLOT_CAPTIONS[name]}*" for name in plot_names]
    for name, plan in report["plans"].items():
        if not plan["tensors"]:
            continue
        parts += [f"## Plan {name}", "Kept at 8 bits: " + (", ".join(plan["kept_8bit"]) or "none") + ".",
                  "Lowest output SNR:", _md_table(snr_table(plan))]
        if plan["drift"]:
            parts += ["Drift (" + plan["drift"]["measured_in"] + "):", _md_table(drift_table(plan))]
    return "\n\n".join(parts) + "\n"


# --- HTML

STYLE = """
body{font-family:system-ui,-apple-system,sans-serif;margin:0 auto;padding:12px;max-width:980px;line-height:1.45;color:#222}
h1{font-size:1.4em}h2{font-size:1.15em;margin-top:1.6em;border-bottom:1px solid #ddd}
.scroll{overflow-x:auto;-webkit-overflow-scrolling:touch}
table{border-collapse:collapse;font-size:.85em;margin:.5em 0}
th,td{border:1px solid #ddd;padding:4px 6px;text-align:left;vertical-align:top}
th{background:#f4f4f4}td.refused{color:#a33}
img{max-width:100%;height:auto}figure{margin:1em 0}figcaption{font-size:.85em;color:#555}
"""


def _html_table(table: tuple[list[str], list[list[str]]]) -> str:
    header, rows = table
    head = "".join(f"<th>{html.escape(cell)}</th>" for cell in header)
    body = "".join(
        "<tr>" + "".join(f'<td{" class=refused" if cell == "refused" else ""}>{html.escape(cell)}</td>'
                         for cell in row) + "</tr>" for row in rows)
    return f'<div class="scroll"><table><tr>{head}</tr>{body}</table></div>'


def to_html(report: dict, pngs: dict[str, bytes]) -> str:
    parts = ["<h1>Quantization report</h1>"] + [f"<p>{html.escape(line)}</p>" for line in intro(report)]
    parts += ["<h2>Artifacts</h2>", _html_table(artifact_table(report))]
    if refusals(report):
        parts.append("<p>Refused:</p><ul>" + "".join(f"<li>{html.escape(line)}</li>" for line in refusals(report))
                     + "</ul>")
    gate = manifest_table(report)
    if gate:
        parts += [f"<p>{GATE_NOTE}</p>",
                  _html_table(gate)]
    for name, png in pngs.items():
        parts.append(f'<figure><img alt="{html.escape(PLOT_CAPTIONS[name])}" '
                     f'src="data:image/png;base64,{base64.b64encode(png).decode()}">'
                     f"<figcaption>{html.escape(PLOT_CAPTIONS[name])}</figcaption></figure>")
    for name, plan in report["plans"].items():
        if not plan["tensors"]:
            continue
        parts += [f"<h2>Plan {html.escape(name)}</h2>",
                  f"<p>Kept at 8 bits: {html.escape(', '.join(plan['kept_8bit']) or 'none')}.</p>",
                  "<p>Lowest output SNR:</p>", _html_table(snr_table(plan))]
        if plan["drift"]:
            parts += [f"<p>Drift ({html.escape(plan['drift']['measured_in'])}):</p>", _html_table(drift_table(plan))]
    return ('<!doctype html><html lang="en"><head><meta charset="utf-8">'
            '<meta name="viewport" content="width=device-width,initial-scale=1">'
            f"<title>Quantization report</title><style>{STYLE}</style></head><body>"
            + "\n".join(parts) + "</body></html>\n")


def write_report(report: dict, out: Path) -> list[Path]:
    """report.json, report.md, report.html and the plots' PNGs in `out`; returns the paths written."""
    out.mkdir(parents=True, exist_ok=True)
    pngs = plots(report)
    written = []
    for name, png in pngs.items():
        (out / name).write_bytes(png)
        written.append(out / name)
    # an SNR of a tensor the plan leaves exact is infinite, which JSON does not have: null
    clean = json.loads(json.dumps(report), parse_constant=lambda constant: None)
    for name, text in (("report.json", json.dumps(clean, indent=2) + "\n"), ("report.md", to_markdown(report, list(pngs))),
                       ("report.html", to_html(report, pngs))):
        (out / name).write_text(text, encoding="utf-8")
        written.append(out / name)
    return written
