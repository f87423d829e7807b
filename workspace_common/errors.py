"""One line for an error, wherever it is shown: an exception's words, a request failure's root cause."""

from __future__ import annotations

def one_line(exc: BaseException) -> str:
    """The exception's text with all white space (newlines too) collapsed; its type's name if it has none."""
    return " ".join(str(exc).split()) or type(exc).__name__


def first_line(exc: BaseException) -> str:
    """The first line of the exception's text; its type's name if it has none."""
    text = str(exc).strip() or type(exc).__name__
    return text.splitlines()[0]


def failure_words(exc: BaseException) -> str:
    """A failed request's root cause in a few words (``Connection refused``), not urllib3's whole chain.

    Follows ``reason`` attributes, exception arguments and causes down to
    the innermost error; an OSError gives its strerror.
    """
    seen: list[BaseException] = []
    current: BaseException | None = exc
    while current is not None and current not in seen:
        seen.append(current)
        inner = getattr(current, "reason", None)
        if not isinstance(inner, BaseException):
            first = current.args[0] if current.args else None
            inner = first if isinstance(first, BaseException) else None
        current = inner or current.__cause__ or current.__context__
    root = seen[-1]
    if isinstance(root, OSError) and root.strerror:
        return root.strerror
    words = " ".join(str(root).split()) or type(root).__name__
    return words[:200]
