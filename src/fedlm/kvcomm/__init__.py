"""KV-cache communication between heterogeneous LLMs: the wire format, the transmitter service and its client,
and C2C-style fusers that project a transmitter's cache into a receiver's."""
