"""What every fmapi service shares: server bootstrap, config, telemetry, errors."""
