"""One-line error text for the messages refilled-hf prints: torch's, safetensors' and the
Hub client's messages run over several lines, and every refusal is one line."""

from __future__ import annotations

__all__ = ["error_text"]


def error_text(err: BaseException, limit: int = 200, redact: str | None = None) -> str:
    """``TypeName: first line of the message``, whitespace collapsed, at most ``limit``
    characters of message; ``redact`` (a secret such as a token) is replaced by
    ``<token>`` wherever it appears, before anything is cut."""
    message = str(err)
    if redact:
        message = message.replace(redact, "<token>")
    lines = message.strip().splitlines()
    text = " ".join(lines[0].split()) if lines else ""
    text = text if len(text) <= limit else text[: limit - 3] + "..."
    return f"{type(err).__name__}: {text}" if text else type(err).__name__
