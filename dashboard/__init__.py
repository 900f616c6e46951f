"""The Streamlit dashboard (`peftlab dashboard`): reads the results store's views, read-only.

app.py is the entry point; one module per page; queries (SQL), loaders (caching), stats,
charts and widgets beneath them. Never imports Ray or peftlab.workers.
"""
