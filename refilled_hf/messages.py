"""One-line error text for the messages refilled-hf prints: torch's, safetensors' and the
Hub client's messages run over several lines, and every refusal is one line."""

from __future__ import annotations

import os
import stat
from pathlib import Path

__all__ = ["byte_size", "error_chain", "error_text", "offline_hint", "unreadable_file_text"]


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


def error_chain(err: BaseException) -> list[BaseException]:
    """``err`` and the errors it was raised from or while handling (``__cause__``, else
    ``__context__``), outermost first, each once."""
    chain: list[BaseException] = []
    while err is not None and err not in chain:
        chain.append(err)
        err = err.__cause__ or err.__context__
    return chain


def offline_hint(err: BaseException) -> str:
    """For a Hub model or data set that could not be fetched (no network: huggingface_hub
    retries each request for about 25 s first), how to read the Hub cache at once; ''
    otherwise (another error, or offline mode already on)."""
    from huggingface_hub import constants
    from huggingface_hub.errors import LocalEntryNotFoundError

    # huggingface_hub raises LocalEntryNotFoundError; datasets turns it into a ConnectionError
    unreachable = (LocalEntryNotFoundError, ConnectionError)
    if constants.HF_HUB_OFFLINE or not any(isinstance(e, unreachable) for e in error_chain(err)):
        return ""
    return " Without network, HF_HUB_OFFLINE=1 reads what the Hub cache holds at once, without waiting on retries."


def byte_size(count: int) -> str:
    """``count`` bytes in binary units, with three significant digits at most: ``"0 B"``,
    ``"512 B"``, ``"330 KiB"``, ``"1.5 MiB"``, ``"147 MiB"``, ``"2.3 GiB"``."""
    value, unit = float(count), "B"
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if value < 1000 or unit == "TiB":
            break
        value /= 1024
    return f"{value:.0f} {unit}" if unit == "B" or value >= 10 else f"{value:.1f} {unit}"


def unreadable_file_text(path: str | Path) -> str | None:
    """Why this user cannot read the existing file ``path`` (its mode and owner, and the fix),
    or None when it can (or does not exist).

    Readers report such a file as missing or damaged: safetensors says "No such file or
    directory". safetensors 0.8 (and with it transformers' and timm's savers) writes its
    files readable by their owner alone, so a teammate's model or a shared cache often is."""
    path = Path(path)
    try:
        if not path.is_file() or os.access(path, os.R_OK):
            return None
        info = path.stat()
    except OSError:
        return None
    try:
        import pwd

        owner = pwd.getpwuid(info.st_uid).pw_name
    except (ImportError, KeyError):
        owner = f"uid {info.st_uid}"
    return (
        f"{path} exists but this user cannot read it (mode {stat.filemode(info.st_mode)}, owner {owner}; safetensors "
        "0.8 writes its files readable by their owner alone): ask its owner to make it readable (chmod a+r), or copy "
        "it as its owner"
    )
