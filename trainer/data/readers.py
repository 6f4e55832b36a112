"""Delimited-file reading with errors that name the file and line.

pandas parses the happy path fast; when it fails, a line-by-line rescan finds
the first bad line so the error says exactly where and what was expected.
"""
from __future__ import annotations

from pathlib import Path
from typing import Callable, Optional, Sequence

import pandas as pd

from trainer.data.tables import DataError


def require_file(path: Path, what: str) -> Path:
    if not path.is_file():
        raise DataError(f"{path}: file not found (expected {what})")
    return path


def read_delimited(path: Path, sep: str, names: Sequence[str],
                   converters: dict[str, Callable[[str], object]],
                   encoding: str = "utf-8", header: bool = False,
                   expected: str = "") -> pd.DataFrame:
    """Read a headerless (or header-skipped) delimited file into named columns.

    ``converters`` maps a column to a callable that raises on a bad value (e.g.
    ``int``); only those columns are checked. Raises DataError naming
    ``path:line`` and the column on the first malformed line.
    """
    require_file(path, expected or f"{len(names)} fields separated by {sep!r}")
    try:
        df = pd.read_csv(path, sep=sep, names=list(names), header=0 if header else None,
                         encoding=encoding, dtype=str, keep_default_na=False,
                         engine="c" if len(sep) == 1 else "python",
                         quoting=3 if sep != "," else 0)
        for col, conv in converters.items():
            df[col] = _convert_column(df[col], conv)
        if len(df.columns) != len(names) or df.isna().all(axis=1).any():
            raise ValueError("shape")
        return df
    except Exception:  # noqa: BLE001 - rescan below pinpoints the error
        _raise_first_bad_line(path, sep, names, converters, encoding, header, expected)
        raise


def _convert_column(values: pd.Series, conv: Callable) -> pd.Series:
    if conv is int:
        return pd.to_numeric(values, errors="raise", downcast=None).astype("int64")
    if conv is float:
        return pd.to_numeric(values, errors="raise").astype("float64")
    return values.map(conv)


def _raise_first_bad_line(path: Path, sep: str, names: Sequence[str],
                          converters: dict, encoding: str, header: bool,
                          expected: str) -> None:
    import csv

    with open(path, encoding=encoding, newline="") as fh:
        if sep == ",":
            rows = csv.reader(fh)
        else:
            rows = (line.rstrip("\r\n").split(sep) for line in fh)
        for lineno, fields in enumerate(rows, start=1):
            if header and lineno == 1:
                continue
            if len(fields) != len(names):
                raise DataError(
                    f"{path}:{lineno}: expected {len(names)} fields "
                    f"({', '.join(names)}) separated by {sep!r}, got {len(fields)}"
                    + (f"; {expected}" if expected else ""))
            for col, conv in converters.items():
                value = fields[list(names).index(col)]
                try:
                    conv(value)
                except (TypeError, ValueError):
                    raise DataError(f"{path}:{lineno}: column '{col}': cannot parse "
                                    f"{value!r} as {getattr(conv, '__name__', conv)}")
    raise DataError(f"{path}: could not be parsed as {sep!r}-separated "
                    f"{', '.join(names)}")


def read_table(path: Path, columns: Optional[dict[str, str]] = None,
               sep: str = ",", required: Sequence[str] = ()) -> pd.DataFrame:
    """Read a CSV or Parquet file and rename ``columns`` (canonical -> file)."""
    require_file(path, "a CSV or Parquet table")
    if path.suffix.lower() in (".parquet", ".pq"):
        df = pd.read_parquet(path)
    else:
        try:
            df = pd.read_csv(path, sep=sep)
        except pd.errors.ParserError as err:
            raise DataError(f"{path}: {err}") from None
    columns = columns or {}
    missing = [f"{canon} (file column '{src}')" for canon, src in columns.items()
               if src not in df.columns]
    if missing:
        raise DataError(f"{path}: missing column(s) {', '.join(missing)}; "
                        f"file has {list(df.columns)}")
    df = df.rename(columns={src: canon for canon, src in columns.items()})
    absent = [c for c in required if c not in df.columns]
    if absent:
        raise DataError(f"{path}: missing required column(s) {absent}; file has "
                        f"{list(df.columns)} (map them with 'columns:' in the config)")
    return df
