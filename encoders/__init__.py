"""Text -> vectors, written as embedding tables."""
