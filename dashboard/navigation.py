"""The page table: which pages the app has, their titles and url paths, in one place so that app.py can build the
navigation and a page can switch to another (st.switch_page needs the Page).

Pages are built from their files under dashboard/views/ (st.navigation runs each one as a script), so this module
imports no page module and a page may import it without a circle. The folder is not called `pages/`: Streamlit
treats a `pages/` folder beside the entry script as a version-1 multipage app and, on a process's first run, would
run a page file without app.py."""

from __future__ import annotations

from pathlib import Path

import streamlit as st

VIEWS = Path(__file__).resolve().parent / "views"
"""The page files."""

PAGE_TABLE: dict[str, tuple[str, str]] = {
    "overview": ("overview.py", "Overview"),
    "features": ("features.py", "Feature browser"),
    "dead": ("dead_features.py", "Dead features"),
    "inspect": ("inspector.py", "Prompt inspector"),
    "steering": ("steering.py", "Steering"),
    "ioi": ("ioi.py", "IOI: SAE vs supervised dictionaries"),
}
"""url path -> (file under views/, title), in menu order."""

DEFAULT_PAGE = "overview"


def pages() -> dict[str, st.Page]:
    """Pages keyed by url path; st.Page objects built from the same file and url path are the same page to
    st.navigation and st.switch_page."""
    return {url: st.Page(VIEWS / file, title=title, url_path=url, default=url == DEFAULT_PAGE)
            for url, (file, title) in PAGE_TABLE.items()}
