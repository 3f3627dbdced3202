"""correlate room."""
