"""Soak test (issue 12, "Faults, with nothing lost"): validating clients under injected faults."""
