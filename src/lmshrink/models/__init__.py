"""Models: load (hub id, local directory, .gguf, packaged reference models), save, and architecture helpers."""
