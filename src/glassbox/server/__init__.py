"""The glassbox server: sandboxed execution of remote trace bodies, weight integrity checks."""
