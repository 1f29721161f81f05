"""Sphinx configuration of cw's documentation site (``sphinx-build -W docs build``)."""
from __future__ import annotations

import os
import sys
from importlib import metadata

sys.path.insert(0, os.path.abspath(".."))

project = "cw (cluster-workers)"
author = "the cw developers"
copyright = "2026, the cw developers"
release = metadata.version("cluster-workers")
version = release

extensions = [
    "sphinx.ext.autodoc",
    "sphinx.ext.doctest",
    "myst_parser",
]
source_suffix = {".rst": "restructuredtext", ".md": "markdown"}
exclude_patterns = ["_build", "bench_full_*"]
html_theme = "furo"
html_title = f"cw {release}"
autodoc_member_order = "bysource"
autodoc_typehints = "description"
# No intersphinx: the site builds offline (clusters often are).
