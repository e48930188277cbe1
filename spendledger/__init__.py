"""Process layer: settings, CLI, the embedded system, connections."""
