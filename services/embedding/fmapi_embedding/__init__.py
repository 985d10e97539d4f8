"""fmapi embedding service."""
