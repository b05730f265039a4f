"""Metadata: what exists (blobs, repositories, manifests, tags, uploads). The source of truth."""
