"""Blob storage: bytes by key. What exists, and where, is the metadata store's business."""
