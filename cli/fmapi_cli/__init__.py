"""The fmapi command line."""
