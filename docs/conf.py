"""Sphinx configuration: the API reference from the docstrings, plus the
Markdown pages in this folder (myst-parser).

Build: ``bash .ci/docs.sh`` (warnings are errors), or
``python -m sphinx -W --keep-going -b html docs build/docs/html``.
"""

import os
import pathlib
import sys

# The checkout's package, whether or not it is installed.
ROOT = pathlib.Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
# Importing the package must not look for accelerators (or libtpu).
os.environ.setdefault("JAX_PLATFORMS", "cpu")

import rmsnorm_jax  # noqa: E402

project = "rmsnorm_jax"
copyright = "rmsnorm_jax authors"  # pylint: disable=redefined-builtin
author = "rmsnorm_jax authors"
release = version = rmsnorm_jax.__version__

extensions = [
    "sphinx.ext.autodoc",
    "sphinx.ext.napoleon",
    "sphinx.ext.viewcode",
    "myst_parser",
]
source_suffix = {".md": "markdown"}
root_doc = "index"
exclude_patterns = ["**/*.ipynb"]

# Docstrings are Google style ("Args:", "Returns:", "Raises:").
napoleon_google_docstring = True
napoleon_numpy_docstring = False
autodoc_member_order = "bysource"
autodoc_typehints = "description"
autodoc_default_options = {"members": True, "show-inheritance": True}

myst_enable_extensions = ["dollarmath"]
# Anchors for "page.md#section" links between the pages.
myst_heading_anchors = 3
# The measured-results pages (bench_*.md) are written by the benchmark's
# Markdown writer, whose tables sit under H3 headings right below the H1;
# myst reports that jump as a warning, which says nothing about the content.
suppress_warnings = ["myst.header"]

html_theme = "alabaster"
html_title = f"rmsnorm_jax {release}"


# rmsnorm_jax.linen.RMSNorm lists its extra fields under a free-form heading
# that docutils parses as a broken definition list (a -W error). Until the
# docstring uses a Google "Attributes:" section, that one heading is read as
# one; any other docstring passes through unchanged.
_LINEN_FIELDS_HEADING = "Extra fields (after flax's, all defaulted):"


def _linen_fields_as_attributes(app, what, name, obj, options, lines):
  del app, what, obj, options
  if name == "rmsnorm_jax.linen.RMSNorm":
    lines[:] = ["Attributes:" if l.strip() == _LINEN_FIELDS_HEADING else l
                for l in lines]


def setup(app):
  # Before napoleon (priority 500) turns "Attributes:" into fields.
  app.connect("autodoc-process-docstring", _linen_fields_as_attributes,
              priority=400)
