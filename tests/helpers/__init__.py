"""Helpers for the deployment tests: loading ``deploy/local.py``, free ports, and a byte-counting TCP proxy."""
