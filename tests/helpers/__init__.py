"""Code the tests hand to the system under test (e.g. Python job targets)."""
