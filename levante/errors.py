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
    """The model is still loading, or the engine has stopped (HTTP 503)."""

    status = 503


class ModelNotFound(LevanteError):
    """A request names a model this server does not serve (HTTP 404)."""

    status = 404


class InvalidTopology(ModelLoadError):
    """A topology file or device map is malformed or does not fit the model."""


class RequestFailed(LevanteError):
    """The engine failed while running this request (HTTP 500); the requests beside it carry on."""

    status = 500


class Overloaded(LevanteError):
    """Too many requests are waiting (HTTP 429): retry after `retry_after` seconds."""

    status = 429
    retry_after = 1


class ConversationNotFound(LevanteError):
    """A saved conversation that does not exist, or is not the asker's (HTTP 404)."""

    status = 404
