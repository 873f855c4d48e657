"""Lightning strategies for multi-network modules (registered with Lightning on import)."""
