"""Reading a label output's Parquet for the report (core/report_scan.py) within bounds the report sets, not the
files: they come from whoever wrote the output, and a few kilobytes of Parquet can say gigabytes.

- Each file is read with ``pyarrow.parquet.ParquetFile.iter_batches`` in batches of :data:`BATCH_ROWS` rows.
  ``pyarrow.dataset`` decodes a whole row group before it slices it: one row group of 600,000 repeated 2 KB
  paths, a 73 KB file, took 1.1 GB that way and 80 MB this way (``ru_maxrss``, /tmp/audit_report/t4.py).
- Only the columns the report draws, a struct's fields one by one; every string among them is read as a
  dictionary, so that a long value repeated in every row is held once, not once per row.
- Before a row is read, the column chunks it would read are checked on the file's metadata: over
  :data:`MAX_ROW_GROUP_BYTES` uncompressed in one row group (a dictionary holds its row group's distinct
  values), or a list column with over :data:`MAX_LIST_VALUES` items in one row group (one row may hold them
  all), and the file is refused (:class:`TooLarge`, saying which file, row group and column).
- Values are handed on cut (:func:`texts`): a counted value to :data:`MAX_LABEL_BYTES`, each distinct value
  cut once, never one per row.
- A file that cannot be read (cut short by an interrupted run, not Parquet) is left out and named in the
  report's notes with the rows it had given, and the others are read (:func:`batches`); only an output of
  which no file can be read is refused (:func:`open_labels`).

Also the output around the Parquet: the folder and its ``labels/`` (:func:`open_labels`) and the run's
``_summary.json``, read bounded (:func:`read_summary`).
"""

from __future__ import annotations

import json
import posixpath
from dataclasses import dataclass

import pyarrow as pa
import pyarrow.compute as pc

import storage

SUMMARY_FILE = "_summary.json"  # raytasks/label/output.py's names (core does not import raytasks)
LABELS_DIR = "labels"
SUMMARY_MAX_BYTES = 16 << 20  # a run's summary is a few kilobytes
SUMMARY_TIMEOUT_S = 60.0
MAX_FILE_NOTES = 20  # unreadable files named one by one in the notes; the rest counted

BATCH_ROWS = 1 << 14
MAX_LABEL_BYTES = 200  # of a counted value: 1,000 distinct 1 KB values cost 1 MB, not the column
# Uncompressed bytes of the column chunks read in one row group. A string column read as a dictionary holds
# its row group's distinct values (measured: 740 MB for 200 MB of distinct 1 KB strings), so this bounds that;
# a label job's row group (one Ray block, at most 128 MB with the embedding the report does not read) fits.
MAX_ROW_GROUP_BYTES = 128 << 20
MAX_LIST_VALUES = 1 << 23  # items of one list column in one row group: one row may hold them all


class TooLarge(ValueError):
    """A file the report will not read: a column chunk it needs is over the limits (the message says which)."""


class ReportError(ValueError):
    """An output the report cannot be built from (no such folder, no labels, no readable Parquet)."""


@dataclass
class Labels:
    """The Parquet files of an output's ``labels/`` (sorted, as ``pyarrow.dataset`` lists them), their
    filesystem, and the schema of the first readable one (what the report plans to read)."""

    files: list
    filesystem: object
    schema: pa.Schema


def read_summary(out: str) -> tuple[dict, str | None]:
    """The run's ``_summary.json`` as a dict, or ``({}, why not)``: a missing or unreadable one is a note."""
    uri = storage.join(out, SUMMARY_FILE)
    try:
        # bounded: a summary is a few kilobytes; a FIFO, a huge file or a hung mount fails here, never hangs
        doc = json.loads(storage.read_bounded(uri, SUMMARY_MAX_BYTES, SUMMARY_TIMEOUT_S))
        if not isinstance(doc, dict):
            raise ValueError("not a JSON object")
        return doc, None
    except FileNotFoundError:
        return {}, f"no {SUMMARY_FILE}: the run's totals and the review thresholds are unknown (counts below are from the rows)"
    except (OSError, ValueError, RecursionError) as e:  # RecursionError: JSON nested thousands deep
        return {}, f"{SUMMARY_FILE} could not be read ({str(e)[:200]}): the run's totals and thresholds are unknown"


def open_labels(out: str) -> Labels:
    """``OUT/labels/``'s Parquet files, or :class:`ReportError` saying why not: no such folder, no
    ``labels/``, no file, or no file that can be read (naming the first one and why)."""
    import pyarrow.dataset as pads
    import pyarrow.fs as pafs
    import pyarrow.parquet as pq

    try:
        fs, root = storage.filesystem(out)
        if fs.get_file_info(root).type == pafs.FileType.NotFound:
            raise ReportError(f"{out}: no such folder or prefix")
        labels = storage.join(out, LABELS_DIR)
        fs, root = storage.filesystem(labels)
        if fs.get_file_info(root).type != pafs.FileType.Directory:
            raise ReportError(f"{out} has no {LABELS_DIR}/ folder: not a label output, or a run that wrote no rows yet")
        # a schema given: the files are listed, not opened (the dataset would read the first one's footer and
        # fail on a file an interrupted run cut short)
        files = pads.dataset(root, filesystem=fs, format="parquet", schema=pa.schema([])).files
    except ReportError:
        raise
    except (OSError, pa.ArrowException, ValueError) as e:
        raise ReportError(f"cannot read the labels under {out}: {str(e)[:300]}") from None
    if not files:
        raise ReportError(f"{labels} holds no Parquet file: a run that wrote no rows yet")
    first_error = None
    for path in files:
        try:
            with fs.open_input_file(path) as f:
                return Labels(files, fs, pq.ParquetFile(f).schema_arrow)
        except (OSError, pa.ArrowException, ValueError) as e:
            first_error = first_error or f"{posixpath.basename(path)[:200]}: {str(e)[:300]}"
    raise ReportError(f"cannot read the labels under {out}: none of its {len(files)} Parquet file(s) can be read "
                      f"({first_error})")


def texts(a: pa.Array, n: int) -> tuple[list, list]:
    """The values of a string array (plain or dictionary) as ``str`` cut to ``n`` bytes (``…`` marks a cut;
    bytes that are not UTF-8 replaced), and their lengths in bytes. A dictionary's values are cut once each."""
    if pa.types.is_dictionary(a.type):
        ind = a.indices
        uniq = pc.unique(pc.drop_null(ind))
        vals, lens = texts(a.dictionary.take(uniq), n)
        at = dict(zip(uniq.to_pylist(), zip(vals, lens)))
        got = [at.get(i, (None, None)) for i in ind.to_pylist()]
        return [g[0] for g in got], [g[1] for g in got]
    b = a.cast(pa.large_binary() if pa.types.is_large_string(a.type) else pa.binary())
    lens = pc.binary_length(b).to_pylist()
    cut = pc.binary_slice(b, 0, n).to_pylist()
    return ([None if c is None else c.decode("utf-8", "replace") + ("…" if k > n else "")
             for c, k in zip(cut, lens)], lens)


def counts(a: pa.Array):
    """``(value cut to MAX_LABEL_BYTES, rows)`` of a string array's non-null values."""
    a = pc.drop_null(a)
    if pa.types.is_dictionary(a.type):  # counted on the indices: the long values are never repeated
        vc = pc.value_counts(a.indices)
        values = a.dictionary.take(vc.field("values"))
    else:
        vc = pc.value_counts(a)
        values = vc.field("values")
    return [(v, k) for v, k in zip(texts(values, MAX_LABEL_BYTES)[0], vc.field("counts").to_pylist()) if v is not None]


def open_file(f, path: str, dotted: list[str]):
    """``ParquetFile`` of the open file ``f`` (named ``path``) reading every string under the columns
    ``dotted`` as a dictionary, after checking on its metadata that the column chunks it reads are within
    the limits (:class:`TooLarge`)."""
    import pyarrow.parquet as pq

    meta = pq.ParquetFile(f).metadata
    schema = meta.schema
    picked = [j for j in range(len(schema))
              if any(schema.column(j).path == d or schema.column(j).path.startswith(d + ".") for d in dotted)]
    for g in range(meta.num_row_groups):
        rg = meta.row_group(g)
        size = sum(rg.column(j).total_uncompressed_size for j in picked)
        if size > MAX_ROW_GROUP_BYTES:
            raise TooLarge(f"{posixpath.basename(path)[:200]}: row group {g} holds {size} bytes uncompressed in the "
                           f"columns the report reads, over its limit of {MAX_ROW_GROUP_BYTES} (rewrite it with "
                           "smaller row groups: pyarrow.parquet.write_table(..., row_group_size=...))")
        for j in picked:
            c, leaf = rg.column(j), schema.column(j)
            if leaf.max_repetition_level > 0 and c.num_values > MAX_LIST_VALUES:
                raise TooLarge(f"{posixpath.basename(path)[:200]}: row group {g}, column {leaf.path[:200]}: "
                               f"{c.num_values} list items, over the report's limit of {MAX_LIST_VALUES}")
    strings = [schema.column(j).path for j in picked if schema.column(j).physical_type == "BYTE_ARRAY"]
    return pq.ParquetFile(f, metadata=meta, read_dictionary=strings)


def column(batch: pa.RecordBatch, path: tuple):
    """The array at ``path`` (a column, or a struct's field), or None where it is absent or ambiguous."""
    i = batch.schema.get_field_index(path[0])
    if i < 0:
        return None
    a = batch.column(i)
    for sub in path[1:]:
        j = a.type.get_field_index(sub) if pa.types.is_struct(a.type) else -1
        if j < 0:
            return None
        a = a.field(j)
    return a


def _unreadable(name: str, first: int, e: Exception) -> str:
    rows = (f"its rows from {first} on are left out (the {first} before are counted)" if first else
            "left out of every count")
    return (f"{name[:200]} could not be read ({type(e).__name__}: {str(e)[:200]}): {rows}. A file cut short by an "
            "interrupted run? Run the same label command again on this output: it deletes such files and labels "
            "their images again")


def batches(dataset, columns: dict, notes: list):
    """``(file name, first row, rows, {key: array})`` per batch of the files of ``dataset`` (a
    :class:`Labels` or a ``pyarrow.dataset.Dataset``: its file list and filesystem), ``columns`` a plan's
    (key -> (path, type check, type)). A column absent from a file, or of another type there, is all null (a
    line in ``notes`` once per file and column, at most 20 lines). A file that cannot be read, or whose rows
    stop being readable part way, is left out from there (a line in ``notes``; :data:`MAX_FILE_NOTES` files
    named); a file over the limits is refused (:class:`TooLarge`)."""
    fs = dataset.filesystem
    dotted = sorted({".".join(path) for path, _, _ in columns.values()})
    said: set = set()
    unreadable = 0
    for path in dataset.files:
        name, first = posixpath.basename(path), 0
        try:
            with fs.open_input_file(path) as f:
                pf = open_file(f, path, dotted)
                # a row group at a time: a batch across two would hold two dictionaries of a string, which Arrow
                # cannot give for a struct's field ("Nested data conversions not implemented for chunked array")
                for batch in (b for g in range(pf.num_row_groups)
                              for b in pf.iter_batches(batch_size=BATCH_ROWS, row_groups=[g], columns=dotted)):
                    cols = {}
                    for key, (cpath, ok, t) in columns.items():
                        a = column(batch, cpath)
                        if a is not None and not ok(a.type):
                            if (name, key) not in said and len(said) < 20:
                                said.add((name, key))  # the file's type, not the dictionary it is read as
                                t_file = a.type.value_type if pa.types.is_dictionary(a.type) else a.type
                                notes.append(f"{name[:200]}: column {key[:200]} is {t_file}: read as empty")
                            a = None
                        cols[key] = a if a is not None else pa.nulls(batch.num_rows, t)
                    yield name, first, batch.num_rows, cols
                    first += batch.num_rows
        except (OSError, pa.ArrowException) as e:  # not TooLarge: a file over the limits refuses the report
            unreadable += 1
            if unreadable <= MAX_FILE_NOTES:
                notes.append(_unreadable(name, first, e))
    if unreadable > MAX_FILE_NOTES:
        notes.append(f"{unreadable - MAX_FILE_NOTES} more files could not be read: left out")
