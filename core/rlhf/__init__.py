"""tuneforge.rlhf."""
