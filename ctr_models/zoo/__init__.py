"""One small file per CTR backbone."""
