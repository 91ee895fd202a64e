"""contree."""
