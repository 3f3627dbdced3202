"""xfrm room."""
