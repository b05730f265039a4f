"""The pull-through cache: upstream registries behind a path prefix."""
