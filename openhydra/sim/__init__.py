"""Swarm simulation at internet scale with the real routing code, and multi-host tools (namespaces, relay)."""
