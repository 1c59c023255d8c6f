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


# Attributes render as a field list of the class (not as separate objects,
# which would collide with the dataclass fields autodoc also finds).
napoleon_use_ivar = True

def _skip_field_defaults(app, what, name, obj, skip, options):
  # A flax field whose default is a function (``bias_init = zeros``) looks
  # like a method to autodoc, which would document jax's initializer under
  # the layer's name; the field itself is in the class signature and its
  # docstring.
  del app, name, options
  module = getattr(obj, "__module__", "") or ""
  if what == "class" and callable(obj) and not module.startswith(
      "rmsnorm_jax"):
    return True
  return skip


def setup(app):
  app.connect("autodoc-skip-member", _skip_field_defaults)
