"""YAML presets shipped with cvdd (read through :mod:`cvdd.config`)."""
