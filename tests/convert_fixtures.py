"""pytest fixtures for tests that need converted artifacts."""
