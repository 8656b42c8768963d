"""edgeserve benchmark: ``python -m bench`` (see ``bench/__main__.py`` and bench/README.md)."""
