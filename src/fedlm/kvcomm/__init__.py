"""KV-cache communication between heterogeneous LLMs (C2C-style): wire format, transmitter service, fuser."""
