"""fmapi auth service."""
