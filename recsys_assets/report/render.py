"""The closed-loop report: one PNG chart and one self-contained HTML page.

The chart plots observed CTR per model version over the live run, the expected CTR
of the served slates under the ground truth (what the model is worth, without
click noise) and the oracle CTR (what the best possible slates were worth), with
vertical markers where preferences drifted, the drop was detected, retraining ran,
the canary started and ramped and the new model was promoted. The HTML embeds the
PNG (so it opens anywhere, offline) and lists the phases and every decision.
"""

from __future__ import annotations

import base64
import html
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path
from typing import Any

import altair as alt
import polars as pl
import vl_convert as vlc

from recsys_assets.report.data import ReportData

MARKER_COLORS = {
    "drift": "#7b3294",
    "drop_detected": "#d7191c",
    "retrain": "#fdae61",
    "canary_started": "#2c7bb6",
    "ramp": "#74add1",
    "promote": "#1a9641",
    "rollback": "#b2182b",
    "rejected": "#999999",
    "retrain_failed": "#b2182b",
}


@dataclass(frozen=True)
class ReportFiles:
    html: Path
    png: Path


def _pct(value: float | None) -> str:
    return "n/a" if value is None else f"{value:.2%}"


def build_chart(data: ReportData) -> alt.LayerChart:
    frame = data.intervals.select(
        "minute", "label", "ctr", "expected_ctr", "oracle_ctr", "impressions"
    ).to_pandas()
    width, height = 900, 380
    x = alt.X("minute:Q", title="minutes since the live traffic started")
    observed = (
        alt.Chart(frame)
        .mark_line(point=alt.OverlayMarkDef(size=18), strokeWidth=1.5)
        .encode(
            x=x,
            y=alt.Y("ctr:Q", title="click-through rate", axis=alt.Axis(format="%")),
            color=alt.Color("label:N", title="observed CTR of", legend=alt.Legend(orient="top")),
            tooltip=["minute:Q", "label:N", alt.Tooltip("ctr:Q", format=".2%"), "impressions:Q"],
        )
    )
    totals = data.intervals.group_by("minute").agg(
        (pl.col("expected_clicks").sum() / pl.col("impressions").sum()).alias("expected"),
        (pl.col("oracle_clicks").sum() / pl.col("impressions").sum()).alias("oracle"),
    )
    truth = totals.unpivot(index="minute", on=["expected", "oracle"]).with_columns(
        pl.col("variable").replace_strict(
            {
                "expected": "expected CTR of the served slates (ground truth)",
                "oracle": "oracle: best slates the ground truth allows",
            }
        )
    )
    reference = (
        alt.Chart(truth.sort("minute").to_pandas())
        .mark_line(strokeDash=[5, 3], strokeWidth=1.5)
        .encode(
            x=x,
            y="value:Q",
            strokeDash=alt.StrokeDash(
                "variable:N", title=None, legend=alt.Legend(orient="bottom", labelLimit=400)
            ),
            color=alt.value("#444444"),
        )
    )
    layers: list[alt.Chart] = [reference, observed]
    marks = [
        {
            "minute": data.minute(m.at),
            "until": data.minute(m.end) if m.end else None,
            "label": m.label,
            "kind": m.kind,
            "ypix": 6 + 14 * (n % 5),
        }
        for n, m in enumerate(data.markers)
    ]
    spans = [m for m in marks if m["until"] is not None]
    points = [m for m in marks if m["until"] is None]
    scale = alt.Scale(domain=list(MARKER_COLORS), range=list(MARKER_COLORS.values()))
    if spans:
        layers.insert(
            0,
            alt.Chart(alt.Data(values=spans))
            .mark_rect(opacity=0.18)
            .encode(
                x="minute:Q", x2="until:Q", color=alt.Color("kind:N", scale=scale, legend=None)
            ),
        )
    if marks:
        base = alt.Chart(alt.Data(values=points + spans))
        layers.append(
            base.mark_rule(strokeWidth=1.5).encode(
                x="minute:Q", color=alt.Color("kind:N", scale=scale, legend=None)
            )
        )
        layers.append(
            base.mark_text(align="left", dx=3, fontSize=10, baseline="top").encode(
                x="minute:Q",
                y=alt.Y("ypix:Q", axis=None, scale=None),  # pixels from the top
                text="label:N",
                color=alt.Color("kind:N", scale=scale, legend=None),
            )
        )
    return (
        alt.layer(*layers)
        .resolve_scale(color="independent")
        .properties(
            width=width,
            height=height,
            title="recsys closed loop: online CTR per model version, drift, detection and repair",
        )
    )


def _table(header: list[str], rows: list[list[Any]]) -> str:
    head = "".join(f"<th>{html.escape(h)}</th>" for h in header)
    body = "".join(
        "<tr>" + "".join(f"<td>{html.escape(str(c))}</td>" for c in row) + "</tr>" for row in rows
    )
    return f"<table><thead><tr>{head}</tr></thead><tbody>{body}</tbody></table>"


def render_report(
    data: ReportData,
    out_dir: Path,
    decisions: list[dict[str, Any]],
    links: dict[str, str] | None = None,
) -> ReportFiles:
    out_dir.mkdir(parents=True, exist_ok=True)
    chart = build_chart(data)
    png = vlc.vegalite_to_png(chart.to_json(), scale=2)
    png_path = out_dir / "closed_loop.png"
    png_path.write_bytes(png)

    phase_rows = [
        [
            p.name,
            f"{data.minute(p.start):.1f}-{data.minute(p.end):.1f} min",
            p.impressions,
            _pct(p.ctr),
            _pct(p.expected_ctr),
            _pct(p.oracle_ctr),
        ]
        for p in data.phases.values()
    ]
    recovery = data.recovery
    recovery_text = (
        "No promotion after the drift: nothing to compare."
        if recovery is None
        else (
            f"Observed CTR recovered {_pct(recovery.observed)} of what the drift took; on "
            f"expected CTR (ground truth, no click noise) {_pct(recovery.expected)}. Users and "
            "preferences are the same during and after, so that expected-CTR recovery is "
            "entirely the retrained model's doing."
        )
    )
    decision_rows = [
        [
            d["at"][11:19],
            f"{data.minute(datetime.fromisoformat(d['at'])):.1f}",
            d["action"],
            d.get("version") or "",
            d.get("share") if d.get("share") is not None else "",
            d["reason"][:220],
        ]
        for d in decisions
    ]
    link_html = "".join(
        f'<li>{html.escape(name)}: <a href="{html.escape(url)}">{html.escape(url)}</a></li>'
        for name, url in (links or {}).items()
    )
    image = base64.b64encode(png).decode()
    page = f"""<!doctype html>
<html lang="en"><head><meta charset="utf-8">
<title>recsys closed loop report</title>
<style>
body {{ font-family: system-ui, sans-serif; margin: 2em; max-width: 1000px; color: #222; }}
table {{ border-collapse: collapse; margin: 1em 0; font-size: 0.9em; }}
th, td {{ border: 1px solid #ccc; padding: 4px 8px; text-align: left; vertical-align: top; }}
th {{ background: #f3f3f3; }}
img {{ max-width: 100%; }}
</style></head><body>
<h1>recsys: the loop closing on its own</h1>
<p>Live traffic from {data.start:%Y-%m-%d %H:%M:%S} to {data.end:%H:%M:%S} UTC.
Simulated users asked the server for recommendations and clicked according to a hidden
ground truth; in the middle their preferences drifted. The system detected the CTR drop,
retrained, phased the new model in as a canary and promoted it, without anyone touching it.</p>
<img alt="CTR timeline" src="data:image/png;base64,{image}">
<h2>Before, during and after</h2>
{_table(["phase", "when", "impressions", "observed CTR", "expected CTR", "oracle CTR"], phase_rows)}
<p>{html.escape(recovery_text)}</p>
<h2>Decisions</h2>
{_table(["time (UTC)", "minute", "action", "model", "share", "evidence"], decision_rows)}
<h2>Where to look</h2><ul>{link_html}</ul>
</body></html>
"""
    html_path = out_dir / "closed_loop.html"
    html_path.write_text(page, encoding="utf-8")
    return ReportFiles(html_path, png_path)
