"""A report a person reads: one self-contained HTML file (charts and thumbnails embedded as base64 images,
no script, no server) for a label output (``python -m jobs.report OUT``) or an evaluation
(``python -m jobs.evaluate ... --report REPORT.html``). docs/quality.md, "The report".

A label output's report has, each under a stable element id: ``overview`` (rows, images, faces, errors,
models, the summary's totals), ``missing`` (only when something is: no summary, columns an older version
did not write), ``attributes`` (every model output's distribution: counts of each class, histograms of
numbers, the share true of binary attributes; per model of a set), ``confidence`` (every categorical
output's ``<x>_prob``), ``pose``, ``quality``, ``review`` (rows per reason, thresholds) and ``flagged``
(thumbnails of a sample of the flagged faces, each captioned with its path, face and reasons).

The Parquet is streamed once (core/report_scan.py: bounded memory whatever the number of rows); charts are
core/report_charts.py, thumbnails core/report_thumbs.py.
"""

from __future__ import annotations

import base64
import datetime
import html
import json
import math

import pyarrow as pa

import storage
from core import report_charts as charts
from core.report_scan import POSE, plan, scan

SUMMARY_FILE = "_summary.json"  # raytasks/label/output.py's names (core does not import raytasks)
LABELS_DIR = "labels"
DEFAULT_MAX_THUMBNAILS = 300
CSS = """
body{font-family:system-ui,-apple-system,"Segoe UI",Roboto,sans-serif;margin:0 auto;max-width:1180px;
padding:0 18px 40px;color:#222;line-height:1.4}
h1{font-size:1.5em;margin:18px 0 4px}h2{border-bottom:2px solid #3b6ea5;padding-bottom:3px;margin-top:30px}
h3{margin:18px 0 6px}nav a{margin-right:12px}table{border-collapse:collapse;margin:6px 0}
td,th{border:1px solid #ccc;padding:3px 8px;text-align:left;font-size:.9em}th{background:#f0f3f7}
td.n{text-align:right;font-variant-numeric:tabular-nums}img.chart{max-width:100%;display:block;margin:6px 0}
.note{background:#fff6e0;border-left:4px solid #e0a000;padding:6px 10px;margin:8px 0}
.muted{color:#666;font-size:.9em}.sheet{display:flex;flex-wrap:wrap;gap:8px}
figure.thumb{margin:0;width:150px;border:1px solid #ddd;padding:4px;background:#fafafa}
figure.thumb img{width:128px;height:128px;object-fit:contain;display:block;margin:0 auto;background:#eee}
figure.thumb .missing{width:128px;height:128px;margin:0 auto;background:#eee;color:#a00;font-size:.7em;
overflow:hidden;display:flex;align-items:center;text-align:center}
figcaption{font-size:.72em;word-break:break-all;margin-top:3px}figcaption .r{color:#c0504d}
"""


class ReportError(ValueError):
    """An output the report cannot be built from (no such folder, no labels, unreadable Parquet)."""


# --- HTML pieces ------------------------------------------------------------------------------------------
def esc(x) -> str:
    return html.escape(str(x), quote=True)


def img(data: bytes, alt: str) -> str:
    return f'<img class="chart" alt="{esc(alt)}" src="data:image/png;base64,{base64.b64encode(data).decode()}">'


def note(text: str) -> str:
    return f'<p class="note">{esc(text)}</p>'


def table(rows: list[tuple], head: tuple | None = None) -> str:
    def cell(v, tag="td"):
        num = isinstance(v, (int, float)) and not isinstance(v, bool)
        text = f"{v:.4g}" if isinstance(v, float) else v
        return f'<{tag}{" class=n" if num else ""}>{esc(text)}</{tag}>'

    h = "<tr>" + "".join(cell(c, "th") for c in head) + "</tr>" if head else ""
    return "<table>" + h + "".join("<tr>" + "".join(cell(c) for c in r) + "</tr>" for r in rows) + "</table>"


def section(sid: str, title: str, body: str) -> str:
    return f'<section id="{sid}"><h2>{esc(title)}</h2>\n{body}\n</section>\n'


def page(title: str, subtitle: str, sections: list[tuple[str, str, str]]) -> str:
    nav = " ".join(f'<a href="#{sid}">{esc(t)}</a>' for sid, t, _ in sections)
    when = datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC")
    body = "".join(section(*s) for s in sections)
    return (f'<!DOCTYPE html>\n<html lang="en"><head><meta charset="utf-8"><title>{esc(title)}</title>'
            f'<meta name="viewport" content="width=device-width, initial-scale=1"><style>{CSS}</style></head>'
            f'<body><header><h1>{esc(title)}</h1><p class="muted">{esc(subtitle)} · made {when} by faceattr'
            f'</p><nav>{nav}</nav></header>\n{body}</body></html>\n')


# --- a label output ---------------------------------------------------------------------------------------
def _summary(out: str) -> tuple[dict, str | None]:
    uri = storage.join(out, SUMMARY_FILE)
    try:
        if not storage.exists(uri):
            return {}, f"no {SUMMARY_FILE}: the run's totals and the review thresholds are unknown (counts below are from the rows)"
        doc = json.loads(storage.read_bytes(uri))
        if not isinstance(doc, dict):
            raise ValueError("not a JSON object")
        return doc, None
    except (OSError, ValueError) as e:
        return {}, f"{SUMMARY_FILE} could not be read ({str(e)[:200]}): the run's totals and thresholds are unknown"


def open_labels(out: str):
    """The ``pyarrow.dataset`` of ``OUT/labels/*.parquet``, or :class:`ReportError` saying why not."""
    import pyarrow.dataset as pads
    import pyarrow.fs as pafs

    try:
        fs, root = storage.filesystem(out)
        if fs.get_file_info(root).type == pafs.FileType.NotFound:
            raise ReportError(f"{out}: no such folder or prefix")
        labels = storage.join(out, LABELS_DIR)
        fs, root = storage.filesystem(labels)
        if fs.get_file_info(root).type != pafs.FileType.Directory:
            raise ReportError(f"{out} has no {LABELS_DIR}/ folder: not a label output, or a run that wrote no rows yet")
        ds = pads.dataset(root, filesystem=fs, format="parquet")
        if not ds.files:
            raise ReportError(f"{labels} holds no Parquet file: a run that wrote no rows yet")
        return ds
    except ReportError:
        raise
    except (OSError, pa.ArrowException, ValueError) as e:
        raise ReportError(f"cannot read the labels under {out}: {str(e)[:300]}") from None


def _thresholds(summary: dict) -> dict:
    t = summary.get("review_thresholds")
    return t if isinstance(t, dict) else {}


def _hist_panels(s, keys: list[str], names: dict, lines: dict) -> list[tuple]:
    return [(k, s.hists[k], names.get(k, ""), lines.get(k, ())) for k in keys if k in s.hists]


def _finite(*vals) -> list[float]:
    return [float(v) for v in vals if isinstance(v, (int, float)) and math.isfinite(v)]


def allowed_photos(summary: dict, allow: tuple[str, ...] = ()) -> tuple[str, ...]:
    """Where the contact sheet may read photos: ``allow`` when given (``--allow-prefix``), else what the
    label run was allowed to read (its summary's ``allow_prefix``, or the default for its ``input``), else
    nothing: a ``path`` column alone never decides which files are opened."""
    from facedata.paths import default_allow_prefix

    if allow:
        return tuple(allow)
    recorded = summary.get("allow_prefix")
    if isinstance(recorded, list) and recorded and all(isinstance(x, str) and x for x in recorded):
        return tuple(recorded)
    if isinstance(summary.get("input"), str) and summary["input"]:
        return (default_allow_prefix(summary["input"]),)
    return ()


def label_report(out: str, max_thumbnails: int = DEFAULT_MAX_THUMBNAILS, seed: int = 0,
                 allow: tuple[str, ...] = ()) -> tuple[str, dict]:
    """The HTML report of the label output ``out`` (folder or ``s3://`` prefix) and a dict of what it holds
    (``rows``, ``faces``, ``flagged``, ``thumbnails``, ``missing``). :class:`ReportError` when there are no
    labels to report on; a missing summary or missing columns give a partial report that says so. Photos
    for thumbnails are read only under :func:`allowed_photos`."""
    ds = open_labels(out)
    summary, summary_problem = _summary(out)
    p = plan(ds.schema)
    try:
        s = scan(ds, p, max_thumbnails, seed)
    except (OSError, pa.ArrowException) as e:
        raise ReportError(f"cannot read the labels under {out}: {str(e)[:300]}") from None
    missing = ([summary_problem] if summary_problem else []) + p.missing
    if p.missing:
        missing.append("(an output written by an older version of faceattr lacks these columns; label it again "
                       "into a new --output to get them)")
    th = _thresholds(summary)
    from core.report_thumbs import thumbnails  # imports torch (models.preprocess): only once there are rows

    where = allowed_photos(summary, allow)
    if s.flagged and max_thumbnails and not where:
        missing.append("no thumbnails: the summary names no input and no --allow-prefix was given "
                       "(pass the folder or s3:// prefix the photos are under)")
    thumbs = thumbnails(s.flagged, allow=where) if s.flagged else []
    sections = [("overview", "Overview", _overview(out, s, summary))]
    if missing:
        sections.append(("missing", "What this report lacks", "<ul>" + "".join(f"<li>{esc(m)}</li>" for m in missing)
                         + "</ul>"))
    sections += [("attributes", "Attributes", _attributes(p, s)),
                 ("confidence", "Confidence", _confidence(p, s, th)),
                 ("pose", "Pose", _pose(s, th)),
                 ("quality", "Quality", _quality(s, th)),
                 ("review", "Review reasons", _review(p, s, summary, th)),
                 ("flagged", "Flagged faces", _flagged(p, s, thumbs, max_thumbnails))]
    doc = page(f"faceattr report: {out}", f"{s.rows} rows, {s.faces} faces", sections)
    info = {"rows": s.rows, "faces": s.faces, "flagged": s.review, "thumbnails": len(thumbs), "missing": missing}
    return doc, info


def _overview(out: str, s, summary: dict) -> str:
    rows = [("output", out), ("rows", s.rows), ("images", s.images), ("faces", s.faces)]
    rows += [("images with an error", sum(s.errors.values()))]
    rows += [(f"  error: {k}", v) for k, v in s.errors.most_common()]
    if s.reviewed:
        rows.append(("rows flagged for review", f"{s.review} of {s.reviewed} ({100 * s.review / s.reviewed:.1f} %)"))
    for c in ("model", "checkpoint", "detector"):
        for v in sorted(s.values.get(c, ())):
            rows.append((c, v))
    for k in ("inputs", "images_total", "complete", "faces_mode", "seconds", "images_per_s"):
        if k in summary:
            rows.append((f"summary: {k}", str(summary[k])))
    for m in summary.get("models") or []:
        if isinstance(m, dict):
            rows.append(("summary: model", " ".join(str(m.get(k, "")) for k in ("name", "model", "checkpoint"))))
    return table(rows)


def _member_title(m, s) -> str:
    if m.name:
        return f"{m.name} (a model of the set)"
    return "model " + ", ".join(sorted(s.values.get("model", ()))) if s.values.get("model") else "model outputs"


def _attributes(p, s) -> str:
    parts = []
    for m in p.members:
        body = []
        if m.categorical:
            body.append(img(charts.counts_png([(k, s.counts.get(k, {})) for k in m.categorical]),
                            f"class counts of {', '.join(m.categorical)}"))
        if m.numeric:
            body.append(img(charts.hists_png(_hist_panels(s, m.numeric, {}, {})), f"histograms of {', '.join(m.numeric)}"))
        if m.binary:
            shares = [(k.rsplit(".", 1)[-1], (s.shares[k][0] / s.shares[k][1]) if s.shares[k][1] else 0.0,
                       s.shares[k][1]) for k in m.binary]
            body.append(img(charts.shares_png(f"{m.name + ': ' if m.name else ''}share of faces per attribute",
                                              shares), "share true of each binary attribute"))
        if not body:
            body.append(note("no attribute columns"))
        parts.append(f"<h3>{esc(_member_title(m, s))}</h3>" + "".join(body))
    if not parts:
        return note("no model output columns in this output")
    return "".join(parts)


def _confidence(p, s, th: dict) -> str:
    keys = [k for m in p.members for k in m.probs]
    if not keys:
        return note("no categorical output with a probability (<output>_prob) in this output")
    per = th.get("per_output") if isinstance(th.get("per_output"), dict) else {}
    lines = {k: _finite(per.get(k[:-5], th.get("min_confidence"))) for k in keys}
    text = "<p>The probability of the class given (calibrated when the checkpoint is). " + (
        f"Dashed: the review threshold under which low_confidence fires (min_confidence {th['min_confidence']})."
        if "min_confidence" in th else "") + "</p>"
    return text + img(charts.hists_png(_hist_panels(s, keys, {k: "probability" for k in keys}, lines)),
                      "confidence histograms")


def _pose(s, th: dict) -> str:
    if not any(k in s.hists for k in POSE):
        return note("no pose columns (pose_yaw, pose_pitch, pose_roll) in this output")
    lines = {"pose_yaw": _finite(th.get("max_yaw"), -th["max_yaw"] if _finite(th.get("max_yaw")) else None),
             "pose_pitch": _finite(th.get("max_pitch_up"),
                                   -th["max_pitch_down"] if _finite(th.get("max_pitch_down")) else None)}
    return ("<p>Degrees: yaw positive turned to the image's right, pitch positive up, roll positive clockwise "
            "(docs/quality.md). Dashed: the extreme_pose limits.</p>"
            + img(charts.hists_png(_hist_panels(s, list(POSE), {k: "degrees" for k in POSE}, lines)), "pose"))


def _quality(s, th: dict) -> str:
    keys = ["sharpness", "brightness", "face_size", "face_score"]
    if not any(k in s.hists for k in keys[:3]):
        return note("no quality columns (sharpness, brightness, face_size) in this output")
    names = {"sharpness": "0-100", "brightness": "0-100", "face_size": "inter-ocular distance, px",
             "face_score": "detection score"}
    lines = {"sharpness": _finite(th.get("min_sharpness")), "brightness": _finite(th.get("min_brightness")),
             "face_size": _finite(th.get("min_face_size")), "face_score": _finite(th.get("min_detection_score"))}
    return ("<p>Dashed: the review thresholds (blurry, dark, small_face, low_detection_score).</p>"
            + img(charts.hists_png(_hist_panels(s, keys, names, lines), cols=2), "quality"))


def _threshold_of(reason: str, th: dict) -> str:
    simple = {"small_face": "min_face_size", "blurry": "min_sharpness", "dark": "min_brightness",
              "low_detection_score": "min_detection_score"}
    if reason in simple:
        return f"{simple[reason]} = {th.get(simple[reason], '?')}"
    if reason == "extreme_pose":
        return ", ".join(f"{k} = {th.get(k, '?')}" for k in ("max_yaw", "max_pitch_up", "max_pitch_down"))
    if reason.startswith("low_confidence:"):
        out = reason.split(":", 1)[1]
        per = th.get("per_output") if isinstance(th.get("per_output"), dict) else {}
        return f"per_output.{out} = {per[out]}" if out in per else f"min_confidence = {th.get('min_confidence', '?')}"
    return ""


def _review(p, s, summary: dict, th: dict) -> str:
    if "review_reasons" not in p.has:
        return note("no review columns (review, review_reasons) in this output")
    from_summary = summary.get("review_by_reason") if isinstance(summary.get("review_by_reason"), dict) else None
    head = ("reason", "rows", "share of reviewed rows", "threshold") + (("in _summary.json",) if from_summary else ())
    rows = []
    for reason, n in s.reasons.most_common():
        r = (reason, n, f"{100 * n / max(s.reviewed, 1):.1f} %", _threshold_of(reason, th) if th else "")
        rows.append(r + ((from_summary.get(reason, 0),) if from_summary is not None else ()))
    body = f"<p>{s.review} of {s.reviewed} rows flagged (a row may have several reasons).</p>"
    body += table(rows, head) if rows else note("no row is flagged")
    if rows:
        body += img(charts.counts_png([("rows per review reason", dict(s.reasons))], cols=1), "rows per reason")
    if th:
        body += "<h3>Thresholds (_summary.json)</h3>" + table(
            [(k, json.dumps(v) if isinstance(v, dict) else v) for k, v in th.items()], ("setting", "value"))
    else:
        body += note("thresholds unknown: no review_thresholds in the summary")
    return body


def _flagged(p, s, thumbs, max_thumbnails: int) -> str:
    if "review_reasons" not in p.has:
        return note("no review columns: nothing is flagged in this output")
    if not thumbs:
        return note("no face is flagged" if not s.review else "no thumbnails asked for (--max-thumbnails 0)")
    shown = (f"all {len(thumbs)}" if len(thumbs) == s.review else
             f"{len(thumbs)} of {s.review} (a uniform random sample; --max-thumbnails {max_thumbnails})")
    cards = []
    for t in thumbs:
        face = "" if t.face is None else str(t.face)
        pic = (f'<img alt="face {esc(face)} of {esc(t.path)}" src="{t.data_uri}">' if t.jpeg else
               f'<div class="missing">{esc(t.error or "no thumbnail")}</div>')
        cards.append(f'<figure class="thumb" data-path="{esc(t.path)}" data-face="{esc(face)}" '
                     f'data-reasons="{esc(",".join(t.reasons))}">{pic}<figcaption>{esc(t.path)} · face '
                     f'{esc(face or "-")}<br><span class="r">{esc(", ".join(t.reasons))}</span></figcaption>'
                     '</figure>')
    return (f"<p>Flagged faces shown: {shown}, by photo, each cropped from the original photo with its "
            f"face_box.</p><div class=\"sheet\">{''.join(cards)}</div>")


# --- an evaluation ----------------------------------------------------------------------------------------
GROUP_METRICS = 9  # panels per --by key: the accuracies, ECEs and errors of whole outputs first


def evaluation_html(model, ev, metrics: dict, eces: dict, title: str, groups: dict | None = None) -> str:
    """The HTML report of an evaluation (``core.evaluation.run_model``'s :class:`Evaluated` ``ev``): its
    metrics, reliability diagrams, confusion matrices of categorical outputs and, with ``group_report``'s
    ``groups``, per-group bars with intervals and the largest gaps."""
    from core.evaluation import reliability_png
    from models.calibration import CalibrationError
    from models.outputs import Categorical

    overview = table([(k, float(v)) for k, v in sorted({**metrics, **eces}.items())], ("metric", "value"))
    try:
        rel = img(reliability_png(model, ev.raw, ev.targets, title=title), "reliability diagrams")
    except CalibrationError as e:
        rel = note(f"no reliability diagram: {e}")
    panels = [(o.name, list(o.classes), ev.stats[o.name]["confusion"].numpy()) for o in model.outputs
              if isinstance(o, Categorical) and "confusion" in ev.stats.get(o.name, {})]
    conf = (img(charts.confusion_png(panels), "confusion matrices") +
            "<p class=muted>Rows: the true class; columns: the predicted one; colour: share of the true class.</p>"
            if panels else note("no categorical output with labels in this data"))
    return page(f"faceattr evaluation: {title}", f"{len(ev.rows)} rows evaluated",
                [("metrics", "Metrics", overview), ("reliability", "Reliability", rel),
                 ("confusion", "Confusion matrices", conf), ("groups", "Groups", _groups(groups))])


def _group_metrics(names: list[str]) -> list[str]:
    def rank(k: str):
        whole = k.startswith("mean_") or k.count(".") == 1 and not k.split(".")[0][:1].isupper()
        return (0 if whole else 1, 0 if "accuracy" in k else 1 if "ece" in k else 2, k)

    return sorted(names, key=rank)[:GROUP_METRICS]


def _groups(groups: dict | None) -> str:
    if not groups:
        return note("no groups: run jobs.evaluate with --by gender,race,age_group (the labels the data has)")
    body = f"<p>95 % intervals: {esc(groups.get('ci', ''))}.</p>"
    for key in groups.get("by", []):
        g = groups["groups"].get(key, {})
        body += f"<h3>by {esc(key)}</h3>"
        if not g:
            body += note(f"no rows with a {key} label")
            continue
        names = sorted({m for d in g.values() for m in d["metrics"]})
        body += img(charts.groups_png(key, _group_metrics(names), g), f"metrics by {key}")
        gaps = groups.get("gaps", {}).get(key, {})
        rows = [(m, d["gap"], f"{d['max_group']} {d['max']:.4f}", f"{d['min_group']} {d['min']:.4f}")
                for m, d in sorted(gaps.items(), key=lambda kv: -abs(kv[1]["gap"]))]
        if rows:
            body += table(rows, ("metric", "largest gap", "highest group", "lowest group"))
        if groups.get("missing", {}).get(key):
            body += f"<p class=muted>{groups['missing'][key]} rows without a {esc(key)} label left out.</p>"
    return body

