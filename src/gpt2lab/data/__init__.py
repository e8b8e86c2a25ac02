"""Text to token datasets: preparing and reading token files and shards, corpus sources, count models."""
