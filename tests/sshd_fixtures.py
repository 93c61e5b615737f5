"""pytest fixtures for tests that need real sshd devices (see tests/lab/sshd.py)."""
