"""A report a person reads: one self-contained HTML file (charts and thumbnails embedded as base64 images,
no script, no server) for a label output (``python -m jobs.report OUT``) or an evaluation
(``python -m jobs.evaluate ... --report REPORT.html``). docs/quality.md, "The report".

A label output's report has, each under a stable element id: ``overview`` (rows, images, faces, errors,
models, the summary's totals), ``missing`` (only when something is: no summary, columns an older version
did not write), ``attributes`` (every model output's distribution: counts of each class, histograms of
numbers, the share true of binary attributes; per model of a set), ``confidence`` (every categorical
output's ``<x>_prob``), ``pose``, ``quality``, ``review`` (rows per reason, thresholds) and ``flagged``
(thumbnails of a sample of the flagged faces, each captioned with its path, face and reasons).

The output's folder, files and summary are opened by core/report_read.py (a file that cannot be read is left
out and named, the others reported), and the Parquet is streamed once (core/report_scan.py and
core/report_read.py: bounded memory whatever the rows hold); an output of no rows gets a note in place of its
charts. Charts are core/report_charts.py, thumbnails core/report_thumbs.py, the HTML pieces
core/report_html.py. An output and its ``_summary.json`` are whoever wrote them: every value is escaped where it
is shown, shortened (:data:`MAX_TEXT`, :data:`MAX_CAPTION`) and listed at most :data:`MAX_TABLE_ROWS` times, and a
section that cannot be drawn says why in its place (:func:`_drawn`) while the others are written.
"""

from __future__ import annotations

import json
import math

import pyarrow as pa

from core import report_charts as charts
from core.report_html import esc, img, note, page, para, table
from core.report_read import ReportError, TooLarge, open_labels, read_summary
from core.report_scan import POSE, Tally, plan, scan

DEFAULT_MAX_THUMBNAILS = 300
MAX_TEXT = 300  # characters of a summary's value shown
MAX_CAPTION = 120  # characters of a path in a thumbnail's caption (the full one is in data-path)
MAX_TABLE_ROWS = 50  # error kinds, review reasons, thresholds, models listed (the rest summed in one row)
NO_PREFIX = "no --allow-prefix, and no usable prefix in the summary (see 'What this report lacks')"
NO_ROWS = ("no rows to draw: the output's files hold none yet, or none could be read (see 'What this report "
           "lacks')")


# --- a label output ---------------------------------------------------------------------------------------
def _short(x, n: int = MAX_TEXT) -> str:
    """``x`` as text of at most about ``n`` characters: a summary's value is a stranger's (a threshold of a
    megabyte is a megabyte of page); the middle goes, so that a path keeps its file name."""
    t = x if isinstance(x, str) else json.dumps(x) if isinstance(x, (dict, list)) else str(x)
    return t if len(t) <= n else f"{t[: n // 2]}…{t[-(n // 2):]} ({len(t)} characters)"


def _value(v):
    """A summary's value for a table cell: a number as itself (drawn as a number), anything else as short text."""
    return v if _finite(v) else _short(v)


def _thresholds(summary: dict) -> dict:
    t = summary.get("review_thresholds")
    return t if isinstance(t, dict) else {}


def _hist_panels(s, keys: list[str], names: dict, lines: dict) -> list[tuple]:
    return [(k, s.hists[k], names.get(k, ""), lines.get(k, ())) for k in keys if k in s.hists]


def _finite(*vals) -> list[float]:
    """The values that are numbers a chart can draw a line at: a bool is not one, nor a 401-digit integer
    (``math.isfinite`` of it is an OverflowError), nor inf."""
    out = []
    for v in vals:
        if isinstance(v, (int, float)) and not isinstance(v, bool):
            try:
                if math.isfinite(v):
                    out.append(float(v))
            except OverflowError:
                pass
    return out


def _drawn(draw, *args) -> str:
    """A section's body, or a note saying why it could not be drawn: whatever a tampered output holds, the
    report is written with its other sections, not replaced by a traceback."""
    try:
        return draw(*args)
    except Exception as e:  # noqa: BLE001 - any error of one section becomes its note
        return _cannot_draw(e)


def _cannot_draw(e: Exception) -> str:
    return note(f"this section could not be drawn: {type(e).__name__}: {str(e)[:300]}")


def label_report(out: str, max_thumbnails: int = DEFAULT_MAX_THUMBNAILS, seed: int = 0,
                 allow: tuple[str, ...] = ()) -> tuple[str, dict]:
    """The HTML report of the label output ``out`` (folder or ``s3://`` prefix) and a dict of what it holds
    (``rows``, ``faces``, ``flagged``, ``thumbnails``, ``missing``, ``photos``: where photos were read).
    :class:`ReportError` when there are no labels to report on (no file, or none that can be read), or a file
    over the scan's limits; a missing summary, missing columns or a file that cannot be read among others give
    a partial report that says so. Photos for thumbnails are read only under
    ``core.report_thumbs.allowed_photos``."""
    labels = open_labels(out)
    summary, summary_problem = read_summary(out)
    p = plan(labels.schema)
    try:
        s = scan(labels, p, max_thumbnails, seed)
    except (OSError, pa.ArrowException, TooLarge) as e:
        raise ReportError(f"cannot read the labels under {out}: {str(e)[:300]}") from None
    missing = ([summary_problem] if summary_problem else []) + p.missing
    if p.missing:
        missing.append("(an output written by an older version of faceattr lacks these columns, or one written by "
                       "something else has them of another type; label it again into a new --output to get them)")
    missing += s.notes
    th = _thresholds(summary)
    from core.report_thumbs import allowed_photos, thumbnails  # imports torch (models.preprocess): only now

    where, photos = allowed_photos(summary, allow)
    if s.flagged and max_thumbnails and not where:
        missing.append(photos)
    photos = photos if where else ""  # where thumbnails were read, or nothing
    try:
        thumbs = thumbnails(s.flagged, allow=where, why_not=NO_PREFIX) if s.flagged else []
    except Exception as e:  # noqa: BLE001 - as _drawn: the contact sheet's note, not the report's end
        thumbs, flagged = [], _cannot_draw(e)
    else:
        flagged = _drawn(_flagged, p, s, thumbs, max_thumbnails)
    sections = [("overview", "Overview", _drawn(_overview, out, s, summary, photos))]
    if missing:
        sections.append(("missing", "What this report lacks", "<ul>" + "".join(f"<li>{esc(m)}</li>" for m in missing)
                         + "</ul>"))
    charted = [("attributes", "Attributes", _attributes, (p, s)), ("confidence", "Confidence", _confidence, (p, s, th)),
               ("pose", "Pose", _pose, (s, th)), ("quality", "Quality", _quality, (s, th))]
    sections += [(sid, title, _drawn(draw, *args) if s.rows else note(NO_ROWS)) for sid, title, draw, args in charted]
    sections += [("review", "Review reasons", _drawn(_review_section, p, s, summary, th)),
                 ("flagged", "Flagged faces", flagged)]
    doc = page(f"faceattr report: {out}", f"{s.rows} rows, {s.faces} faces", sections)
    info = {"rows": s.rows, "faces": s.faces, "flagged": s.review, "thumbnails": len(thumbs), "missing": missing,
            "photos": photos}
    return doc, info


def _top(tally, what: str, limit: int = MAX_TABLE_ROWS) -> tuple[list[tuple], tuple | None]:
    """The ``limit`` largest counts of a Tally as ``(value, n)`` rows, and a row for the rest (values past
    the table and those past the Tally's cap), or None: 200,000 distinct error kinds are not a page."""
    rows = tally.most_common(limit)
    rest = sum(tally.values()) - sum(n for _, n in rows) + tally.other
    kinds = len(tally) - len(rows)
    more = f"{kinds} more {what}" + (" and others not counted one by one" if tally.other else "")
    return rows, ((f"({more})", rest) if rest else None)


def _overview(out: str, s, summary: dict, photos: str) -> str:
    rows = [("output", out), ("rows", s.rows), ("images", s.images), ("faces", s.faces)]
    rows += [("images with an error", sum(s.errors.values()) + s.errors.other)]
    errors, rest = _top(s.errors, "kinds")
    rows += [(f"  error: {k}", v) for k, v in errors] + ([("  error: " + rest[0], rest[1])] if rest else [])
    if s.reviewed:
        rows.append(("rows flagged for review", f"{s.review} of {s.reviewed} ({100 * s.review / s.reviewed:.1f} %)"))
    for c in ("model", "checkpoint", "detector"):
        seen = s.values.get(c)
        for v in sorted(seen or ()):
            rows.append((c, v))
        if seen is not None and seen.other:
            rows.append((c, f"(other values in {seen.other} rows: more than {seen.cap} distinct)"))
    if photos:
        rows.append(("thumbnails' photos", photos))
    for k in ("inputs", "images_total", "complete", "faces_mode", "seconds", "images_per_s"):
        if k in summary:
            rows.append((f"summary: {k}", _short(summary[k])))
    models = summary.get("models")
    models = models if isinstance(models, list) else []  # "models": 5 is no list of models
    for m in models[:MAX_TABLE_ROWS]:
        if isinstance(m, dict):
            rows.append(("summary: model", _short(" ".join(str(m.get(k, "")) for k in ("name", "model", "checkpoint")))))
    if len(models) > MAX_TABLE_ROWS:
        rows.append(("summary: model", f"({len(models) - MAX_TABLE_ROWS} more models)"))
    return table(rows)


def _member_title(m, s) -> str:
    if m.name:
        return f"{m.name} (a model of the set)"
    return "model " + ", ".join(sorted(s.values.get("model", ()))) if s.values.get("model") else "model outputs"


def _with_other(tally) -> dict:
    d = dict(tally)
    if tally.other:  # said in the chart, not dropped: the bars then add up to the rows
        label = f"(other values: more than {tally.cap} distinct)"
        d[label] = d.get(label, 0) + tally.other
    return d


def _attributes(p, s) -> str:
    parts = []
    for m in p.members:
        body = []
        if m.categorical:
            body.append(img(charts.counts_png([(k, _with_other(s.counts.get(k, Tally()))) for k in m.categorical]),
                            f"class counts of {', '.join(m.categorical)}"))
        numeric = _hist_panels(s, m.numeric, {}, {})  # none before a batch: no panel, not an empty grid
        if numeric:
            body.append(img(charts.hists_png(numeric), f"histograms of {', '.join(m.numeric)}"))
        if m.binary:
            got = {k: s.shares.get(k, (0, 0)) for k in m.binary}
            shares = [(k.rsplit(".", 1)[-1], (got[k][0] / got[k][1]) if got[k][1] else 0.0, got[k][1]) for k in m.binary]
            body.append(img(charts.shares_png(f"{m.name + ': ' if m.name else ''}share of faces per attribute",
                                              shares), "share true of each binary attribute"))
        if not body:
            body.append(note("no attribute columns"))
        parts.append(f"<h3>{esc(_member_title(m, s))}</h3>" + "".join(body))
    if not parts:
        return note("no model output columns in this output")
    return "".join(parts)


def _confidence(p, s, th: dict) -> str:
    keys = [k for m in p.members for k in m.probs if k in s.hists]
    if not keys:
        return note("no categorical output with a probability (<output>_prob) in this output")
    per = th.get("per_output") if isinstance(th.get("per_output"), dict) else {}
    lines = {k: _finite(per.get(k[:-5], th.get("min_confidence"))) for k in keys}
    text = "The probability of the class given (calibrated when the checkpoint is). " + (
        f"Dashed: the review threshold under which low_confidence fires (min_confidence "
        f"{_short(th['min_confidence'])})." if "min_confidence" in th else "")
    return para(text) + img(charts.hists_png(_hist_panels(s, keys, {k: "probability" for k in keys}, lines)),
                            "confidence histograms")


def _pose(s, th: dict) -> str:
    if not any(k in s.hists for k in POSE):
        return note("no pose columns (pose_yaw, pose_pitch, pose_roll) in this output")
    lines = {"pose_yaw": _finite(th.get("max_yaw"), *[-v for v in _finite(th.get("max_yaw"))]),
             "pose_pitch": _finite(th.get("max_pitch_up"), *[-v for v in _finite(th.get("max_pitch_down"))])}
    return (para("Degrees: yaw positive turned to the image's right, pitch positive up, roll positive clockwise "
                 "(docs/quality.md). Dashed: the extreme_pose limits.")
            + img(charts.hists_png(_hist_panels(s, list(POSE), {k: "degrees" for k in POSE}, lines)), "pose"))


def _quality(s, th: dict) -> str:
    keys = ["sharpness", "brightness", "face_size", "face_score"]
    if not any(k in s.hists for k in keys[:3]):
        return note("no quality columns (sharpness, brightness, face_size) in this output")
    names = {"sharpness": "0-100", "brightness": "0-100", "face_size": "inter-ocular distance, px",
             "face_score": "detection score"}
    lines = {"sharpness": _finite(th.get("min_sharpness")), "brightness": _finite(th.get("min_brightness")),
             "face_size": _finite(th.get("min_face_size")), "face_score": _finite(th.get("min_detection_score"))}
    return (para("Dashed: the review thresholds (blurry, dark, small_face, low_detection_score).")
            + img(charts.hists_png(_hist_panels(s, keys, names, lines), cols=2), "quality"))


def _threshold_of(reason: str, th: dict) -> str:
    simple = {"small_face": "min_face_size", "blurry": "min_sharpness", "dark": "min_brightness",
              "low_detection_score": "min_detection_score"}
    if reason in simple:
        return _short(f"{simple[reason]} = {_short(th.get(simple[reason], '?'))}")
    if reason == "extreme_pose":
        return ", ".join(f"{k} = {_short(th.get(k, '?'))}" for k in ("max_yaw", "max_pitch_up", "max_pitch_down"))
    if reason.startswith("low_confidence:"):
        out = reason.split(":", 1)[1]
        per = th.get("per_output") if isinstance(th.get("per_output"), dict) else {}
        return _short(f"per_output.{out} = {_short(per[out])}" if out in per else
                      f"min_confidence = {_short(th.get('min_confidence', '?'))}")
    return ""


def _review_section(p, s, summary: dict, th: dict) -> str:
    if "review_reasons" not in p.has:
        return note("no review columns (review, review_reasons) in this output")
    from_summary = summary.get("review_by_reason") if isinstance(summary.get("review_by_reason"), dict) else None
    head = ("reason", "rows", "share of reviewed rows", "threshold") + (("in _summary.json",) if from_summary else ())
    top, rest = _top(s.reasons, "reasons")
    rows = []
    for reason, n in top:
        r = (reason, n, f"{100 * n / max(s.reviewed, 1):.1f} %", _threshold_of(reason, th) if th else "")
        rows.append(r + ((_value(from_summary.get(reason, 0)),) if from_summary is not None else ()))
    if rest:
        rows.append((rest[0], rest[1], "", "") + (("",) if from_summary is not None else ()))
    body = para(f"{s.review} of {s.reviewed} rows flagged (a row may have several reasons).")
    body += table(rows, head) if rows else note("no row is flagged")
    if rows:
        body += img(charts.counts_png([("rows per review reason", _with_other(s.reasons))], cols=1), "rows per reason")
    if th:
        items = list(th.items())
        body += "<h3>Thresholds (_summary.json)</h3>" + table(
            [(_short(k), _value(v)) for k, v in items[:MAX_TABLE_ROWS]], ("setting", "value"))
        if len(items) > MAX_TABLE_ROWS:
            body += note(f"{len(items) - MAX_TABLE_ROWS} more settings not shown")
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
        # the path once in full (data-path, cut by the scan past any file's length) and shortened where it
        # is read or shown: 300 thumbnails of megabyte paths were a 100 MB page; data-row finds the row
        short = _short(t.path, MAX_CAPTION)
        pic = (f'<img alt="face {esc(face)} of {esc(short)}" src="{t.data_uri}">' if t.jpeg else
               f'<div class="missing">{esc(t.error or "no thumbnail")}</div>')
        cards.append(f'<figure class="thumb" data-path="{esc(t.path)}" data-face="{esc(face)}" '
                     f'data-reasons="{esc(",".join(t.reasons))}" data-row="{esc(t.row)}">{pic}<figcaption>'
                     f'{esc(short)} · face {esc(face or "-")}<br><span class="r">{esc(", ".join(t.reasons))}'
                     '</span></figcaption></figure>')
    return (para(f"Flagged faces shown: {shown}, by photo, each cropped from the original photo with its "
                 "face_box.") + f"<div class=\"sheet\">{''.join(cards)}</div>")


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
            body += f"<p class=muted>{esc(groups['missing'][key])} rows without a {esc(key)} label left out.</p>"
    return body

