"""One error type for everything a user can cause: it names the file, the reason and what to do."""
from __future__ import annotations


class LoraError(Exception):
    """A refusal the user should read: ``file: reason (hint)``."""

    def __init__(self, file: str | None, reason: str, hint: str = ""):
        self.file = file
        self.reason = reason
        self.hint = hint
        super().__init__(self.message)

    @property
    def message(self) -> str:
        text = f"{self.file}: {self.reason}" if self.file else self.reason
        return f"{text} ({self.hint})" if self.hint else text
