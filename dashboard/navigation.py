"""The page list, in one place so that a page can switch to another (st.switch_page needs the Page)."""

from __future__ import annotations

import streamlit as st


def pages() -> dict[str, st.Page]:
    """Pages keyed by url path; st.Page objects built from the same function and url path compare equal."""
    from dashboard import dead_features, features, overview, prompt_inspector, steering

    return {
        "overview": st.Page(overview.render, title="Overview", url_path="overview", default=True),
        "features": st.Page(features.render, title="Feature browser", url_path="features"),
        "dead": st.Page(dead_features.render, title="Dead features", url_path="dead"),
        "inspect": st.Page(prompt_inspector.render, title="Prompt inspector", url_path="inspect"),
        "steering": st.Page(steering.render, title="Steering", url_path="steering"),
    }
