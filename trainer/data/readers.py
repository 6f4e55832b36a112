"""Delimited-file reading with errors that name the file and line.

pandas parses the happy path fast; only when something fails (a parser error,
bytes that do not decode, a value that does not convert, a duplicate id) does
a line-by-line rescan find the exact line, so the error reads
``file:LINE column 'timestamp': expected a number, got 'abc'``. Lines are the
file's own 1-based lines, the header included.
"""
from __future__ import annotations

import csv
import logging
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterator, Optional, Sequence, Union

import pandas as pd

from trainer.data.tables import DataError, RowError

log = logging.getLogger(__name__)

ColumnRef = Union[str, int]   # a file column by name or by 0-based position


def require_file(path: Path, what: str) -> Path:
    if not path.is_file():
        raise DataError(f"{path}: file not found (expected {what})")
    return path


@dataclass(frozen=True)
class TextTable:
    """A delimited text file as pandas reads it; maps data rows back to file lines.

    ``header``: the first line is not a data row (it names the columns unless
    ``names`` does). ``quoting``: csv quoting as pandas was told
    (``csv.QUOTE_MINIMAL`` or ``csv.QUOTE_NONE``); a separator longer than one
    character is a plain split.
    """

    path: Path
    sep: str = ","
    header: bool = True
    encoding: str = "utf-8"
    quoting: int = csv.QUOTE_MINIMAL
    names: Optional[tuple[str, ...]] = None

    def records(self) -> Iterator[tuple[int, list[str]]]:
        """(line where the record starts, its fields) for every non-blank record.

        Raises DataError at the first line whose bytes do not decode.
        """
        lines = _decoded_lines(self.path, self.encoding)
        if len(self.sep) == 1:
            reader = csv.reader(lines, delimiter=self.sep, quoting=self.quoting)
            start = 1
            for fields in reader:
                if fields:
                    yield start, fields
                start = reader.line_num + 1
        else:
            for lineno, line in enumerate(lines, start=1):
                if line.strip("\r\n"):
                    yield lineno, line.rstrip("\r\n").split(self.sep)

    def data_records(self) -> Iterator[tuple[int, list[str]]]:
        """Like ``records`` without the header: the i-th one is pandas' row i."""
        records = self.records()
        if self.header:
            next(records, None)
        return records

    def record(self, row: int) -> tuple[int, list[str]]:
        """(file line, fields) of data row ``row`` (0-based, as in the DataFrame)."""
        for i, record in enumerate(self.data_records()):
            if i == row:
                return record
        raise DataError(f"{self.path}: has no data row {row}")  # pragma: no cover

    def field_names(self) -> list:
        """What every row holds: ``names``, else the header's fields, else the
        positions of the first record's fields."""
        if self.names:
            return list(self.names)
        first = next(self.records(), (0, []))[1]
        return first if self.header else list(range(len(first)))

    def located(self, err: RowError) -> DataError:
        """``err`` (rows of a DataFrame read from this file) as a file:LINE error.

        A row with fewer or more fields than ``field_names`` is reported as
        such (it is why its values are missing).
        """
        names = self.field_names()
        line, fields = self.record(err.rows[-1])
        where = f"{self.path}:{line}"
        if len(fields) != len(names):
            return DataError(self.field_count_error(line, len(fields)))
        if len(err.rows) > 1:
            first = ", ".join(str(self.record(r)[0]) for r in err.rows[:-1])
            return DataError(f"{where}: {err.problem} (first on line {first})")
        return DataError(f"{where} column '{err.column}': {err.problem}")

    def field_count_error(self, line: int, got: int, hint: str = "") -> str:
        names = self.field_names()
        return (f"{self.path}:{line}: expected {len(names)} fields "
                f"({', '.join(map(str, names))}) separated by {self.sep!r}, got {got}"
                + (f"; {hint}" if hint else ""))

    def first_bad_field_count(self, expected: int) -> Optional[tuple[int, int]]:
        """(line, fields) of the first data record without ``expected`` fields."""
        for line, fields in self.data_records():
            if len(fields) != expected:
                return line, len(fields)
        return None


def _decoded_lines(path: Path, encoding: str) -> Iterator[str]:
    """The file's lines (newlines kept), decoded; DataError names a line that fails."""
    with open(path, "rb") as fh:
        for lineno, raw in enumerate(fh, start=1):
            try:
                yield raw.decode("utf-8-sig" if lineno == 1 and encoding == "utf-8"
                                 else encoding)
            except UnicodeDecodeError as err:
                raise DataError(
                    f"{path}:{lineno}: not valid {encoding} (byte "
                    f"{raw[err.start]:#04x} at byte {err.start + 1} of the line); "
                    f"save the file as {encoding}") from None


@contextmanager
def rows_of(table: Optional[TextTable], label: str):
    """Turn a RowError raised inside into a file:LINE DataError for ``table``.

    ``table`` None (a Parquet file) keeps the row index, named after ``label``.
    """
    try:
        yield
    except RowError as err:
        if table is None:
            rows = " and ".join(str(r) for r in err.rows)
            raise DataError(f"{label} row {rows}"
                            + (f" column '{err.column}'" if err.column else "")
                            + f": {err.problem}") from None
        raise table.located(err) from None


# ------------------------------------------------------------------ fixed layouts
def read_delimited(path: Path, sep: str, names: Sequence[str],
                   converters: dict[str, Callable[[str], object]],
                   encoding: str = "utf-8", header: bool = False,
                   expected: str = "") -> pd.DataFrame:
    """Read a headerless (or header-skipped) delimited file into named columns.

    ``converters`` maps a column to ``int`` or ``float`` (values checked and
    converted) or another callable that raises on a bad value. Raises
    DataError naming ``path:line`` and the column on the first malformed line.
    """
    expected = expected or f"{len(names)} fields separated by {sep!r}"
    require_file(path, expected)
    table = TextTable(path, sep, header, encoding,
                      csv.QUOTE_NONE if sep != "," else csv.QUOTE_MINIMAL, tuple(names))
    try:
        df = pd.read_csv(path, sep=sep, names=list(names), header=0 if header else None,
                         encoding=encoding, dtype=str, keep_default_na=False,
                         engine="c" if len(sep) == 1 else "python", quoting=table.quoting)
        for col, conv in converters.items():
            df[col] = _convert_column(df[col], conv)
        if len(df.columns) != len(names) or df.isna().all(axis=1).any():
            raise ValueError("shape")
    except (ValueError, TypeError, UnicodeDecodeError, pd.errors.ParserError):
        _raise_first_bad_line(table, names, converters, expected)
        raise
    if df.empty:
        raise DataError(_no_rows(table, expected))
    return df


def _no_rows(table: TextTable, expected: str) -> str:
    if table.header and next(table.records(), None):
        return f"{table.path}: only a header line, no data rows (expected {expected})"
    return f"{table.path}: empty file (expected {expected})"


def _convert_column(values: pd.Series, conv: Callable) -> pd.Series:
    if conv is int:
        numbers = pd.to_numeric(values, errors="raise")
        if numbers.dtype.kind != "i":   # "4.5" would truncate silently
            raise ValueError("not integers")
        return numbers.astype("int64")
    if conv is float:
        return pd.to_numeric(values, errors="raise").astype("float64")
    return values.map(conv)


def _raise_first_bad_line(table: TextTable, names: Sequence[str], converters: dict,
                          expected: str) -> None:
    """Rescan after pandas failed: raise DataError at the first bad line."""
    positions = {col: list(names).index(col) for col in converters}
    for lineno, fields in table.data_records():
        if len(fields) != len(names):
            raise DataError(table.field_count_error(lineno, len(fields), expected))
        for col, conv in converters.items():
            value = fields[positions[col]]
            problem = _conversion_problem(value, conv)
            if problem:
                raise DataError(f"{table.path}:{lineno} column '{col}': {problem}")
    raise DataError(f"{table.path}: could not be parsed as {table.sep!r}-separated "
                    f"{', '.join(names)}")


def _conversion_problem(value: str, conv: Callable) -> Optional[str]:
    try:
        conv(value)
        return None
    except (TypeError, ValueError):
        pass
    if conv is int:
        try:
            float(value)
            return f"expected an integer, got {value!r}"
        except ValueError:
            return f"expected a number, got {value!r}"
    if conv is float:
        return f"expected a number, got {value!r}"
    return f"cannot parse {value!r} as {getattr(conv, '__name__', conv)}"


# ------------------------------------------------------------------ generic tables
def read_table(path: Path, columns: Optional[dict[str, ColumnRef]] = None,
               sep: str = ",", required: Sequence[str] = (), header: bool = True,
               names: Optional[Sequence[str]] = None,
               ) -> tuple[pd.DataFrame, Optional[TextTable]]:
    """Read a CSV or Parquet file, rename ``columns`` (canonical -> file column).

    A file column is a name or a 0-based position. ``header=False``: the file
    has no header line; its columns are ``names`` if given, else only the
    positions mapped in ``columns`` are kept. Returns the frame and, for a text
    file, the TextTable that locates its rows (None for Parquet).
    """
    require_file(path, "a CSV or Parquet table")
    columns = dict(columns or {})
    if path.suffix.lower() in (".parquet", ".pq"):
        if not header or names:
            raise DataError(f"{path}: 'header' and 'names' apply to CSV files only "
                            "(a Parquet file names its columns)")
        df, table = pd.read_parquet(path), None
        if df.empty:
            raise DataError(f"{path}: no rows (expected {_what(required)})")
    else:
        table = TextTable(path, sep, header, names=tuple(names) if names else None)
        df = _read_text(table, required)
    file_columns = list(df.columns)
    renames = column_renames(path, file_columns, columns, required, header or bool(names))
    if not header and not names:   # unnamed positions nobody mapped are unreachable
        df = df[list(renames)]
    return df.rename(columns=renames), table


def column_renames(path: Path, file_columns: list, columns: dict[str, ColumnRef],
                   required: Sequence[str] = (), named: bool = True) -> dict:
    """{file column: canonical name} for ``columns`` (canonical -> file column
    name or 0-based position); a column that is not there, or a ``required``
    one left unmapped and absent, is a DataError naming the file."""
    renames, missing = {}, []
    for canon, ref in columns.items():
        if isinstance(ref, int):
            if not 0 <= ref < len(file_columns):
                missing.append(f"{canon} (position {ref}; the file has "
                               f"{len(file_columns)} columns)")
                continue
            ref = file_columns[ref]
        elif ref not in file_columns:
            missing.append(f"{canon} (file column '{ref}')")
            continue
        renames[ref] = canon
    if missing:
        raise DataError(f"{path}: missing column(s) {', '.join(missing)}; "
                        f"file has {_shown(file_columns, named)}")
    present = set(renames.values()) | (set(file_columns) - set(renames))
    absent = [c for c in required if c not in present]
    if absent:
        raise DataError(f"{path}: missing required column(s) {absent}; file has "
                        f"{_shown(file_columns, named)} (map them with "
                        "'columns:' in the config)")
    return renames


def _read_text(table: TextTable, required: Sequence[str]) -> pd.DataFrame:
    expected = _what(required)
    try:
        df = pd.read_csv(table.path, sep=table.sep, header=0 if table.header else None,
                         names=list(table.names) if table.names else None,
                         engine="c" if len(table.sep) == 1 else "python")
    except pd.errors.EmptyDataError:
        raise DataError(_no_rows(table, expected)) from None
    except (UnicodeDecodeError, pd.errors.ParserError) as err:
        bad = table.first_bad_field_count(len(table.field_names()))
        if bad:
            raise DataError(table.field_count_error(*bad)) from None
        raise DataError(f"{table.path}: {err}") from None
    if df.empty:
        raise DataError(_no_rows(table, expected))
    if table.header and all(_is_number(c) for c in df.columns):
        log.warning("%s:1: the header line %r looks like data (every field is a "
                    "number); if the file has no header, set 'header: false' and map "
                    "columns by position", table.path, table.sep.join(map(str, df.columns)))
    return df


def _what(required: Sequence[str]) -> str:
    return f"rows with {', '.join(required)}" if required else "rows"


def _shown(file_columns: list, named: bool) -> str:
    return str(file_columns) if named else f"{len(file_columns)} unnamed columns (no header)"


def _is_number(value) -> bool:
    try:
        float(str(value))
        return True
    except ValueError:
        return False
