"""LLM engines behind one seam: load() and generate(batch)."""
