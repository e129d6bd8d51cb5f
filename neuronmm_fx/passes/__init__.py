"""The pass pipeline: capture → canonicalize → match → compress → fuse → lower → dump."""
