"""The Streamlit entry point (`peftlab dashboard` runs it): navigation, the shared sidebar, then
the chosen page. The store URL comes from $PEFTLAB_STORE_URL; the app only ever reads it.
"""
from __future__ import annotations

from pathlib import Path

import streamlit as st

from peftlab.dashboard import widgets
from peftlab.errors import UserError

HERE = Path(__file__).resolve().parent
PAGES = [  # (file, title, url path)
    ("overview.py", "Overview", "overview"),
    ("leaderboard.py", "Leaderboard", "leaderboard"),
    ("domains.py", "Methods x domains", "domains"),
    ("pareto.py", "Pareto", "pareto"),
    ("sensitivity.py", "Sensitivity", "sensitivity"),
    ("bias.py", "Bias", "bias"),
    ("trial.py", "Trial", "trial"),
]

st.set_page_config(page_title="peftlab", layout="wide")
# Streamlit answers the default page at / only; a hidden copy of the Overview takes that role so
# that /overview, like every other page, is an address of its own.
root = st.Page(HERE / "overview.py", title="Overview", url_path="home", default=True, visibility="hidden")
page = st.navigation([root, *(st.Page(HERE / file, title=title, url_path=path) for file, title, path in PAGES)])
try:
    options = widgets.sidebar()
except UserError as exc:  # missing, unreachable or unmigrated store: say so, with the fix
    st.title(page.title)
    st.error(str(exc))
else:
    if options["experiment"]:
        page.run()
    else:
        st.title(page.title)
        widgets.empty(widgets.NO_EXPERIMENTS)

