"""tuneforge.engine."""
