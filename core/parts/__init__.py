"""tuneforge.parts."""
