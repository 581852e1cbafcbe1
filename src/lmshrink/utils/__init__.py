"""Small shared helpers: atomic file writes, environment/provenance records."""
