"""The one error kind of bad or unsupported arguments.

`ArgumentError` is a ValueError (what shared/DESIGN.md promises for every
unsupported combination) and also a TypeError, so callers that catch either
are served: a float32 input to backend="cuda", a head dim of 300 and mixed
dtypes among q, k, v all raise it, with a message that names the argument as
the caller wrote it and says what is allowed.
"""


class ArgumentError(ValueError, TypeError):
    """A bad or unsupported argument of a jax_fastattn function."""
