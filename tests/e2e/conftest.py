"""Fixtures of the end-to-end tests (the shared ones are in tests/conftest.py)."""

from tests.e2e.bounds_support import wide_archives  # noqa: F401 (a fixture)
from tests.management.conftest import accounts  # noqa: F401 (a fixture: throwaway users)
