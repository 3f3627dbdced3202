"""The IPsec lab: scenarios in network namespaces on any kernel that can do ESP."""
