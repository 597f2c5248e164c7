"""Runnable presets: `python -m experiments.<name> --workdir DIR [--section.field=value ...]`."""
