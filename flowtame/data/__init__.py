"""Image sources, quantization and the embedded default data (imports only flowtame.errors)."""
