"""Status errors with TF Serving's codes, messages and HTTP mapping.

Every failure a request can meet is raised as :class:`ServingError` carrying a
``grpc.StatusCode``; the gRPC and REST front ends turn it into a status or an
``{"error": ...}`` body.  Messages are cut to 1024 characters like TF Serving.
"""
import grpc

MAX_MESSAGE_CHARS = 1024

#: TF Serving's ``ToHTTPStatusCode`` (model_servers/http_server.cc).
HTTP_STATUS = {
    grpc.StatusCode.OK: 200,
    grpc.StatusCode.CANCELLED: 499,
    grpc.StatusCode.UNKNOWN: 500,
    grpc.StatusCode.INVALID_ARGUMENT: 400,
    grpc.StatusCode.DEADLINE_EXCEEDED: 504,
    grpc.StatusCode.NOT_FOUND: 404,
    grpc.StatusCode.ALREADY_EXISTS: 409,
    grpc.StatusCode.PERMISSION_DENIED: 403,
    grpc.StatusCode.RESOURCE_EXHAUSTED: 429,
    grpc.StatusCode.FAILED_PRECONDITION: 400,
    grpc.StatusCode.ABORTED: 409,
    grpc.StatusCode.OUT_OF_RANGE: 400,
    grpc.StatusCode.UNIMPLEMENTED: 501,
    grpc.StatusCode.INTERNAL: 500,
    grpc.StatusCode.UNAVAILABLE: 503,
    grpc.StatusCode.DATA_LOSS: 500,
    grpc.StatusCode.UNAUTHENTICATED: 401,
}

#: ``tensorflow.error.Code`` number -> grpc.StatusCode (the numbers are equal).
_BY_NUMBER = {code.value[0]: code for code in grpc.StatusCode}


def truncate(message: str) -> str:
    """Cuts a message to TF Serving's 1024-character limit."""
    return message if len(message) <= MAX_MESSAGE_CHARS else message[:MAX_MESSAGE_CHARS]


class ServingError(Exception):
    """A request failure with a gRPC status code."""

    def __init__(self, code: grpc.StatusCode, message: str):
        super().__init__(message)
        self.code = code
        self.message = truncate(message)

    @property
    def http_status(self) -> int:
        return HTTP_STATUS.get(self.code, 500)

    @property
    def code_name(self) -> str:
        return self.code.name


def invalid_argument(message: str) -> ServingError:
    return ServingError(grpc.StatusCode.INVALID_ARGUMENT, message)


def not_found(message: str) -> ServingError:
    return ServingError(grpc.StatusCode.NOT_FOUND, message)


def failed_precondition(message: str) -> ServingError:
    return ServingError(grpc.StatusCode.FAILED_PRECONDITION, message)


def unimplemented(message: str) -> ServingError:
    return ServingError(grpc.StatusCode.UNIMPLEMENTED, message)


def resource_exhausted(message: str) -> ServingError:
    return ServingError(grpc.StatusCode.RESOURCE_EXHAUSTED, message)


def internal(message: str) -> ServingError:
    return ServingError(grpc.StatusCode.INTERNAL, message)


def from_code_number(number: int, message: str) -> ServingError:
    """Builds an error from a ``tensorflow.error.Code`` number."""
    return ServingError(_BY_NUMBER.get(number, grpc.StatusCode.UNKNOWN), message)


def from_exception(exc: BaseException) -> ServingError:
    """Maps any exception to a ServingError (TF OpErrors keep their code)."""
    if isinstance(exc, ServingError):
        return exc
    error_code = getattr(exc, "error_code", None)
    message = getattr(exc, "message", None) or str(exc) or type(exc).__name__
    if isinstance(error_code, int):
        return from_code_number(error_code, message)
    return internal(f"{type(exc).__name__}: {message}")
