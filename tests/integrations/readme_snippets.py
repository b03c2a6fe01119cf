"""Code blocks of README.md sections, so tests run the README's snippets as written."""

from __future__ import annotations

import re
from pathlib import Path

README = Path(__file__).resolve().parents[2] / "README.md"


def section_blocks(heading: str, language: str) -> list[str]:
    """The ``language`` fenced blocks of the README section titled ``## heading``."""
    text = README.read_text()
    start = text.index(f"\n## {heading}\n")
    end = text.find("\n## ", start + 1)
    section = text[start:end if end >= 0 else len(text)]
    return re.findall(rf"```{language}\n(.*?)```", section, flags=re.S)
