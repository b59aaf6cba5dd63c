"""Sphinx configuration."""

from datetime import date
from importlib.metadata import version as _version

project = "sccoreset"
author = "sccoreset developers"
copyright = f"{date.today().year}, {author}"
release = _version("sccoreset")

extensions = [
    "myst_nb",
    "sphinx.ext.autodoc",
    "sphinx.ext.autosummary",
    "sphinx.ext.napoleon",
    "sphinx_autodoc_typehints",
]
autosummary_generate = True
autodoc_member_order = "bysource"
napoleon_google_docstring = False
napoleon_numpy_docstring = True
napoleon_use_rtype = True
typehints_defaults = "comma"
always_document_param_types = False
nb_execution_mode = "off"  # the tutorial is executed by the test suite (nbmake), not by the docs build
myst_enable_extensions = ["colon_fence", "dollarmath"]
source_suffix = {".md": "myst-nb", ".ipynb": "myst-nb"}
exclude_patterns = ["_build", "**.ipynb_checkpoints"]
html_theme = "sphinx_book_theme"
html_title = "sccoreset"
html_static_path = ["_static"]
html_theme_options = {"repository_url": "https://github.com/scverse/sccoreset", "use_repository_button": False}
nitpicky = False
suppress_warnings = ["mystnb.unknown_mime_type", "config.cache"]
