import os
import sys

sys.path.insert(0, os.path.dirname(__file__))  # tests/reference.py


def pytest_configure(config):
    # generated modules are cached per test session, not in the user's home
    import tempfile

    os.environ.setdefault("MOEC_CACHE", tempfile.mkdtemp(prefix="moec-cache-"))
