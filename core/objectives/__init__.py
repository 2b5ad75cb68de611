"""tuneforge.objectives."""
