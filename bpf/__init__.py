"""bpf room."""
