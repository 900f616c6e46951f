"""The storage contract: Alembic migrations (migrations/) and the SQL views the dashboard reads
(views/), one file per revision that changes them."""
from __future__ import annotations

import re
from pathlib import Path

VIEWS = Path(__file__).resolve().parent / "views"


def view_statements(name: str) -> list[str]:
    """The statements of views/NAME: comment lines dropped, split on the ';' that ends each one."""
    text = (VIEWS / name).read_text()
    body = "\n".join(line for line in text.splitlines() if not line.lstrip().startswith("--"))
    return [part.strip() for part in re.split(r";\s*(?:\n|$)", body) if part.strip()]
