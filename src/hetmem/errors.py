"""User-facing errors: the CLI prints them as one line on stderr and exits non-zero."""


class HetmemError(Exception):
    """An error caused by the user's input or environment, reported without a traceback."""

    exit_code = 2


def read_json_file(path, what: str, missing_hint: str = "") -> object:
    """Parse a user's JSON file, or raise a one-line HetmemError naming ``what`` it was meant to be."""
    import json
    from pathlib import Path

    p = Path(path)
    if not p.is_file():
        raise HetmemError(f"{what} {path} does not exist{missing_hint}")
    try:
        return json.loads(p.read_text(encoding="utf-8"))
    except (ValueError, UnicodeDecodeError) as exc:
        raise HetmemError(f"{what} {path} is not valid JSON: {str(exc).splitlines()[0]}") from None
