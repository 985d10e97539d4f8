"""fmapi routing service."""
