"""fmapi gateway: OpenAI-compatible REST and the public gRPC API."""
