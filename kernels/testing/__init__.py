"""What the tests hold the backends against (reference.py); not used by the library itself."""
