"""Training: state, losses, the jitted step and the loop (`python -m lmjax.train`)."""
