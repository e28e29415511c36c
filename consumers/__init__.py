"""Consumers: workers that run jobs and projectors that build the read models."""
