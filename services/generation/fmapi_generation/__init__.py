"""fmapi generation service."""
