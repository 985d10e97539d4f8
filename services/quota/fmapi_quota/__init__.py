"""fmapi quota service."""
