"""What one request may cost, checked before anything is allocated or run.

A model's memory and time grow with the rows of a request, so the server
bounds rows per request and elements per input tensor (from the declared
shape, before a value is decoded), and the request body's size before it is
read (gRPC's message limit; the REST body cap in :mod:`serving.rest`).
Every refusal is INVALID_ARGUMENT (HTTP 400) naming the limit and its flag:
it fails the same way on every retry, so clients must not retry it.
"""
import math
from dataclasses import dataclass
from typing import Optional

from serving.errors import invalid_argument

MiB = 1 << 20


@dataclass(frozen=True)
class RequestLimits:
    """Flags ``--max_request_size_bytes``, ``--max_rows_per_request``, ``--max_tensor_elements``."""

    max_request_bytes: int = 64 * MiB
    max_rows: int = 10_000
    max_tensor_elements: int = 10_000_000

    def check_elements(self, alias: str, shape) -> int:
        """Element count of ``shape`` (a Python int: no overflow), refused above the cap."""
        count = math.prod(shape)
        if count > self.max_tensor_elements:
            raise invalid_argument(
                f"Input \"{alias}\": shape [{','.join(map(str, shape))}] has {count} elements; "
                f"the limit is {self.max_tensor_elements} elements per tensor "
                "(--max_tensor_elements)")
        return count

    def check_rows(self, rows: Optional[int]) -> None:
        if rows is not None and rows > self.max_rows:
            raise self.too_many_rows(str(rows))

    def too_many_rows(self, rows: str):
        """The refusal for ``rows`` rows ("N", or "more than N" when counting stopped)."""
        return invalid_argument(
            f"Request has {rows} rows; the limit is {self.max_rows} rows per request "
            "(--max_rows_per_request): split it into smaller requests")

    def body_too_large(self, size: Optional[int]) -> str:
        """The message for a REST body over the cap (``size`` None: chunked, cut off)."""
        got = f" of {size} bytes" if size is not None else ""
        return (f"Request body{got} exceeds the limit of {self.max_request_bytes} bytes "
                "(--max_request_size_bytes)")
