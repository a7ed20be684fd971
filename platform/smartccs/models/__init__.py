"""Model artifacts in the store and the networks they hold."""
