"""Adapter formats: each turns an adapter folder into patches keyed by base tensor name."""
