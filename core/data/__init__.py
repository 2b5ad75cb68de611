"""tuneforge.data."""
