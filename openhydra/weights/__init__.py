"""Weights from the swarm (issue 19): manifests, serving and fetching a span's tensors between peers."""
