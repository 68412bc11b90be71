"""Where work runs and where bytes live: Ray connections, resource plans, storage URIs."""
