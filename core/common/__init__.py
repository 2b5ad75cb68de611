"""tuneforge.common."""
