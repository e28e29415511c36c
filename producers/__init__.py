"""Everything that writes commands: the Python client and the jobsched CLI."""
