"""Integration tests: Moorage against a real registry and real container clients."""
