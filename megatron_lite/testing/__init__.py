"""Test support that production code never imports (fault injection for tests/faults)."""
