"""Tests that need the kernel nbd driver: they run in a qemu guest (see conftest.py)."""
