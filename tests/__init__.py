"""Test suite for spotrun."""
