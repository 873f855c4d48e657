"""Bytes to tensors. Knows no model and no trainer."""
