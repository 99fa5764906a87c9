"""The one per-file job (hash, cache, decode, views, entry), its windows, limits and batcher."""
