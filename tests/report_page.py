"""What the report tests read from a report: its HTML parsed (sections, thumbnails, images, scripts) and a
report made by the command's ``main``."""

from __future__ import annotations

from html.parser import HTMLParser

from jobs import report as report_job

SECTIONS = {"overview", "attributes", "confidence", "pose", "quality", "review", "flagged"}


class Page(HTMLParser):
    """Section ids, thumbnails (their data-* attributes and image), every image source, and scripts."""

    def __init__(self, text: str):
        super().__init__()
        self.ids: list[str] = []
        self.thumbs: list[dict] = []
        self.srcs: list[str] = []
        self.scripts = 0
        self.missing_items: list[str] = []
        self._in_missing = False
        self.feed(text)

    def handle_starttag(self, tag, attrs):
        a = dict(attrs)
        if tag == "section":
            self.ids.append(a.get("id"))
            self._in_missing = a.get("id") == "missing"
        if tag == "figure" and "thumb" in (a.get("class") or ""):
            self.thumbs.append({"path": a["data-path"], "face": a["data-face"], "reasons": a["data-reasons"],
                                "src": None})
        if tag == "img":
            self.srcs.append(a.get("src", ""))
            if self.thumbs and self.thumbs[-1]["src"] is None and a.get("src", "").startswith("data:image/jpeg"):
                self.thumbs[-1]["src"] = a["src"]
        if tag == "script":
            self.scripts += 1

    def handle_data(self, data):
        if self._in_missing and data.strip():
            self.missing_items.append(data.strip())

    def handle_endtag(self, tag):
        if tag == "section":
            self._in_missing = False


def run_report(out, tmp_path, *args) -> tuple[Page, dict]:
    html_path = tmp_path / "report.html"
    info = report_job.main([str(out), "--html", str(html_path), *args])
    return Page(html_path.read_text(encoding="utf-8")), info
