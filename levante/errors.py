"""Error types raised inside levante and turned into user messages once, at the edge."""


class LevanteError(Exception):
    """Base class: its message is meant for the user, one line, no traceback."""


class ModelLoadError(LevanteError):
    """The model path, file or its contents cannot be loaded."""


class UnsupportedArchitecture(ModelLoadError):
    """The checkpoint declares an architecture levante does not implement."""


class InvalidRequest(LevanteError):
    """A request (prompt, sampling parameters) cannot be served as asked."""


class ServiceUnavailable(LevanteError):
    """The model is still loading (HTTP 503)."""

    status = 503


class Forbidden(LevanteError):
    """The server is not set up to allow this request (HTTP 403)."""

    status = 403


class ModelNotFound(LevanteError):
    """A request names a model this server does not serve (HTTP 404)."""

    status = 404


class InvalidTopology(ModelLoadError):
    """A topology file or device map is malformed or does not fit the model."""
