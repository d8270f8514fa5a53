"""Memory: saved-for-backward counting, peak measurement on CPU and CUDA, and planning."""
