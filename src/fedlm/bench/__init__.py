"""Benchmarks only: each calls the library (`fedlm.eval`, `fedlm.fusion`, `fedlm.kvcomm`, ...) and writes JSON + PNG."""
