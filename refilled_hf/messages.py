"""One-line error text for the messages refilled-hf prints: torch's, safetensors' and the
Hub client's messages run over several lines, and every refusal is one line."""

from __future__ import annotations

__all__ = ["byte_size", "error_text"]


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


def byte_size(count: int) -> str:
    """``count`` bytes in binary units, with three significant digits at most: ``"0 B"``,
    ``"512 B"``, ``"330 KiB"``, ``"1.5 MiB"``, ``"147 MiB"``, ``"2.3 GiB"``."""
    value, unit = float(count), "B"
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if value < 1000 or unit == "TiB":
            break
        value /= 1024
    return f"{value:.0f} {unit}" if unit == "B" or value >= 10 else f"{value:.1f} {unit}"
