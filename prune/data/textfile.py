"""Reading the text files a run is given (manifests, label files): one place for the errors."""

from __future__ import annotations

from pathlib import Path
from typing import Type


def read_text(path: Path, what: str, error: Type[Exception]) -> str:
    """``path``'s UTF-8 text; ``error`` (one line naming the file) if it is missing, a folder, not
    UTF-8 or unreadable. ``what``: the file's role in messages ("manifest", "label file")."""
    try:
        return path.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise error(f"{path}: {what} not found") from None
    except IsADirectoryError:
        raise error(f"{path}: a folder, not a {what}") from None
    except UnicodeDecodeError as e:
        raise error(f"{path}: not UTF-8 text ({e.reason} at byte {e.start})") from None
    except OSError as e:
        raise error(f"{path}: cannot read {what}: {e}") from None
