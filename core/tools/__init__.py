"""tuneforge.tools."""
