"""The errors the client raises (distinct from the server's ``serving.errors.ServingError``)."""


class ClientError(Exception):
    """Base class of the errors this package raises."""


class FeatureError(ClientError, ValueError):
    """The request does not match the model's signature (raised before sending)."""


class ServerError(ClientError):
    """The server answered an error (or could not be reached).

    ``code`` is the gRPC status code name (``"NOT_FOUND"``, ``"UNAVAILABLE"``...;
    REST answers are mapped back from the HTTP status), ``attempts`` the number
    of tries made.
    """

    def __init__(self, code: str, message: str, attempts: int = 1):
        super().__init__(f"{code}: {message}" + (f" (after {attempts} attempts)"
                                                   if attempts > 1 else ""))
        self.code, self.message, self.attempts = code, message, attempts
