"""Hardware detection (what this machine is and how fast) and auto-promotion (what it should serve)."""
