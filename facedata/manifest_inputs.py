"""Reading a manifest of the label job: its columns, its rows, its ``path`` column streamed in record batches, for a
Parquet or a CSV file. facedata/inputs.py writes the job's listing from it (``write_manifest_listing``) and
re-exports what the job calls.

A CSV manifest's rows are each on one line. A quote that opens a value and is not closed on its line refuses the
manifest, naming that line (:class:`_CsvLines`): pyarrow's reader would take every following line into that value
(up to the end of its 1 MB block, or to the next stray quote), and which of those lines the user meant as rows
cannot be known, so none is guessed at and none is dropped without a word.
"""

from __future__ import annotations

import bisect
import codecs
import re
import threading
from array import array

import pyarrow as pa
import pyarrow.fs as pafs
import pyarrow.parquet as pq

import storage


class InputError(ValueError):
    """An input that cannot be used as a whole: a manifest that is missing, not a table, or without paths."""


def _is_bytes(t: pa.DataType) -> bool:
    return pa.types.is_binary(t) or pa.types.is_large_binary(t) or pa.types.is_fixed_size_binary(t)


def _path_column(batch, uri: str):
    """The ``path`` column of a manifest batch as text or bytes: other types (numbers) as text, a dictionary
    decoded; a type that has no text (a list, a struct) is an :class:`InputError`."""
    col = batch.column(0)
    if pa.types.is_dictionary(col.type):
        col = col.dictionary_decode()
    if pa.types.is_binary_view(col.type):
        col = col.cast(pa.large_binary())  # lossless; the functions used on bytes here take this type
    if pa.types.is_string(col.type) or pa.types.is_large_string(col.type) or _is_bytes(col.type):
        return col
    try:
        return col.cast(pa.string())
    except (pa.ArrowInvalid, pa.ArrowNotImplementedError):
        raise InputError(f"manifest {uri}: its 'path' column is {col.type}, not text") from None


def batch_paths(batch, uri: str = "") -> list[str | None]:
    """The ``path`` column of a manifest record batch as text; values whose bytes are not UTF-8 (a binary
    column, or a Parquet string column written by a tool that did not check) are kept, with ``\\xNN``
    escapes (``facedata.paths.storable``); a binary column is decoded, not cast (a cast refuses such bytes)."""
    col = _path_column(batch, uri)
    if not _is_bytes(col.type):
        try:
            return col.to_pylist()
        except UnicodeDecodeError:
            col = col.cast(pa.large_binary())
    return [None if v is None else v.decode("utf-8", "backslashreplace") for v in col.to_pylist()]


_LINE_END = re.compile(r"\r\n|\r|\n")  # pyarrow's line ends


def quotes_close(line: str, sep: str = ",", strict: bool = False) -> bool:
    """Whether every value of a CSV ``line`` (or of a record's text: a line end inside a quote is text) that opens
    a quote closes it: the one test of a quote left open, for the label job's manifests (:class:`_CsvLines`) and
    the data sets' CSV label files (``facedata.datasets.textfiles.csv_records``). A quote opens only at the start
    of a value (``a"b`` is literal text) and ``""`` inside is one quote. After the closing quote, pyarrow's reader
    goes on with the value up to the next ``sep`` (``"a"b`` is ``ab``); Python's ``csv`` with ``strict`` (the
    data sets' reader) calls the line malformed there and reads no further, so with ``strict`` nothing after such
    a quote opens another."""
    i = 0
    while True:
        if line.startswith('"', i):
            i += 1
            while True:
                j = line.find('"', i)
                if j < 0:
                    return False
                if not line.startswith('"', j + 1):
                    break
                i = j + 2
            i = j + 1
            if strict and i < len(line) and not line.startswith(sep, i):
                return True
        comma = line.find(sep, i)
        if comma < 0:
            return True
        i = comma + len(sep)


class _CsvLines:
    """The physical lines of a CSV manifest, counted as the bytes go to pyarrow (fed by :class:`_EscapeNonUtf8`):
    the file's line number of each record (pyarrow numbers records, skipping blank lines), and the first line that
    opens a quote it does not close (:func:`quotes_close`), after which nothing is counted.

    Memory: two integers per run of blank lines (a record's line is its number plus the blank lines before it).
    pyarrow reads (and so feeds this) on a thread of its own, ahead of the parse that asks for lines: a lock keeps
    the two arrays of runs in step."""

    def __init__(self):
        self.tail = ""  # the text after the last complete line
        self.lines = 0  # complete lines so far
        self.records = 0  # non-blank ones: pyarrow's records, the header included, one line each
        self.malformed = 0  # records pyarrow's invalid_row_handler skipped
        self.unclosed: int | None = None  # the line of the first quote not closed on its line
        self._run_at = array("q")  # records before each run of blank lines
        self._run_blanks = array("q")  # blank lines up to the end of that run
        self._lock = threading.Lock()

    def feed(self, text: str, final: bool) -> None:
        if self.unclosed is not None:
            return
        lines, quoted = self._complete_lines(text, final)
        bad = next((i for i, line in enumerate(lines) if '"' in line and not quotes_close(line)), None) if quoted else None
        if bad is not None:
            self.unclosed = self.lines + bad + 1
            lines = lines[:bad]
        blanks = [i for i, line in enumerate(lines) if not line] if "" in lines else []
        with self._lock:
            for n, i in enumerate(blanks):
                self._blank_line(self.records + i - n)
        self.lines += len(lines)
        self.records += len(lines) - len(blanks)

    def _complete_lines(self, text: str, final: bool) -> tuple[list[str], bool]:
        """The lines ``text`` completes (without their ends), the rest kept for the next call, and whether they
        hold a quote."""
        text = self.tail + text
        if final:
            cut = len(text)
        else:  # a "\r" at the end may be the first half of "\r\n"
            body = text[:-1] if text.endswith("\r") else text
            cut = max(body.rfind("\n"), body.rfind("\r")) + 1
        text, self.tail = text[:cut], text[cut:]
        lines = _LINE_END.split(text)
        if lines[-1] == "":
            lines.pop()  # what follows the last line end
        return lines, '"' in text

    def _blank_line(self, records_before: int) -> None:
        if self._run_at and self._run_at[-1] == records_before:
            self._run_blanks[-1] += 1
        else:
            self._run_at.append(records_before)
            self._run_blanks.append((self._run_blanks[-1] if self._run_blanks else 0) + 1)

    def line_of(self, record: int) -> int:
        """The file's line number of pyarrow's record ``record`` (1 is the header, blank lines not counted)."""
        if record < 1:
            return record  # pyarrow did not know it
        with self._lock:
            runs = bisect.bisect_left(self._run_at, record)  # the runs of blank lines before that record
            return record + (self._run_blanks[runs - 1] if runs else 0)

    def check(self, uri: str, rows: int | None = None) -> None:
        """Refuse the manifest (:class:`InputError`) when a line opened a quote it did not close, or, with ``rows``
        (the rows read, once the whole file was), when those rows and the lines skipped do not add up to the
        file's non-blank lines after the header (a line lost without a word)."""
        if self.unclosed is not None:
            raise InputError(
                f"manifest {uri}: line {self.unclosed} opens a quote (\") that is not closed on that line, so the "
                "lines after it would be read as one value (a manifest's rows are each on one line): remove the "
                "stray quote, or close it, and run again (which lines after it are rows cannot be known, so none is guessed)")
        if rows is not None and self.records != 1 + rows + self.malformed:
            raise InputError(
                f"manifest {uri}: {self.records - 1} lines after the header, but {rows} rows and {self.malformed} "
                "skipped lines were read from them; refused, so that no line is lost without a word")


class _EscapeNonUtf8:
    """A ``pyarrow.TransformInputStream`` function: the bytes of a CSV as UTF-8, a byte that is not UTF-8 as
    the text ``\\xNN`` (the escapes :func:`batch_paths` gives a Parquet manifest's), a leading BOM dropped
    (``utf-8-sig``: Excel's "CSV UTF-8"); the text is counted in ``lines`` (:class:`_CsvLines`) on its way.
    Why not pyarrow's own ``check_utf8=False``: it keeps such bytes in the values, but pyarrow cannot hand a
    malformed line holding one to the ``invalid_row_handler`` (it decodes the line strictly, and fails the whole
    read), so one Latin-1 line with an extra comma would refuse the manifest instead of being skipped and
    reported."""

    def __init__(self, lines: _CsvLines):
        self.decoder = codecs.getincrementaldecoder("utf-8-sig")("backslashreplace")
        self.lines = lines

    def __call__(self, buf) -> bytes:
        text = self.decoder.decode(buf, len(buf) == 0)
        self.lines.feed(text, len(buf) == 0)
        return text.encode("utf-8")


def _open_csv(fs, path: str, lines: _CsvLines, listing=None, columns: list[str] | None = None):
    """``(stream, reader)``: a ``pyarrow.csv`` streaming reader of a CSV manifest, its lines counted in ``lines``
    (:class:`_CsvLines`); the header check (:func:`manifest_columns`) and the read of the paths both use it, so
    they agree on the column names (a BOM, spaces, quotes). A line with more or fewer fields than the header is
    skipped and, with ``listing``, reported there with its line in the file (``Listing.malformed_line``).
    ``use_threads=False``: only then does pyarrow number the records, which :class:`_CsvLines` turns into lines."""
    import pyarrow.csv as pacsv

    stream = pa.TransformInputStream(fs.open_input_stream(path), _EscapeNonUtf8(lines))

    def skipped(row) -> str:
        lines.malformed += 1
        if listing is not None:
            listing.malformed_line(row, lines.line_of(row.number))
        return "skip"

    convert = (pacsv.ConvertOptions(include_columns=columns, column_types={c: pa.string() for c in columns})
               if columns else None)
    return stream, pacsv.open_csv(stream, read_options=pacsv.ReadOptions(use_threads=False),
                                  parse_options=pacsv.ParseOptions(invalid_row_handler=skipped),
                                  convert_options=convert)


def _csv_batches(fs, path: str, uri: str, listing):
    """The record batches of a CSV manifest's ``path`` column, each yielded only once the lines read so far
    are sound (:meth:`_CsvLines.check`), and every line accounted for at the end."""
    lines, rows = _CsvLines(), 0
    try:
        stream, reader = _open_csv(fs, path, lines, listing, ["path"])
        with stream:
            for batch in reader:
                lines.check(uri)
                rows += batch.num_rows
                yield batch
    except pa.ArrowInvalid:
        lines.check(uri)  # pyarrow failed on what a stray quote swallowed: say so rather than its message
        raise
    lines.check(uri, rows)


def manifest_path_batches(uri: str, listing=None):
    """The ``path`` column of a Parquet or CSV manifest, streamed in record batches (bounded memory). A CSV
    line with more or fewer fields than the header is skipped and counted in ``listing``; a file that cannot
    be read as a manifest (a CSV quote not closed on its line, a corrupt Parquet page) is an
    :class:`InputError` naming it (raised while iterating)."""
    fs, path = storage.filesystem(uri)
    is_parquet = uri.lower().endswith(".parquet")
    try:
        if is_parquet:
            with fs.open_input_file(path) as f:
                yield from pq.ParquetFile(f).iter_batches(columns=["path"], batch_size=1 << 16)
        else:
            yield from _csv_batches(fs, path, uri, listing)
    except pa.ArrowKeyError:  # no column named exactly "path" (check_manifest says so first in the job)
        _no_path_column(uri, manifest_columns(uri))
    except (pa.ArrowException, OSError) as e:  # ArrowInvalid; a corrupt page is an OSError naming no file
        raise InputError(f"manifest {uri} cannot be read as {'Parquet' if is_parquet else 'CSV'}: {e}") from None


def manifest_rows(uri: str) -> int:
    """Rows of a manifest, streaming its ``path`` column (bounded memory). A row without a path is refused:
    the path is the row's identity for resuming."""
    import pyarrow.compute as pc

    n = empty = 0
    for batch in manifest_path_batches(uri):
        col = _path_column(batch, uri)
        col = col if _is_bytes(col.type) else col.cast(pa.large_binary())  # bytes: not decoded
        n += batch.num_rows
        empty += col.null_count + (pc.sum(pc.equal(pc.binary_length(col), 0)).as_py() or 0)
    if empty:
        raise InputError(f"manifest {uri}: {empty} of {n} rows have no path")
    return n


def manifest_columns(uri: str) -> list[str]:
    """The column names of a manifest, as the reader of its rows sees them (:func:`_open_csv` for a CSV). A CSV
    whose first block holds a quote not closed on its line is refused here already."""
    fs, path = storage.filesystem(uri)
    kind = "Parquet" if uri.lower().endswith(".parquet") else "CSV"
    lines = _CsvLines()
    try:
        if kind == "Parquet":
            with fs.open_input_file(path) as f:
                return pq.read_schema(f).names
        stream, reader = _open_csv(fs, path, lines)
        with stream:
            names = reader.schema.names
        lines.check(uri)
        return names
    except pa.ArrowInvalid as e:
        lines.check(uri)
        raise InputError(f"manifest {uri} is not a {kind} file ({e})") from None


def _no_path_column(uri: str, names: list[str]):
    shown = ", ".join(repr(n) for n in names) or "none"  # repr: a space or a quote in a name shows
    raise InputError(f"manifest {uri} has no 'path' column (columns: {shown}); the name must be exactly 'path'")


def check_manifest(uri: str) -> None:
    """Refuse a manifest that is missing, unreadable, or without a column named exactly ``path``."""
    fs, path = storage.filesystem(uri)
    kind = fs.get_file_info(path).type
    if kind == pafs.FileType.NotFound:
        raise InputError(f"manifest not found: {uri}")
    if kind != pafs.FileType.File:  # a folder named like a manifest (photos.csv/)
        raise InputError(f"manifest {uri} is not a file: an --input ending in .csv or .parquet is read as a "
                         "manifest (a folder of photos must be named otherwise)")
    names = manifest_columns(uri)
    if "path" not in names:
        _no_path_column(uri, names)
