"""The device operations other than ``run``: releases, venv, facts, runs (see protocol.py for the table)."""
