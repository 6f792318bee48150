"""The label files' text, as every reader of facedata.datasets reads it: one decode (UTF-8, a leading BOM
dropped, any other encoding a clear error naming the file), the lines of a text label file (CelebA's lists,
SCUT-FBP5500's score files, GENKI-4K's labels.txt), and the records of a CSV file (a manifest, GENKI-4K's
labels.csv) with each malformed line reported in the reader's skips and left out."""

from __future__ import annotations

import csv
import io

import storage
from facedata.datasets.base import _Skips
from facedata.manifest_inputs import quotes_close


def decode_text(data: bytes, uri: str) -> str:
    """``data`` as text: UTF-8, a leading BOM dropped (Notepad and Excel's "CSV UTF-8" write one, and it would
    stick to the first name or label). Bytes that are not UTF-8 are a ValueError naming the file and the line:
    the file is in another encoding (Excel's plain "CSV" is Windows-1252), and guessing which one could read
    a name or a label as another."""
    try:
        return data.decode("utf-8-sig")
    except UnicodeDecodeError as err:
        line = data[: err.start].count(b"\n") + 1
        raise ValueError(
            f"{uri} is not UTF-8 text (byte 0x{data[err.start]:02x} on line {line}; Excel's plain \"CSV\" is "
            "Windows-1252): save it as UTF-8 (in Excel, \"CSV UTF-8\") and read it again") from None


def read_text(uri: str) -> str:
    return decode_text(storage.read_bytes(uri), uri)


def read_lines(uri: str) -> list[str]:
    return read_text(uri).splitlines()


def csv_records(text: str, label: str, skips: _Skips, sep: str = ",", file: str = "",
                ) -> tuple[list[str], list[tuple[int, dict]]]:
    """The header and the data rows of a CSV text: ``(row, {column: text})`` per row, ``row`` counting the data
    rows from 0 (the readers' ``file:row N``; a malformed line counts too, so that a row's number does not
    depend on the lines before it), each field's text as written. Header names are stripped of spaces
    (``path, age`` names ``age``) and made unique (:func:`_unique_names`).

    Read line by line, not with pandas, because pandas stops the whole read on a line with more fields than
    the header and its skip option does not say which line it was. These lines are reported in ``skips`` as
    ``file:line N`` (the line in the file) and left out: a line with more or fewer fields than the header (its
    fields cannot be matched to the columns: a field left out would shift the ones after it), a quote that
    closes in the middle of a field (``"a"b``), and a quoted field that runs over several lines (a row's path
    and labels are each on one line: a stray quote had swallowed the lines up to the one that closed it).

    A quote that opens and never closes refuses the file (ValueError naming ``file``, default ``label``, and the
    line where the quote opens): it turns every later line into one field, and where the user meant it to stop
    cannot be known, so the reader does not guess which lines after it are rows. Which quote is left open is
    told by the label job's test (``facedata.manifest_inputs.quotes_close``, with ``csv``'s strict rule), on the
    text ``csv`` read for the record: to the end of the file, or to ``csv``'s field limit (128 KiB) on the way."""
    lines = io.StringIO(text, newline="").readlines()  # the file's lines, as csv reads them (ends kept)
    reader = csv.reader(lines, delimiter=sep, strict=True)
    header: list[str] | None = None
    rows: list[tuple[int, dict]] = []
    line, index = 1, -1
    while True:
        start = line
        try:
            fields = next(reader)
            error = ""
        except StopIteration:
            break
        except csv.Error as err:
            fields, error = [], str(err)
            if not quotes_close("".join(lines[start - 1:reader.line_num]), sep, strict=True):
                raise ValueError(
                    f"{file or label}: line {start} opens a quote (\") that is never closed, so every line after it would "
                    "be read as one field; remove the stray quote, or close it, and read the file again") from None
        line = reader.line_num + 1
        if not fields and not error:
            continue  # a blank line, as pandas skips it
        where = f"{label}:line {start}" if line - start <= 1 else f"{label}:lines {start}-{line - 1}"
        if header is None:
            if error:
                raise ValueError(f"{file or label}: line {start}: the header cannot be read as CSV ({error})")
            header = _unique_names([name.strip() for name in fields])
            continue
        index += 1
        reason = error and f"{error} (a quote inside a quoted field is written twice: \"\")"
        if not reason and line - start > 1:  # a quote open at the end of its line (an error would have said)
            reason = "a quoted field runs over several lines (a stray quote?); a row's fields are on one line"
        if not reason and len(fields) != len(header):
            reason = (f"expected {len(header)} fields ({sep.join(header)}), got {len(fields)}: "
                      f"{sep.join(fields)[:80]!r}")
        if reason:
            skips.add(where, reason)
            continue
        rows.append((index, dict(zip(header, fields))))
    if header is None:
        raise ValueError(f"{file or label}: empty, expected a header line")
    return header, rows


def _unique_names(names: list[str]) -> list[str]:
    """Column names as pandas makes them unique (the second ``x`` is ``x.1``), so a repeated column does not
    silently replace the first."""
    out: list[str] = []
    for name in names:
        new, k = name, 0
        while new in out:
            k += 1
            new = f"{name}.{k}"
        out.append(new)
    return out
