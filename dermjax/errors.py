"""Errors a user can cause and fix: the command line prints them as one line, not a traceback.

Every module raises a subclass of `UserError` for a problem in the user's config, data, paths,
credentials or run folder; its message names the field or file and says how to fix it.
`dermjax.main` (and the other entry points) print `error: <message>` and exit with `exit_code`;
`--verbose` shows the traceback as well. Anything else is a bug and keeps its traceback.
`first_line` shortens any exception to one line for a log message, a table cell or JSON.
"""

from __future__ import annotations


def first_line(error: BaseException, *, limit: int = 200) -> str:
    """`Type: first line of the message` (`limit` characters at most), for a log line or JSON."""
    text = str(error).strip().splitlines()
    return f"{type(error).__name__}: {text[0][:limit] if text else ''}"


class UserError(Exception):
    """A problem the user can fix; printed as `error: <message>`, exit status `exit_code`."""

    exit_code = 1


class ConfigError(UserError):
    """Invalid config fields; the message lists every problem, one per line (exit status 2)."""

    exit_code = 2

    def __init__(self, problems: list[str] | tuple[str, ...] | str):
        self.problems = [problems] if isinstance(problems, str) else list(problems)
        lines = "\n".join(f"  - {p}" for p in self.problems)
        super().__init__(f"{len(self.problems)} invalid config field(s):\n{lines}")


class DataError(UserError):
    """Metadata, images, embeddings or their paths cannot be used as they are."""


class RunFolderError(UserError):
    """The run folder is in use, or holds a run that this config cannot continue."""
