"""Checking inputs against FORMATS.md before a long run (``dhr-label inspect``)."""
