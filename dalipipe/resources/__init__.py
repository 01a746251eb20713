"""Package data: the config schema, every setting with its type, default and meaning."""
