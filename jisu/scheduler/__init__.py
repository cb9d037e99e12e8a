"""Which sequences run in each step, and which KV-cache blocks they own."""
